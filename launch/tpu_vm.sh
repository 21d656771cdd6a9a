#!/usr/bin/env bash
# A cpt_jax run on a Cloud TPU VM or pod slice, with gcloud: check that it fits (here, before any
# TPU is held), create the slice, install this checkout on every worker, run the same command on
# all workers (JAX finds its peers on the slice), read the logs, stop it, delete the slice.
#
#   export TPU_NAME=cpt ZONE=us-east5-a ACCELERATOR=v5p-32 PROJECT=my-project
#   launch/tpu_vm.sh check configs/bible.py:1393m --config.seq_len=2048
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run configs/bible.py:1393m gs://my-bucket/ckpt/1393m --config.seq_len=2048
#   launch/tpu_vm.sh logs            # the last lines of every worker's log; `logs -f [WORKER]` follows one
#   launch/tpu_vm.sh stop            # SIGTERM to the run on every worker: it saves and exits
#   launch/tpu_vm.sh delete
#
# Spot VMs (SPOT=1) and queued resources (QUEUED=1: the slice is asked for as a queued resource
# and comes when capacity does): a preempted slice cannot be reached, so
#   launch/tpu_vm.sh supervise CONFIG WORKDIR [FLAGS...]
# checks, creates, sets up and runs, then watches: after a preemption it deletes the slice and
# does it all again, and the run resumes from its last checkpoint; it returns when the run ends.
#
# `check` compiles the run for the slice's topology on this machine (python -m cpt_jax.aot; needs
# `pip install -e '.[tpu]'` here, Linux x86-64) and fails (exit 2) if it does not fit; `run` does
# the same before it starts the job unless given --no-check first. TOPOLOGY overrides the topology
# taken from ACCELERATOR (e.g. TOPOLOGY=v5p:4x4x12 for v5p-384); PYTHON, the interpreter here.
# VERSION: the TPU VM runtime, by default the one for the accelerator (v4, v5e, v5p and v6e
# differ). The images ship Python 3.10; setup installs uv and a Python 3.11 venv with
# '.[tpu,gcs]'. Workdirs on a pod must be shared: gs:// URLs. POLL: supervise's seconds between looks.
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR=v5p-8] [PROJECT=...] [SPOT=1] [QUEUED=1] $0" \
    "check CONFIG [FLAGS...] | create | setup | run [--no-check] CONFIG WORKDIR [FLAGS...] |" \
    "supervise CONFIG WORKDIR [FLAGS...] | logs [-f [WORKER]] | stop | delete" >&2
  exit 2
}
[ $# -ge 1 ] || usage
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
remote_dir=cpt_jax
log=cpt_jax.log
pid=cpt_jax.pid

on_all() {  # a shell command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

check() {  # CONFIG [FLAGS...]: the run compiled here for the slice's topology; exits 2 unless it fits
  local overrides=() a
  for a in "${@:2}"; do
    if [[ $a == --config.* ]]; then overrides+=("$a"); fi
  done
  "${PYTHON:-python3}" -m cpt_jax.aot --config "$1" --topology "${TOPOLOGY:-$ACCELERATOR}" "${overrides[@]}"
}

runtime_version() {  # the TPU VM software version for the accelerator's generation
  case "$ACCELERATOR" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "ACCELERATOR=$ACCELERATOR: set VERSION, its TPU VM runtime version" >&2; exit 2 ;;
  esac
}

state() {  # the slice's state (queued: its queued resource's), or NOT_FOUND
  if [ "${QUEUED:-0}" = 1 ]; then
    gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)' \
      2>/dev/null || echo NOT_FOUND
  else
    gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
  fi
}

create() {
  local version extra=()
  version=${VERSION:-$(runtime_version)}
  if [ "${SPOT:-0}" = 1 ]; then extra+=(--spot); fi
  if [ "${QUEUED:-0}" = 1 ]; then
    gcloud compute tpus queued-resources create "$TPU_NAME" "${where[@]}" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$version" "${extra[@]}"
    local s
    while s=$(state) && [ "$s" != ACTIVE ]; do  # queued until there is capacity
      case "$s" in FAILED | SUSPENDED | NOT_FOUND) echo "queued resource $TPU_NAME: $s" >&2; exit 1 ;; esac
      sleep "${POLL:-60}"
    done
  else
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$version" "${extra[@]}"
  fi
}

setup() {  # this checkout (tracked files) to every worker, in a Python 3.11 venv with the TPU and GCS extras
  local here archive
  here=$(cd "$(dirname "$0")/.." && pwd)
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$here" archive --format=tar.gz --prefix="$remote_dir/" -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":cpt_jax.tar.gz "${where[@]}" --worker=all
  rm -f "$archive"
  on_all "export PATH=\$HOME/.local/bin:\$PATH && rm -rf $remote_dir && tar xzf cpt_jax.tar.gz && cd $remote_dir \
&& { command -v uv >/dev/null || python3 -m pip install -q --user uv; } && uv venv -q --python 3.11 .venv \
&& uv pip install -q --python .venv/bin/python -e '.[tpu,gcs]'"
}

start() {  # CONFIG WORKDIR [FLAGS...]: the same command on all workers, in the background
  local args
  args=$(printf ' %q' python -m cpt_jax.main --config "$1" --workdir "$2" "${@:3}")
  on_all "cd $remote_dir && . .venv/bin/activate && nohup$args > ~/$log 2>&1 & echo \$! > ~/$pid"
}

running() {  # whether the run's process is alive on worker 0
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=0 --command="kill -0 \"\$(cat ~/$pid)\"" \
    >/dev/null 2>&1
}

delete() {
  if [ "${QUEUED:-0}" = 1 ]; then  # --force: the slice too
    gcloud compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

supervise() {  # CONFIG WORKDIR [FLAGS...]: run to the end through preemptions
  check "$1" "${@:3}"
  local started=0 s
  while true; do
    s=$(state)
    case "$s" in
      READY | ACTIVE) ;;
      NOT_FOUND) create; setup; started=0 ;;
      PREEMPTED | SUSPENDING | SUSPENDED | FAILED | TERMINATED | STOPPED)
        echo "slice $TPU_NAME is $s: deleting it and starting again; the run resumes"
        delete; create; setup; started=0 ;;
      *) sleep "${POLL:-60}"; continue ;;  # creating, queued, repairing
    esac
    if [ "$started" = 0 ]; then
      start "$@"
      started=1
    elif ! running && [[ $(state) =~ ^(READY|ACTIVE)$ ]]; then  # ended, not preempted
      echo "the run has ended; its last lines on every worker:"
      on_all "tail -n 5 ~/$log"
      return 0
    fi
    sleep "${POLL:-60}"
  done
}

case "$1" in
  check)
    [ $# -ge 2 ] || usage
    check "${@:2}"
    ;;
  create) create ;;
  setup) setup ;;
  run)  # the check here, then the job on all workers
    shift
    if [ "${1:-}" = --no-check ]; then shift; else [ $# -ge 2 ] && check "$1" "${@:3}"; fi
    [ $# -ge 2 ] || usage
    start "$@"
    ;;
  supervise)
    [ $# -ge 3 ] || usage
    supervise "${@:2}"
    ;;
  logs)
    if [ "${2:-}" = -f ]; then
      gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="${3:-0}" --command="tail -n 100 -f ~/$log"
    else
      on_all "echo \"== \$(hostname)\"; tail -n ${TAIL:-50} ~/$log"
    fi
    ;;
  stop) on_all "kill -TERM \"\$(cat ~/$pid)\"" ;;  # the run saves the step in flight and exits 0
  delete) delete ;;
  *) usage ;;
esac
