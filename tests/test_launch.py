import os
import shutil
import signal
import subprocess
import time

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
  assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
  assert _dry("gpu_slurm.sbatch").returncode != 0  # CONFIG / WORKDIR required


# Stand-ins for SLURM's commands: each records its argv; the fake srun runs until SIGUSR1,
# records it, takes a moment to "checkpoint" and exits 0 (or finishes at once with
# FAKE_SRUN_EXIT); the fake scontrol notes whether the step had already finished.
FAKE_SRUN = """#!/usr/bin/env bash
trap 'echo USR1 > "$FAKE_LOG/srun_signal"; sleep 0.5; touch "$FAKE_LOG/srun_done"; exit 0' USR1
echo "$@" > "$FAKE_LOG/srun_argv"
if [[ -n "${FAKE_SRUN_EXIT:-}" ]]; then exit "$FAKE_SRUN_EXIT"; fi
for _ in $(seq 600); do sleep 0.1; done
exit 3
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_LOG/scontrol_argv"
[[ -e "$FAKE_LOG/srun_done" ]] && echo "after srun" >> "$FAKE_LOG/scontrol_argv"
exit 0
"""


def _batch_job(tmp_path, **env):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path),
             SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", CONFIG="configs/vit_h.py",
             WORKDIR="/shared/h", **env)
  env.pop("DRY_RUN", None)
  return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sbatch")], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=30):
  deadline = time.time() + timeout
  while not path.exists():
    if time.time() > deadline or proc.poll() is not None:
      proc.kill()
      raise AssertionError(f"{path.name} never appeared; stderr: {proc.communicate()[1]}")
    time.sleep(0.02)


def test_slurm_time_limit_signal_checkpoints_then_requeues(tmp_path):
  proc = _batch_job(tmp_path)
  _wait_for(tmp_path / "srun_argv", proc)  # the trap is set before srun starts
  assert (tmp_path / "srun_argv").read_text().split()[:4] == [
      "--kill-on-bad-exit=1", "python", "-m", "mae_jax.main"]
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err
  assert (tmp_path / "srun_signal").read_text().strip() == "USR1"
  assert (tmp_path / "scontrol_argv").read_text().splitlines() == ["requeue 42", "after srun"]
  assert "requeueing job 42" in err


def test_slurm_finished_or_failed_run_is_not_requeued(tmp_path):
  for code in ("0", "5"):
    (tmp_path / code).mkdir()
    proc = _batch_job(tmp_path / code, FAKE_SRUN_EXIT=code)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == int(code), err
    assert (tmp_path / code / "srun_argv").exists()
    assert not (tmp_path / code / "scontrol_argv").exists()


def test_slurm_script_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  out = subprocess.run(["shellcheck", os.path.join(ROOT, "launch", "gpu_slurm.sbatch")],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


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
