#!/usr/bin/env bash
# A cpt_jax run on a Cloud TPU VM or pod slice, with gcloud: create it, install this checkout on
# every worker, run the same command on all workers (JAX finds its peers on the slice), follow
# the log of worker 0, delete it.
#
#   export TPU_NAME=cpt ZONE=us-east5-a ACCELERATOR=v5p-32 PROJECT=my-project
#   launch/tpu_vm.sh check configs/bible.py:1393m --config.seq_len=2048   # here, before any TPU is held
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run configs/bible.py:1393m gs://my-bucket/ckpt/1393m --config.seq_len=2048
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
#
# `check` compiles the run for the slice's topology on this machine (python -m cpt_jax.aot; needs
# `pip install -e '.[tpu]'` here, Linux x86-64) and fails (exit 2) if it does not fit; `run` does the
# same before it starts the job unless given --no-check first. TOPOLOGY overrides the topology
# taken from ACCELERATOR (e.g. TOPOLOGY=v5p:4x4x12 for v5p-384); PYTHON, the interpreter here.
# Optional: VERSION (the TPU VM image), SPOT=1 (preemptible: on preemption the run saves and exits
# 0; `run` again with the same arguments resumes). Workdirs on a pod must be shared: gs:// URLs.
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR=v5p-8] [PROJECT=...] $0 check CONFIG [FLAGS...]|create|setup|run [--no-check] CONFIG WORKDIR [FLAGS...]|logs|delete" >&2
  exit 2
}
[ $# -ge 1 ] || usage
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
VERSION=${VERSION:-v2-alpha-tpuv5}
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
remote_dir=cpt_jax
log=cpt_jax.log

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

case "$1" in
  create)
    extra=()
    if [ "${SPOT:-0}" = 1 ]; then extra+=(--spot); fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${extra[@]}"
    ;;
  setup)  # this checkout (tracked files), to every worker, installed with the TPU extra
    here=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$here" archive --format=tar.gz --prefix="$remote_dir/" -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":cpt_jax.tar.gz "${where[@]}" --worker=all
    rm -f "$archive"
    on_all "rm -rf $remote_dir && tar xzf cpt_jax.tar.gz && cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
    ;;
  check)
    [ $# -ge 2 ] || usage
    check "${@:2}"
    ;;
  run)  # the check here, then the same command on all workers, in the background; `logs` follows worker 0
    shift
    if [ "${1:-}" = --no-check ]; then shift; else [ $# -ge 2 ] && check "$1" "${@:3}"; fi
    [ $# -ge 2 ] || usage
    args=$(printf ' %q' python -m cpt_jax.main --config "$1" --workdir "$2" "${@:3}")
    on_all "cd $remote_dir && . .venv/bin/activate && nohup$args > ~/$log 2>&1 &"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=0 --command="tail -n 100 -f ~/$log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
