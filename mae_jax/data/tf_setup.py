"""TensorFlow for the input pipeline: imported on first use, never on an accelerator."""

import functools
import threading


@functools.cache
def tf_modules():
  """(tensorflow, tensorflow_datasets), imported on first use with GPUs and TPUs hidden from TF."""
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:  # TF must never take accelerator memory: JAX owns it
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # no such device type, or TF already initialised
      pass
  import tensorflow_datasets as tfds
  return tf, tfds


def randint(tf, u, n):
  """floor(u * n) for u in [0, 1), clamped against float rounding: an int in [0, n)."""
  return tf.minimum(tf.cast(tf.floor(u * tf.cast(n, tf.float32)), tf.int32), n - 1)


def discard(box):
  """Delete what the list `box` holds (tf.data iterators) in a background thread.

  Deleting a tf.data iterator waits for its autotune thread to wake up, and that thread sleeps
  longer the longer the iterator lived (the gap doubles from 10 ms): an epoch's iterator
  deleted on the training thread stalled one step by 20-55 s at some epoch boundaries. `box`
  must hold the only references (drop attributes and locals before the call). One short-lived
  thread per call, so a deletion that waits does not hold up the next one.
  """
  threading.Thread(target=box.clear, name="tf_iterator_reaper", daemon=True).start()
