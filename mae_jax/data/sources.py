"""Where examples come from: prepared TFDS datasets and image folders.

An image folder serves any positions of one global epoch order (`global_order`): each
process takes its slots of the global batches, so what a global batch holds does not
depend on the process count. A TFDS split is read sequentially: each process reads its
own contiguous part (`tfds.even_splits`) in its own order, so processes read disjoint
examples that together cover the split, but the order depends on the process count.
Evaluation reads contiguous parts of both. `check_data` validates `config.data` before
anything is compiled.
"""

import collections
import functools
import logging
import os

import numpy as np

from mae_jax.data import arrays, order, random_access
from mae_jax.data.crops import CROPS
from mae_jax.data.photos import BUNDLED, bundled_photos
from mae_jax.data.tf_setup import tf_modules

log = logging.getLogger(__name__)

FOLDER = "image_folder"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

IMAGENET_HOW_TO = (
    "To prepare imagenet2012 (once, ~150 GB, hours): download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org/download-images into a folder MANUAL, "
    "then run `tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL` (or set "
    "--config.data.manual_dir=MANUAL and the first single-process run prepares it), and "
    "train with --config.data.data_dir=DATA_DIR.")


# Real listings made per folder root in this process (a listing is cached for the run).
LISTINGS = collections.Counter()


@functools.cache
def list_image_folder(root):
  """(paths, labels, class names) tuples of `root/<class>/<image>`, sorted; classes sorted by
  name. Listed once per root and process: training, evaluation and the probes share it (a
  folder on a network file system takes minutes to list at ImageNet size)."""
  tf, _ = tf_modules()
  LISTINGS[root] += 1
  expected = (f"expected a folder tree root/<class>/<image> with images ending in "
              f"{', '.join(IMAGE_EXTENSIONS)}")
  if not root:
    raise ValueError(f"config.data.dataset={FOLDER!r} needs config.data.folder; {expected}")
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"config.data.folder={root} does not exist or is not a folder; "
                            f"{expected}")
  classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted(tf.io.gfile.listdir(os.path.join(root, name))):
      if file.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, name, file))
        labels.append(label)
  if not paths:
    raise FileNotFoundError(f"config.data.folder={root} holds no images ({len(classes)} class "
                            f"folders found); {expected}")
  return tuple(paths), tuple(labels), tuple(classes)


class FolderSource(order.IndexedSource):
  """An image folder: this process's contiguous share, and any slice of a global order.

  `files` = (paths, labels, classes) replaces the listing of `root`: a fixed subset of it
  in a fixed order (the probe sets of `mae_jax.evaluators`). `start` is the position of
  this process's first example in the whole listing. `epoch_order` / `records_at` serve
  the training iterator's global order (each process reads only its own examples).
  """

  def __init__(self, root, process_index, process_count, files=None):
    self.root = root
    paths, labels, self.classes = files or list_image_folder(root)
    self.all_paths, self.all_labels = np.array(paths), np.array(labels, np.int64)
    self.total_examples = len(paths)
    self._share(process_index, process_count)

  def records_at(self, ids):
    """(path, label) dataset of the listing's examples `ids`, in that order."""
    tf, _ = tf_modules()
    return tf.data.Dataset.from_tensor_slices((self.all_paths[ids], self.all_labels[ids]))

  def load(self, payload, label):
    """(encoded image, label) of a record: the file's bytes."""
    return tf_modules()[0].io.read_file(payload), label

  def describe(self):
    return f"image folder {self.root}"


class TfdsSource:
  """This process's share (`tfds.even_splits`) of a prepared TFDS split, images left encoded."""

  global_order = False  # read sequentially (files + shuffle buffer), no random access

  def __init__(self, builder, data, split, process_index, process_count):
    _, tfds = tf_modules()
    self.builder = builder  # from `tfds_builder`
    if not self.builder.is_prepared():  # several processes must not prepare one data_dir
      raise FileNotFoundError(f"{data.dataset} is not prepared in {self.builder.data_dir} and "
                              f"{process_count} processes cannot prepare it together; prepare "
                              f"it first. {IMAGENET_HOW_TO}")
    _check_split(self.builder, split, data)
    shares = tfds.even_splits(split, n=process_count)
    self.split = shares[process_index]
    self.num_examples = self.builder.info.splits[self.split].num_examples
    self.start = sum(self.builder.info.splits[s].num_examples for s in shares[:process_index])
    self.total_examples = self.builder.info.splits[split].num_examples
    self.image_key, self.label_key = self.builder.info.supervised_keys or ("image", "label")
    self.shuffle_buffer = data.shuffle_buffer

  def records(self, epoch_seed, shuffle=True):
    """(encoded image, label) dataset in epoch order: files shuffled, then a shuffle buffer."""
    tf, tfds = tf_modules()
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, try_autocache=False,
                                  skip_prefetch=True, options=options)
    ds = self.builder.as_dataset(split=self.split, shuffle_files=shuffle, read_config=read_config,
                                 decoders={self.image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[self.image_key], tf.cast(ex[self.label_key], tf.int64)))
    if shuffle and self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed)
    return ds

  def load(self, payload, label):
    return payload, label

  def describe(self):
    return f"{self.builder.name} {self.split} ({self.builder.data_dir})"


