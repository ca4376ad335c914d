"""TensorFlow for the input pipeline: imported on first use, never on an accelerator."""

import functools


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
