"""Two real processes on localhost (jax.distributed, 4 fake CPU devices each)."""

import os
import re
import signal
import socket
import sys
import time

import numpy as np
import pytest
from PIL import Image

import mae_jax
from configs import tiny
from mae_jax import checkpointing
from mae_jax import data as mae_data
from mae_jax.imaging import center_crop
from test_kill import (TINY_ARGS, Run, assert_bitwise_equal, assert_same_logs, check_consistent,
                       final_arrays, history, save_in_flight)

STEPS = 12
# Saves every 4 steps, a multiple of log_every: logged intervals line up across resumes.
SCHEDULE = (f"--config.total_steps={STEPS}", "--config.log_every=2",
            "--config.checkpoint.every_steps=4")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, *flags, processes=2, batch=16):
  """`processes` runs of one job (each with 8 / processes fake CPU devices), as [Run]."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
             JAX_PLATFORMS="cpu", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
  multihost = lambda i: (["--multihost", f"--coordinator_address=localhost:{port}",
                          f"--num_processes={processes}", f"--process_id={i}"]
                         if processes > 1 else [])
  return [Run([sys.executable, "-m", "mae_jax.main", f"--config=configs/tiny.py:{TINY_ARGS}",
               f"--workdir={workdir}", *multihost(i), "--config.warmup_steps=2",
               f"--config.batch_size={batch}", "--config.mesh.fsdp=2",
               "--config.image_every=-1", *flags], env)
          for i in range(processes)]


def _finish(runs, timeout=600):
  """Every process's output once all exited with status 0."""
  results = [run.finish(timeout) for run in runs]
  for i, (code, out) in enumerate(results):
    assert code == 0, f"process {i}:\n{out[-3000:]}"
  return [out for _, out in results]


def _kill_all(runs):
  """SIGKILL every process of the job at once (one left alone would block in a collective)."""
  for run in runs:
    os.kill(run.proc.pid, signal.SIGKILL)
  for run in runs:
    run.kill()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """(workdir, outputs) of an uninterrupted 2-process run on the bundled photos."""
  workdir = tmp_path_factory.mktemp("two_processes")
  return workdir, _finish(_launch(workdir, *SCHEDULE))


def test_two_processes_train_checkpoint_once_and_restore(two_process_run):
  workdir, outs = two_process_run
  # each process feeds its own half of every global batch
  feeds = [re.search(r"process (\d)/2 feeds 8 of 16 examples per step, first global ids "
                     r"\[([0-9, ]+)\]", out) for out in outs]
  assert all(feeds), outs
  ids = [tuple(map(int, f.group(2).split(","))) for f in feeds]
  assert ids[0] != ids[1] and not set(ids[0]) & set(ids[1])
  # logging only on process 0; the loop ran on the 8-device global mesh
  assert f"step {STEPS}/{STEPS}" in outs[0] and f"step {STEPS}/{STEPS}" not in outs[1]
  assert "on 8 devices, 2 process(es)" in outs[0]
  # each checkpoint written once (no per-process copies), restorable by one process
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["4", "8", "12"]
  assert len(os.listdir(workdir / "tensorboard")) == 1
  assert checkpointing.latest_step(workdir) == STEPS
  meta = checkpointing.restore(workdir)[0]["meta"]  # each process's own data position
  assert meta["data_per_process"] == [{"step": STEPS}] * 2 and meta["data"] == {"step": STEPS}
  loaded = mae_jax.load(workdir)
  images = mae_data.preview_images(2, 32)
  loss = float(loaded.loss(images, noise=np.random.default_rng(0).random((2, 16), np.float32)))
  assert np.isfinite(loss) and loaded.step == STEPS


