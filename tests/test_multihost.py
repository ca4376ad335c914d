"""Two real processes on localhost (jax.distributed, 4 fake CPU devices each)."""

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np

import mae_jax
from mae_jax import checkpointing
from mae_jax import data as mae_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ("img_size=32,embed_dim=32,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
             "decoder_num_heads=4,num_preview_images=2")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, *flags):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return [subprocess.Popen(
      [sys.executable, "-m", "mae_jax.main", f"--config=configs/tiny.py:{TINY_ARGS}",
       f"--workdir={workdir}", "--multihost", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}", "--config.warmup_steps=2",
       "--config.batch_size=16", "--config.mesh.fsdp=2", "--config.image_every=-1", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def test_two_processes_train_checkpoint_once_and_restore(tmp_path):
  procs = _launch(tmp_path, "--config.total_steps=6", "--config.log_every=2")
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  # each process feeds its own half of every global batch
  feeds = [re.search(r"process (\d)/2 feeds 8 of 16 examples per step, first global ids "
                     r"\[([0-9, ]+)\]", out) for out in outs]
  assert all(feeds), outs
  ids = [tuple(map(int, f.group(2).split(","))) for f in feeds]
  assert ids[0] != ids[1] and not set(ids[0]) & set(ids[1])
  # logging only on process 0; the loop ran on the 8-device global mesh
  assert "step 6/6" in outs[0] and "step 6/6" not in outs[1]
  assert "on 8 devices, 2 process(es)" in outs[0]
  # one checkpoint, written once (no per-process copies), restorable by one process
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]
  assert len(os.listdir(tmp_path / "tensorboard")) == 1
  assert checkpointing.latest_step(tmp_path) == 6
  meta = checkpointing.restore(tmp_path)[0]["meta"]  # each process's own data position
  assert meta["data_per_process"] == [{"step": 6}, {"step": 6}] and meta["data"] == {"step": 6}
  loaded = mae_jax.load(tmp_path)
  images = mae_data.preview_images(2, 32)
  loss = float(loaded.loss(images, noise=np.random.default_rng(0).random((2, 16), np.float32)))
  assert np.isfinite(loss) and loaded.step == 6


def test_two_processes_agree_on_the_stop_step_after_sigusr1(tmp_path):
  """SLURM's --signal=USR1 reaches every task; all processes stop at the same step."""
  procs = _launch(tmp_path, "--config.total_steps=100000", "--config.log_every=5",
                  "--config.checkpoint.every_steps=100000")
  seen = []
  while not any("step 10/100000" in line for line in seen):
    line = procs[0].stdout.readline()
    assert line or procs[0].poll() is None, "".join(seen[-30:])
    seen.append(line)
  for p in procs:
    p.send_signal(signal.SIGUSR1)
  outs = ["".join(seen) + procs[0].communicate(timeout=300)[0],
          procs[1].communicate(timeout=300)[0]]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  step = checkpointing.latest_step(tmp_path)
  assert step is not None and step >= 10 and step % 5 == 0  # agreed at a log interval
  assert f"stopping at step {step} (signal)" in outs[0]
