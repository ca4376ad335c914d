import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mae_jax import summaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensorboard_scalars(path, tag):
  """[(step, value)] of `tag` as TensorBoard itself reads the event file."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  accumulator = event_accumulator.EventAccumulator(path)
  accumulator.Reload()
  return [(e.step, e.value) for e in accumulator.Scalars(tag)], accumulator


def test_unclosed_writer_is_already_on_disk(tmp_path):
  writer = summaries.SummaryWriter(tmp_path / "tb")
  for step in (10, 20, 30):
    writer.scalars(step, {"loss": 1.0 / step, "lr": 0.5})
  writer.image(30, "reconstructions", np.zeros((8, 16, 3), np.uint8))
  # Not closed: everything must already be in the file.
  scalars, accumulator = _tensorboard_scalars(writer.path, "loss")
  assert scalars == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)),
                     (30, pytest.approx(1 / 30))]
  image, = accumulator.Images("reconstructions")
  assert (image.step, image.width, image.height) == (30, 16, 8)
  assert [e.step for e in summaries.read_events(writer.path)] == [0, 10, 20, 30, 30]
  writer.close()


def test_sigkill_keeps_every_logged_interval(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal
      from mae_jax import summaries
      writer = summaries.SummaryWriter({str(tmp_path / "tb")!r})
      for step in (1, 2, 3):
        writer.scalars(step, {{"loss": step / 10}})
      print(writer.path, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  path = proc.stdout.strip()
  assert os.path.getsize(path) > 0
  scalars, _ = _tensorboard_scalars(path, "loss")
  assert scalars == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]


def test_context_manager_closes_and_disabled_writer_is_a_noop(tmp_path):
  with summaries.SummaryWriter(tmp_path / "tb") as writer:
    writer.scalars(1, {"loss": 2.0})
  writer.scalars(2, {"loss": 1.0})  # after close: ignored, no error
  writer.close()
  assert [e.step for e in summaries.read_events(writer.path)] == [0, 1]
  off = summaries.SummaryWriter(tmp_path / "off", enabled=False)
  off.scalars(1, {"loss": 1.0})
  off.image(1, "x", np.zeros((2, 2, 3), np.uint8))
  off.flush()
  off.close()
  assert off.path is None and not (tmp_path / "off").exists()


def test_read_events_stops_at_a_cut_record_and_rejects_a_corrupt_one(tmp_path):
  with summaries.SummaryWriter(tmp_path) as writer:
    writer.scalars(1, {"loss": 1.0})
    writer.scalars(2, {"loss": 0.5})
  data = open(writer.path, "rb").read()
  with open(writer.path, "wb") as f:
    f.write(data[:-3])  # the last record cut short, as by a kill mid-write
  assert [e.step for e in summaries.read_events(writer.path)] == [0, 1]
  with open(writer.path, "wb") as f:
    f.write(data[:-6] + bytes([data[-6] ^ 1]) + data[-5:])  # one flipped payload bit
  with pytest.raises(ValueError, match="corrupt record"):
    summaries.read_events(writer.path)
