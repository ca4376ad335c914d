import os
import subprocess

import pytest

from mae_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, **env):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True)


def test_gpu_single_host_dry_run():
  out = _dry("gpu_single_host.sh", "configs/vit_l.py", "/runs/l", "--config.batch_size=1024")
  assert out.returncode == 0
  assert out.stdout.split() == ["python", "-m", "mae_jax.main", "--config=configs/vit_l.py",
                                "--workdir=/runs/l", "--config.batch_size=1024"]


def test_slurm_dry_run_and_requeue_signal():
  out = _dry("gpu_slurm.sbatch", CONFIG="configs/vit_h.py", WORKDIR="/shared/h")
  assert out.returncode == 0
  assert out.stdout.split()[:3] == ["srun", "--kill-on-bad-exit=1", "python"]
  assert "--config=configs/vit_h.py" in out.stdout and "--workdir=/shared/h" in out.stdout
  text = open(os.path.join(ROOT, "launch", "gpu_slurm.sbatch")).read()
  assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
  assert _dry("gpu_slurm.sbatch").returncode != 0  # CONFIG / WORKDIR required


def test_tpu_vm_dry_run():
  out = _dry("tpu_vm.sh", "my-tpu", "us-east5-a", "configs/vit_h.py", "gs://b/h",
             "--config.mesh.fsdp=8", SETUP="1", REPO_URL="https://example.com/mae_jax.git")
  assert out.returncode == 0
  setup, train = out.stdout.strip().splitlines()
  assert "--worker=all" in train and "pip\\ install\\ -e\\ ." in setup
  assert "--config=configs/vit_h.py\\ --workdir=gs://b/h\\ --config.mesh.fsdp=8" in train
  assert _dry("tpu_vm.sh", "only-one-arg").returncode == 2


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False), ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_multihost_detection(env, expected):
  assert main.multihost_detected(env) is expected
