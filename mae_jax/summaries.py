"""TensorBoard event files written with the `tensorboard` package alone.

tensorboard's EventFileWriter goes through `tensorboard.compat.tf`, which imports
TensorFlow when installed (and TF may grab accelerator memory), so we write the
record file ourselves with its pure-Python RecordWriter.

Every write is flushed: TensorBoard shows a run while it trains, and a run
killed with SIGKILL (OOM killer, preemption without notice) keeps every
interval it logged. The writer is called once per log interval, so this costs
nothing measurable.
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
  """Scalars and images to `logdir`; a no-op when `enabled` is False (non-zero processes).

  `logdir` may be local or `gs://...` (through epath). Each `scalars` / `image`
  call is flushed to the file object at once: locally it is in the file for
  TensorBoard (and survives a kill of the process) as soon as the call returns.
  On GCS an object becomes visible when the backend uploads it (tf.io.gfile
  uploads on flush; fsspec only on close).
  """

  def __init__(self, logdir, enabled=True):
    self._writer = None
    self.path = None
    if enabled:
      logdir = epath.Path(logdir)  # local paths or gs:// alike
      logdir.mkdir(parents=True, exist_ok=True)
      now = time.time()
      path = logdir / f"events.out.tfevents.{now:.6f}.{socket.gethostname()}"
      self.path = os.fspath(path)
      self._writer = RecordWriter(path.open("wb"))
      self._add(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _add(self, event):
    self._writer.write(event.SerializeToString())
    self._writer.flush()  # buffered bytes are lost on SIGKILL and invisible to TensorBoard

  def _write(self, step, values):
    if self._writer is not None:
      self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def scalars(self, step, scalars):
    """One event at `step` with a float scalar per `{tag: value}` entry."""
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                       for k, v in scalars.items()])

  def image(self, step, tag, image):
    """uint8 (H, W, 3) image."""
    image = np.asarray(image)
    encoded = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                        colorspace=3, encoded_image_string=png_bytes(image))
    self._write(step, [summary_pb2.Summary.Value(tag=tag, image=encoded)])

  def flush(self):
    """Push written events to the file (every write already does)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    """Close the event file; later writes are ignored. Safe to call twice."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
    return False


def read_events(path):
  """All `event_pb2.Event`s of one event file, checksums verified (for tests and tools).

  A record cut short at the end (a process killed mid-write) ends the list, as in
  TensorBoard's own reader; a checksum mismatch raises.
  """
  events = []
  with open(path, "rb") as f:
    while len(header := f.read(12)) == 12:
      length, header_crc = struct.unpack("<QI", header)
      if masked_crc32c(header[:8]) != header_crc:
        raise ValueError(f"corrupt record header in {path} at byte {f.tell() - 12}")
      data, footer = f.read(length), f.read(4)
      if len(data) < length or len(footer) < 4:
        break
      if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"corrupt record in {path} at byte {f.tell() - length - 16}")
      events.append(event_pb2.Event.FromString(data))
  return events
