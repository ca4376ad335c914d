"""TFDS datasets prepared as ArrayRecord, read by index through `tfds.data_source`.

Random access gives a TFDS split the global order of image folders (`order`): every process
reads only its slots of each global batch, so global batches, augmentation draws and the
loss curve do not depend on the process count, and a mid-epoch state resumes exactly on
another process count. Records are read by index inside the tf.data map (their images stay
encoded; the fused decode + crop and every augmentation are the same TF ops as for folders).

Why not grain's loader: its workers would run our TF decode / augmentation ops eagerly (or
need a numpy twin of each), and its checkpoint state is per process; the order here is ours,
so only the reading is needed, and `tfds.data_source` (array_record underneath) gives it.
"""

import numpy as np

from mae_jax.data import order
from mae_jax.data.tf_setup import tf_modules

ARRAY_RECORD = "array_record"
FILE_FORMATS = ("auto", ARRAY_RECORD, "tfrecord")


def formats_of(builder):
  """The file formats `builder` is prepared in, as strings."""
  info = builder.info
  formats = getattr(info, "available_file_formats", lambda: {info.file_format})()
  return {getattr(f, "value", str(f)) for f in formats if f}


def random_access(builder, data):
  """True when `builder` should be read by index: `data.file_format` (auto | array_record |
  tfrecord) and what the prepared dataset holds; a clear error when they disagree."""
  wanted = data.get("file_format", "auto")
  if wanted not in FILE_FORMATS:
    raise ValueError(f"config.data.file_format={wanted!r}: expected one of {FILE_FORMATS}")
  have = formats_of(builder)
  if wanted == ARRAY_RECORD and ARRAY_RECORD not in have:
    raise ValueError(
        f"config.data.file_format='array_record' but {builder.name} in {builder.data_dir} is "
        f"prepared as {sorted(have) or 'nothing'}: prepare it with `tfds build {builder.name} "
        f"--file_format=array_record --data_dir=DATA_DIR` (or convert it: `tfds "
        f"convert_format --root_data_dir=DATA_DIR --out_file_format=array_record`)")
  return wanted != "tfrecord" and ARRAY_RECORD in have


class ArrayRecordSource(order.IndexedSource):
  """A TFDS split prepared as ArrayRecord: any slice of the global order, read by index."""

  def __init__(self, builder, split, process_index, process_count):
    _, tfds = tf_modules()
    self.builder, self.split = builder, split
    self.image_key, self.label_key = builder.info.supervised_keys or ("image", "label")
    self.records_by_index = builder.as_data_source(
        split, decoders={self.image_key: tfds.decode.SkipDecoding()},
        file_format=ARRAY_RECORD)
    self.total_examples = len(self.records_by_index)
    self._share(process_index, process_count)

  def _read(self, index):
    record = self.records_by_index[int(index)]
    return record[self.image_key], np.int64(record[self.label_key])

  def records_at(self, ids):
    """(index, placeholder label) dataset of the split's examples `ids`; `load` reads them."""
    tf, _ = tf_modules()
    ids = np.asarray(ids, np.int64)
    return tf.data.Dataset.from_tensor_slices((ids, np.zeros(len(ids), np.int64)))

  def load(self, payload, label):
    """(encoded image, label) of record `payload` (its index)."""
    del label
    tf, _ = tf_modules()
    image, label = tf.numpy_function(self._read, [payload], (tf.string, tf.int64),
                                     stateful=False)
    image.set_shape([])
    label.set_shape([])
    return image, label

  def describe(self):
    return f"{self.builder.name} {self.split} (ArrayRecord, {self.builder.data_dir})"
