#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for the tests of
# the sweep's slurm backend (tests/test_slurm.py starts it). Needs root; idempotent.
#   tests/slurm_local.sh start   install (first time: apt-get, ~2 min), configure, start munged,
#                                slurmctld and slurmd, wait until the node takes jobs
#   tests/slurm_local.sh stop    stop the three daemons (by their pid files)
# No accounting (sacct does not work): a job is seen with squeue / scontrol show job while it is
# pending or running and for MinJobAge (5 min) after it ends. Each task gets the --cpus-per-task
# and --mem it asks for (default one CPU and 1 GiB), so several run at once.
set -euo pipefail
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)
case "${1:-start}" in
stop)
  for p in "${PIDS[@]}"; do
    if [ -f "$p" ]; then kill "$(cat "$p")" 2>/dev/null || true; fi
  done
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  echo "$0: needs root (it installs packages and starts daemons)" >&2
  exit 3
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(cut -d. -f1 /proc/sys/kernel/hostname)  # what slurmd takes for its node name
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))  # MiB, less 2 GiB for the system
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge /etc/slurm /var/spool/slurmctld \
  /var/spool/slurmd /var/log/slurm
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key

conf=$(cat <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
restart=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  restart=1
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$restart" = 1 ]; then  # a changed config: the daemons read it at start
  for p in /run/slurmd.pid /run/slurmctld.pid; do
    if running "$p"; then kill "$(cat "$p")"; fi
  done
  for _ in $(seq 50); do running /run/slurmd.pid || running /run/slurmctld.pid || break; sleep 0.2; done
fi
running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --force
running /run/slurmctld.pid || /usr/sbin/slurmctld
running /run/slurmd.pid || /usr/sbin/slurmd

state=""
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in
  idle*|mix*|alloc*) break ;;
  down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
case "$state" in
idle*|mix*|alloc*) sinfo ;;
*) echo "$0: node $host is '${state:-unknown}', not taking jobs; see /var/log/slurm/" >&2; exit 1 ;;
esac
