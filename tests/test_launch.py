import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import tiny
from mae_jax import main, summaries, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, **env):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True)


def test_gpu_single_host_dry_run():
  out = _dry("gpu_single_host.sh", "configs/vit_l.py", "/runs/l", "--config.batch_size=1024")
  assert out.returncode == 0
  command, *env = out.stdout.splitlines()
  assert command.split() == ["python", "-m", "mae_jax.main", "--config=configs/vit_l.py",
                             "--workdir=/runs/l", "--config.batch_size=1024"]
  env = dict(line[len("# env "):].split("=", 1) for line in env)
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
  assert env["XLA_FLAGS"].startswith("--xla_gpu_enable_latency_hiding_scheduler=true")
  assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
  # a value the user set wins: theirs is kept, and their XLA flags come after ours
  out = _dry("gpu_single_host.sh", "c", "w", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
             XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false")
  assert "# env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in out.stdout
  assert ("# env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true "
          "--xla_gpu_enable_latency_hiding_scheduler=false") in out.stdout


def _gpu_env_xla_flags():
  out = _dry("gpu_single_host.sh", "c", "w", XLA_FLAGS="")
  return next(line.split("=", 1)[1] for line in out.stdout.splitlines()
              if line.startswith("# env XLA_FLAGS="))


@pytest.mark.parametrize("extra,ok", [("", True), (" --xla_gpu_no_such_flag=true", False)])
def test_gpu_xla_flags_exist_in_the_pinned_jaxlib(extra, ok):
  """XLA aborts at start-up on an unknown flag, GPU flags included, even on a CPU."""
  flags = _gpu_env_xla_flags() + extra
  out = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                       text=True, env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
  assert (out.returncode == 0) is ok, out.stderr[-2000:]
  if not ok:
    assert "Unknown flag in XLA_FLAGS: --xla_gpu_no_such_flag" in out.stderr


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


def _slurm_env(out):
  return dict(line[len("# env "):].split("=", 1) for line in out.stdout.splitlines()[1:])


@pytest.mark.parametrize("env,local_ids,cpus", [
    (dict(SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="224"), "0,1,2,3,4,5,6,7", "224"),
    (dict(SLURM_GPUS_PER_NODE="h100:4", SLURM_NTASKS_PER_NODE="1"), "0,1,2,3", ""),
    (dict(SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_ON_NODE="224"), "", "28"),
])
def test_slurm_layout_comes_from_the_allocation(env, local_ids, cpus):
  """One process per node sees all its GPUs; one per GPU leaves JAX its SLURM_LOCALID."""
  out = _dry("gpu_slurm.sbatch", CONFIG="c", WORKDIR="w", SLURM_JOB_ID="7",
             SLURM_JOB_NUM_NODES="2", **env)
  assert out.returncode == 0, out.stderr
  assert _slurm_env(out)["JAX_LOCAL_DEVICE_IDS"] == local_ids
  assert _slurm_env(out)["SRUN_CPUS_PER_TASK"] == cpus


def test_slurm_bad_layout_is_one_error_line_and_no_gpu_count_a_warning():
  out = _dry("gpu_slurm.sbatch", CONFIG="c", WORKDIR="w", SLURM_JOB_ID="7",
             SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="3")
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.splitlines() == ["error: --ntasks-per-node=3 with 8 GPUs per node: use 1 (a "
                                     "process per node) or 8 (a process per GPU)"]
  out = _dry("gpu_slurm.sbatch", CONFIG="c", WORKDIR="w", SLURM_JOB_ID="7",
             PATH="/usr/bin:/bin")  # no GPU variables, no nvidia-smi
  assert out.returncode == 0 and out.stderr.startswith("warning: no GPU count for job 7")
  text = open(os.path.join(ROOT, "launch", "gpu_slurm.sbatch")).read()
  assert "#SBATCH --nodes" not in text  # the node count is the submitter's: sbatch --nodes=N


# Stand-in for srun that starts the step's tasks here, one per fake node, with the variables
# SLURM gives each task; it records each task's SLURM / JAX / XLA environment.
FAKE_SRUN_LOCAL = """#!/usr/bin/env bash
echo "$@" > "$FAKE_LOG/srun_argv"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  (export SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_NODELIST=localhost \
     SLURM_STEP_NUM_NODES=$SLURM_JOB_NUM_NODES
   env | grep -E '^(SLURM|JAX|XLA|SRUN)_' | sort > "$FAKE_LOG/task$i.env"
   exec "$@" > "$FAKE_LOG/task$i.log" 2>&1) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""
TINY_ARGS = ("img_size=32,embed_dim=32,depth=1,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
             "decoder_num_heads=4,num_preview_images=2")
# 2 steps of 3: the run stops after its checkpoint at step 2 (no end-of-run pictures / evals).
SIM_FLAGS = {"total_steps": 3, "stop_after_steps": 2, "warmup_steps": 1, "log_every": 1,
             "batch_size": 16, "image_every": -1}


def _slurm_job_id_with_free_port():
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on localhost."""
  for port in random.sample(range(61440, 65536), 200):
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
    return 4096 * 7 + port - 61440
  raise AssertionError("no free port in 61440-65535")


def _tensorboard_losses(workdir):
  (events,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  return {e.step: v.simple_value for e in summaries.read_events(events)
          for v in e.summary.value if v.tag == "loss"}


def test_slurm_two_tasks_train_like_one_process_on_the_same_global_batch(tmp_path):
  """gpu_slurm.sbatch under a local srun: 2 tasks x 2 CPU devices initialise jax.distributed
  from the SLURM variables and log the same losses as one process with 4 devices."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN_LOCAL)
  (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
  for name in ("srun", "python"):
    (bin_dir / name).chmod(0o755)
  job = _slurm_job_id_with_free_port()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path),
             SLURM_JOB_ID=str(job), SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2",
             SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="2", SLURM_CPUS_ON_NODE="2",
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             CONFIG=f"configs/tiny.py:{TINY_ARGS}", WORKDIR=str(tmp_path / "two"),
             EXTRA_FLAGS=" ".join(f"--config.{k}={v}" for k, v in SIM_FLAGS.items()))
  env.pop("DRY_RUN", None)
  job_proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sbatch")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
  # Meanwhile the reference: this process, the first 4 of its 8 CPU devices, the same config.
  config = tiny.get_config(TINY_ARGS)
  config.update(SIM_FLAGS)
  config.mesh.data = 4
  _, history = train.train_and_evaluate(config, str(tmp_path / "one"))
  out = job_proc.communicate(timeout=300)[0]
  logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
  assert job_proc.returncode == 0, out + "\n".join(log[-3000:] for log in logs)

  assert (tmp_path / "srun_argv").read_text().split() == [
      "--kill-on-bad-exit=1", "python", "-m", "mae_jax.main",
      f"--config=configs/tiny.py:{TINY_ARGS}", f"--workdir={tmp_path / 'two'}",
      *env["EXTRA_FLAGS"].split()]
  for i in range(2):
    lines = (tmp_path / f"task{i}.env").read_text().splitlines()
    task_env = dict(line.split("=", 1) for line in lines)
    assert task_env["SLURM_PROCID"] == str(i) and task_env["SLURM_NTASKS"] == "2"
    assert task_env["JAX_LOCAL_DEVICE_IDS"] == "0,1" and task_env["SRUN_CPUS_PER_TASK"] == "2"
    assert task_env["XLA_FLAGS"] == ("--xla_gpu_enable_latency_hiding_scheduler=true "
                                     "--xla_force_host_platform_device_count=2")
  assert "process 0 of 2, 2 local / 4 global devices" in logs[0]
  assert "on 4 devices, 2 process(es)" in logs[0] and "stopping at step 2" in logs[0]
  two = _tensorboard_losses(tmp_path / "two")
  one = dict(history)
  assert sorted(two) == sorted(one) == [1, 2]
  # Measured (2026-12-02): step 1 bit-identical, step 2 one float32 ulp apart (1.2e-7, relative
  # 9e-8): masks and data depend on global example ids only; the cross-process all-reduce may
  # add the shards in another order. The bound leaves 10x room.
  for step in (1, 2):
    assert abs(two[step] - one[step]) <= 1e-6 * abs(one[step]), (step, two[step], one[step])
  assert f"step 2/3  loss {one[2]:.4f}" in logs[0]


SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "launch"))
                 if f.endswith((".sh", ".sbatch")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_pass_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
  out = subprocess.run(["shellcheck", "-x", os.path.join("launch", script)], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False), ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_multihost_detection(env, expected):
  assert main.multihost_detected(env) is expected


def test_readme_run_estimates_are_what_estimate_py_prints(capsys):
  """The README's ViT-H/14 table (img/s, wall time, checkpoint, save time) is computed."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import estimate  # pylint: disable=import-outside-toplevel
  estimate.main([])
  table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert len(table) == 4 and all(line in readme for line in table), table
  config = estimate.importlib.import_module("configs.vit_h").get_config()
  slow = [estimate.estimate(config, devices, kind, 0.3, 1600, estimate.IMAGENET_TRAIN, 1.0)
          for devices, kind in estimate.TARGETS.values()]
  words = " ".join(readme.split())
  assert f"at 30% MFU the times are {slow[0]['hours']:.1f} h and {slow[1]['hours']:.1f} h" in words
  assert f"{slow[0]['gflop_per_image']:.1f} GFLOP per training image" in words
