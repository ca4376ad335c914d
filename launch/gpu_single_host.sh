#!/usr/bin/env bash
# Pre-train on one host with all its GPUs (one process drives every local GPU):
#   launch/gpu_single_host.sh configs/vit_l.py /data/runs/mae_vit_l [--config.field=value ...]
# Install first: pip install -e . "jax[cuda12]==0.10.2". DRY_RUN=1 prints the command only.
# Rerunning the same command resumes from the latest checkpoint; SIGTERM checkpoints and exits 0.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [extra mae_jax.main flags]" >&2; exit 2
fi
config=$1 workdir=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}  # tf.data only; TF never sees the GPUs
cmd=(python -m mae_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