def test_two_processes_give_the_one_process_loss_curve(two_process_run, tmp_path):
  """Masks and data order do not depend on the process count: 1 process, same global batch.

  The same (4, 2) mesh on 8 devices of one process. Measured over 12 steps: every logged
  loss and grad_norm identical, params within 1.7e-5 (one process on 1 device: losses
  within 4.1e-7 relative, params 3.2e-5). Not bit for bit: the cross-process all-reduce
  sums in another order, and Adam turns the rounding noise of gradients that are zero in
  exact arithmetic (the attention key bias) into steps of up to lr.
  """
  workdir, _ = two_process_run
  _finish(_launch(tmp_path, *SCHEDULE, processes=1))
  assert _assert_same_curves(history(tmp_path), history(workdir)) == list(range(2, STEPS + 1, 2))
  got, want = final_arrays(tmp_path, ("params",)), final_arrays(workdir, ("params",))
  print("params: largest difference "
        f"{max(np.max(np.abs(a - b)) for a, b in zip(got['params'], want['params'])):.2g}")
  for a, b in zip(got["params"], want["params"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_two_processes_killed_twice_resume_exactly(two_process_run, tmp_path):
  """kill -9 of both processes at once, twice; the result is the uninterrupted run's, bit for bit.

  The bundled photos: every process's stream is a pure function of the step, so resuming
  at steps 4 and 8 (mid-epoch of the schedule) exercises state, optimizer, masks and data.
  """
  reference, _ = two_process_run
  rng = np.random.default_rng(7)
  report = []
  # 1: while the async save of step 8 is being written (resumes from step 4)
  runs = _launch(tmp_path, *SCHEDULE)
  assert runs[0].wait_until(save_in_flight(tmp_path, 8)), runs[0].output()[-3000:]
  time.sleep(rng.uniform(0, 0.05))
  _kill_all(runs)
  report.append((checkpointing.latest_step(tmp_path), runs[0].last_line()))
  # 2: between steps, once step 8 is committed (resumes from step 8)
  runs = _launch(tmp_path, *SCHEDULE)
  assert runs[0].wait_until(lambda: os.path.isdir(tmp_path / "checkpoints" / "8")), (
      runs[0].output()[-3000:])
  time.sleep(rng.uniform(0, 0.5))
  assert all(run.running() for run in runs), "the run ended before the second kill"
  _kill_all(runs)
  report.append((checkpointing.latest_step(tmp_path), runs[0].last_line()))
  print("\n".join(f"kill {i + 1}: latest checkpoint {step}, last line {line[:100]!r}"
                  for i, (step, line) in enumerate(report)))
  assert [step for step, _ in report] == [4, 8]
  outs = _finish(_launch(tmp_path, *SCHEDULE))
  assert f"resuming from {tmp_path}/checkpoints/8" in outs[0]
  steps, tmp = check_consistent(tmp_path)
  assert steps == [4, 8, STEPS] and not tmp
  assert_bitwise_equal(final_arrays(tmp_path), final_arrays(reference))
  assert_same_logs(tmp_path, reference)


def _write_folder(root, count=19):
  """`count` small photos in two classes: uneven shards (10 and 9) for 2 processes."""
  photos = mae_data.bundled_photos()
  for i in range(count):
    os.makedirs(root / f"c{i % 2}", exist_ok=True)
    Image.fromarray(center_crop(photos[i % len(photos)], 48)).save(root / f"c{i % 2}/{i}.png")
  return root


def _assert_same_curves(one, two, tags=("loss", "grad_norm", "lr")):
  """Every logged value of `tags` within rtol 1e-6 (the all-reduce order differs)."""
  assert set(two) == set(one)
  steps = sorted({step for step, _ in two})
  for tag in tags:
    a, b = (np.array([curve[s, tag] for s in steps]) for curve in (one, two))
    print(f"{tag}: largest relative difference {np.max(np.abs(a - b) / np.abs(b)):.2g}")
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=tag)
  return steps


def test_image_folder_two_processes_resume_mid_epoch_and_give_the_one_process_curve(tmp_path):
  """tf.data sources: the global order is sliced per process; resume is exact, mid-epoch.

  19 photos in a folder, global batch 8 (4 per process): epochs end mid-batch and the
  processes hold different numbers of each epoch's examples. Stopped at step 6, the same
  command resumes and stops at 12 (stop_after_steps counts the steps of one job); each
  process's saved position equals that of its own uninterrupted iterator, and the 2-process
  losses equal those of one process on the same global batch (the data order and the
  augmentation do not depend on the process count).
  """
  folder = _write_folder(tmp_path / "images")
  flags = ("--config.total_steps=100", "--config.log_every=2",
           "--config.checkpoint.every_steps=4", "--config.stop_after_steps=6",
           "--config.data.dataset=image_folder", f"--config.data.folder={folder}",
           "--config.data.num_parallel_calls=1")
  workdir = tmp_path / "run"
  outs = _finish(_launch(workdir, *flags, batch=8))
  assert "stopping at step 6 (stop_after_steps)" in outs[0]
  outs = _finish(_launch(workdir, *flags, batch=8))
  assert f"resuming from {workdir}/checkpoints/6" in outs[0]
  assert "stopping at step 12 (stop_after_steps)" in outs[0]
  one = tmp_path / "one"
  _finish(_launch(one, *flags[:3], "--config.stop_after_steps=12", *flags[4:], batch=8,
                  processes=1))
  assert _assert_same_curves(history(one), history(workdir)) == list(range(2, 13, 2))
  config = tiny.get_config(TINY_ARGS)
  config.batch_size = 8
  config.data.update(dataset="image_folder", folder=str(folder), num_parallel_calls=1)
  iterators = [mae_data.create_pretrain_iterator(config, process_index=i, process_count=2)
               for i in (0, 1)]
  done = 0
  for step in (6, 12):
    saved = checkpointing.restore(workdir, step)[0]["meta"]["data_per_process"]
    for process, batches in enumerate(iterators):
      for _ in range(step - done):
        next(batches)
      assert saved[process] == batches.state(), (step, process)
      assert saved[process]["position"] > 0  # mid-epoch
    done = step
  assert [p["epoch"] for p in saved] == [4, 5]  # epoch boundaries crossed after the resume


def test_two_processes_agree_on_the_stop_step_after_sigusr1(tmp_path):
  """SLURM's --signal=USR1 reaches every task; all processes stop at the same step."""
  runs = _launch(tmp_path, "--config.total_steps=100000", "--config.log_every=5",
                 "--config.checkpoint.every_steps=100000")
  assert runs[0].wait_until(lambda: runs[0].seen("step 10/100000")), runs[0].output()[-3000:]
  for run in runs:
    run.proc.send_signal(signal.SIGUSR1)
  outs = _finish(runs, timeout=300)
  step = checkpointing.latest_step(tmp_path)
  assert step is not None and step >= 10 and step % 5 == 0  # agreed at a log interval
  assert f"stopping at step {step} (signal)" in outs[0]
