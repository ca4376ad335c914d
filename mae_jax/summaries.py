"""TensorBoard event files written with the `tensorboard` package alone.

tensorboard's EventFileWriter goes through `tensorboard.compat.tf`, which imports
TensorFlow when installed (and TF may grab accelerator memory), so we write the
record file ourselves with its pure-Python RecordWriter.
"""

import io
import os
import socket
import struct
import time

import numpy as np
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter, masked_crc32c


def png_bytes(image):
  """uint8 (H, W, 3) -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


class SummaryWriter:
  """Scalars and images to `logdir`; a no-op when `enabled` is False (non-zero processes)."""

  def __init__(self, logdir, enabled=True):
    self._writer = None
    if enabled:
      logdir = epath.Path(logdir)  # local paths or gs:// alike
      logdir.mkdir(parents=True, exist_ok=True)
      now = time.time()
      path = logdir / f"events.out.tfevents.{now:.6f}.{socket.gethostname()}"
      self._writer = RecordWriter(path.open("wb"))
      self._add(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))
    self.path = os.fspath(path) if enabled else None

  def _add(self, event):
    self._writer.write(event.SerializeToString())

  def _write(self, step, values):
    if self._writer is not None:
      self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def scalars(self, step, scalars):
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                       for k, v in scalars.items()])

  def image(self, step, tag, image):
    """uint8 (H, W, 3) image."""
    image = np.asarray(image)
    encoded = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                        colorspace=3, encoded_image_string=png_bytes(image))
    self._write(step, [summary_pb2.Summary.Value(tag=tag, image=encoded)])

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_events(path):
  """All `event_pb2.Event`s of one event file, checksums verified (for tests and tools)."""
  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      length, header_crc = struct.unpack("<QI", header)
      data, (data_crc,) = f.read(length), struct.unpack("<I", f.read(4))
      if masked_crc32c(header[:8]) != header_crc or masked_crc32c(data) != data_crc:
        raise ValueError(f"corrupt record in {path}")
      events.append(event_pb2.Event.FromString(data))
  return events
