#!/usr/bin/env bash
# Pre-train on one host with all its GPUs (one process drives every local GPU):
#   launch/gpu_single_host.sh configs/vit_l.py /data/runs/mae_vit_l [--config.field=value ...]
# Install first: pip install -e . "jax[cuda12]==0.10.2". The XLA / NCCL settings for throughput
# are in launch/gpu_env.sh (each with its reason). DRY_RUN=1 prints the command on the first
# line and the environment it would run with on the next ones ("# env NAME=value"), runs nothing.
# Rerunning the same command resumes from the latest checkpoint; SIGTERM checkpoints and exits 0.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [extra mae_jax.main flags]" >&2; exit 2
fi
config=$1 workdir=$2; shift 2
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
cmd=(python -m mae_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  print_gpu_env
  exit 0
fi
exec "${cmd[@]}"
