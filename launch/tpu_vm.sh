#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice (all workers), e.g. a v5p-64 pod slice:
#   launch/tpu_vm.sh TPU_NAME ZONE configs/vit_h.py gs://bucket/mae_vit_h [--config.field=value ...]
# SETUP=1 first installs the repo and jax[tpu] on every worker. DRY_RUN=1 prints the commands only.
# Multi-host set-up is automatic (TPU_WORKER_HOSTNAMES); rerunning the same command resumes from
# the latest checkpoint in the workdir, and maintenance events (SIGTERM) checkpoint and exit.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra mae_jax.main flags]" >&2; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
repo_url=${REPO_URL:-$(git config --get remote.origin.url || echo "https://github.com/OWNER/mae_jax")}
remote_dir=${REMOTE_DIR:-mae_jax}
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }
if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "git clone $repo_url $remote_dir || (cd $remote_dir && git pull); cd $remote_dir && pip install -e . 'jax[tpu]==0.10.2'"
fi
ssh_all "cd $remote_dir && python3 -m mae_jax.main --config=$config --workdir=$workdir $*"
