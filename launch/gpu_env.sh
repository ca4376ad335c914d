# shellcheck shell=bash
# Environment for mae_jax on NVIDIA GPUs; sourced by gpu_single_host.sh and gpu_slurm.sbatch.
# Every value yields to one already in the environment, and flags in XLA_FLAGS come after ours
# (XLA takes the last value of a repeated flag), so a user's setting always wins. Flag names are
# checked against the pinned jaxlib by tests/test_launch.py (an unknown XLA flag aborts JAX).

# The memory pool: JAX preallocates this fraction of each GPU's memory (default 0.75 leaves a
# quarter idle); 0.92 leaves room for the cuDNN / cuBLAS / NCCL workspaces outside the pool.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# The latency-hiding scheduler overlaps the gradient all-reduce (and the FSDP all-gathers /
# reduce-scatters with mesh.fsdp > 1) with the backward pass instead of running them after it.
# (The all-reduce combine threshold is left alone: at its default XLA may size the buckets
# from the free memory, a heuristic that an explicit value turns off.)
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"

# One hardware work queue per GPU: the order the latency-hiding scheduler chose is the order the
# GPU runs (NVIDIA's advice for Hopper with async collectives; unset it on Blackwell).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL's warnings (a fallback to sockets, a missing InfiniBand device) reach the log; they are
# the first sign of a collective running at a fraction of the fabric's bandwidth.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Between nodes NCCL picks its network itself; clusters with several NICs may need
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA set to their InfiniBand / RoCE devices (site specific).

# tf.data only (tensorflow-cpu); the input pipeline never sees the GPUs.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

# For DRY_RUN: the settings above, one "# env NAME=value" line each.
print_gpu_env() {
  local name
  for name in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG \
              TF_CPP_MIN_LOG_LEVEL; do
    echo "# env $name=${!name-}"
  done
}