def tfds_builder(data, *, prepare=False):
  """The TFDS builder for `data.dataset`, prepared; one clear error if it cannot be."""
  tf, tfds = tf_modules()
  name, data_dir, manual_dir = data.dataset, data.data_dir, data.manual_dir
  how = IMAGENET_HOW_TO if name.startswith("imagenet2012") else (
      f"Prepare it on a machine with internet: `tfds build {name} --data_dir=DATA_DIR`, "
      f"then set --config.data.data_dir=DATA_DIR.")
  if data_dir and not tf.io.gfile.isdir(data_dir) and not manual_dir:
    raise FileNotFoundError(f"config.data.data_dir={data_dir} does not exist; expected a TFDS "
                            f"data_dir holding a prepared {name}. {how}")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.dataset={name!r} is unknown: expected {BUNDLED!r}, "
                     f"{FOLDER!r} (with config.data.folder), {arrays.ARRAYS!r} (with "
                     f"config.data.arrays) or a TFDS image classification "
                     f"dataset such as 'imagenet2012', 'imagenette', "
                     f"'imagenet2012_subset/1pct' ({str(e).splitlines()[0]})") from None
  if builder.is_prepared():
    return builder
  where = f"{builder.data_dir} (from config.data.data_dir={data_dir or '<TFDS default>'})"
  if not manual_dir:
    raise FileNotFoundError(f"{name} is not prepared: no dataset_info.json in {where}. {how}")
  _check_manual_dir(name, manual_dir)
  if not prepare:
    return builder
  if data.get("file_format") == random_access.ARRAY_RECORD:  # written for random access
    builder = tfds.builder(name, data_dir=data_dir or None,
                           file_format=random_access.ARRAY_RECORD)
  log.info("preparing %s from manual_dir=%s into %s (once)", name, manual_dir, builder.data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _check_manual_dir(name, manual_dir):
  tf, _ = tf_modules()
  needed = (["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
            if name.startswith("imagenet2012") else [])
  present = tf.io.gfile.isdir(manual_dir) and set(tf.io.gfile.listdir(manual_dir))
  missing = [f for f in needed if not present or f not in present]
  if not present or missing:
    raise FileNotFoundError(f"config.data.manual_dir={manual_dir} lacks {missing or 'files'}: "
                            f"expected the manually downloaded archives of {name}. "
                            + (IMAGENET_HOW_TO if needed else ""))


def _check_split(builder, split, data):
  for part in split.split("+"):
    if builder.info.splits and part.split("[")[0].strip() not in builder.info.splits:
      raise ValueError(f"config.data split {split!r} is not in {data.dataset} (data_dir="
                       f"{builder.data_dir}); it has {sorted(builder.info.splits)}")


def make_source(config, split, process_index, process_count, *, prepare=True):
  """The source of `split`: an image folder, a TFDS split by index (prepared as ArrayRecord,
  see `random_access`) or read sequentially (TFRecord)."""
  data = config.data
  if data.dataset == FOLDER:
    return FolderSource(data.folder, process_index, process_count)
  builder = tfds_builder(data, prepare=prepare and process_count == 1)
  if builder.is_prepared() and random_access.random_access(builder, data):
    _check_split(builder, split, data)
    return random_access.ArrayRecordSource(builder, split, process_index, process_count)
  return TfdsSource(builder, data, split, process_index, process_count)


def check_data(config):
  """Validate `config.data` before anything is compiled; one clear error naming what is wrong.

  Checks the crop mode and image size, that the folder holds images, or that the TFDS
  dataset exists and is prepared (or can be prepared from `data.manual_dir`) and has the
  split. Returns a one-line description of the source.
  """
  data = config.data
  if data.crop not in CROPS:
    raise ValueError(f"config.data.crop={data.crop!r}: expected one of {CROPS}")
  image_size(config)
  if data.get("per_class", 0) and data.dataset != arrays.ARRAYS:
    raise ValueError(f"config.data.per_class={data.per_class} is read by dataset="
                     f"{arrays.ARRAYS!r} only (config.data.dataset={data.dataset!r}); for an "
                     "image folder write the subset with python -m mae_jax.data.idx --per_class")
  if data.dataset != arrays.ARRAYS and config.model.in_chans != 3:
    raise ValueError(f"config.model.in_chans={config.model.in_chans}: dataset="
                     f"{data.dataset!r} delivers RGB images (grey ones repeated): expected 3; "
                     f"one grey channel is read from dataset={arrays.ARRAYS!r} (grey arrays)")
  if data.dataset == BUNDLED:
    return f"{len(bundled_photos())} bundled photos"
  if data.dataset == FOLDER:
    paths, _, classes = list_image_folder(data.folder)
    return f"{len(paths)} images in {len(classes)} classes under {data.folder}"
  if data.dataset == arrays.ARRAYS:
    arrays.check_augment(data)
    arrays.check_channels(config.model.in_chans, arrays.train_arrays(data))
    if data.get("eval_arrays"):
      arrays.check_channels(config.model.in_chans, arrays.eval_arrays(data))
    return arrays.train_arrays(data).description
  builder = tfds_builder(data)
  if not builder.is_prepared():
    return f"{data.dataset}, to be prepared from {data.manual_dir} into {builder.data_dir}"
  _check_split(builder, data.split, data)
  how = ("ArrayRecord, one global order" if random_access.random_access(builder, data)
         else "TFRecord, read in order per process")
  return (f"{data.dataset} {data.split}: {builder.info.splits[data.split].num_examples} "
          f"examples ({how})")



def epoch_examples(config, *, process_count=None):
  """(examples in one epoch, where that number comes from).

  `config.data.num_train_examples` when > 0; else the size of `data.split`: the bundled
  photos, the images in `data.folder`, or the TFDS split info (sub-splits such as
  `train[:10%]` counted as TFDS reads them). An unprepared TFDS dataset with a
  `data.manual_dir` is prepared here (one process only), as reading it would.
  """
  data = config.data
  if data.get("num_train_examples", -1) > 0:
    return data.num_train_examples, "set by config.data.num_train_examples"
  if data.dataset == BUNDLED:
    return len(bundled_photos()), "the bundled photos"
  if data.dataset == FOLDER:
    return len(list_image_folder(data.folder)[0]), "counted in the image folder"
  if data.dataset == arrays.ARRAYS:
    return len(arrays.train_arrays(data)), f"the images in {data.arrays}"
  if process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_count = jax.process_count()
  builder = tfds_builder(data, prepare=process_count == 1)
  if not builder.is_prepared():
    raise FileNotFoundError(f"{data.dataset} is not prepared in {builder.data_dir} and "
                            f"{process_count} processes cannot prepare it together to count "
                            f"config.data.split={data.split!r}; prepare it first, or set "
                            f"config.data.num_train_examples. {IMAGENET_HOW_TO}")
  _check_split(builder, data.split, data)
  return (builder.info.splits[data.split].num_examples,
          f"TFDS split info of {data.dataset} {data.split}")


def fill_epoch_length(config, *, process_count=None):
  """Set `config.data.num_train_examples` from the data unless it is > 0; says which it is."""
  examples, origin = epoch_examples(config, process_count=process_count)
  config.data.num_train_examples = examples
  return f"epoch = {examples:,} examples ({origin})"


def image_size(config):
  size = config.model.img_size
  if not isinstance(size, int):
    raise ValueError(f"the input pipelines make square crops; config.model.img_size="
                     f"{size} must be an int")
  return size


def dataset_info(config, split=None):
  """(number of examples in `split` (default data.split), number of classes or None)."""
  data = config.data
  if data.dataset == BUNDLED:
    return len(bundled_photos()), None
  if data.dataset == FOLDER:
    paths, _, classes = list_image_folder(data.folder)
    return len(paths), len(classes)
  if data.dataset == arrays.ARRAYS:
    source = (arrays.eval_arrays(data) if split and split == data.eval_split
              else arrays.train_arrays(data))
    return len(source), source.num_classes
  builder = tfds_builder(data)
  split = split or data.split
  _check_split(builder, split, data)
  _, label_key = builder.info.supervised_keys or ("image", "label")
  feature = builder.info.features[label_key] if label_key in builder.info.features else None
  return builder.info.splits[split].num_examples, getattr(feature, "num_classes", None)
