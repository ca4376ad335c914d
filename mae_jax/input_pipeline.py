"""Input pipelines: TFDS datasets (ImageNet), image folders and the bundled photo set.

The only module that imports tensorflow / tensorflow_datasets, lazily (`_tf()`), with every
accelerator hidden from TF first, so the bundled photos never load TF at all.

Pre-training augmentation follows the paper: RandomResizedCrop (scale (0.2, 1), ratio
(3/4, 4/3), bicubic) + horizontal flip, ImageNet mean/std (on device when batches ship as
uint8). Every random draw is keyed by (seed, process, epoch, position in the epoch), so
the stream of a process is a pure function of those and the iterator position
(`state()`: step, epoch, position, skip count) restores to the exact next batch.

Sources (`config.data.dataset`):
- a TFDS name (`imagenet2012`, `imagenette`, `imagenet2012_subset/1pct`, ...) read from a
  prepared `data.data_dir`; `imagenet2012` can be prepared from `data.manual_dir`;
- `image_folder`: `data.folder/<class>/<image>` (local or gs://);
- `bundled_photos`: 18 photos shipped with scikit-image (numpy + PIL, no TF).
Each process reads its own contiguous part of the split (`tfds.even_splits`), so
processes read disjoint examples that together cover the split.
"""

import concurrent.futures
import functools
import logging
import math
import os

import numpy as np

from mae_jax.imaging import IMAGENET_MEAN, IMAGENET_STD, center_crop, load_image, normalize, resize

log = logging.getLogger(__name__)

BUNDLED = "bundled_photos"
FOLDER = "image_folder"
CROPS = ("random_resized", "fixed_size", "center")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
EVAL_CROP_FRACTION = 224 / 256  # eval: resize the shorter side to size / this, centre crop

IMAGENET_HOW_TO = (
    "To prepare imagenet2012 (once, ~150 GB, hours): download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org/download-images into a folder MANUAL, "
    "then run `tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL` (or set "
    "--config.data.manual_dir=MANUAL and the first single-process run prepares it), and "
    "train with --config.data.data_dir=DATA_DIR.")

# Real photographs (and micrographs) shipped inside scikit-image; synthetic
# images (chessboard, logo, phantom, ...), tiny ones and near-duplicates are left out.
BUNDLED_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png",
)


# ----------------------------------------------------------------------------- TF


@functools.cache
def _tf():
  """(tensorflow, tensorflow_datasets), imported on first use with GPUs and TPUs hidden from TF."""
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:  # TF must never take accelerator memory: JAX owns it
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # no such device type, or TF already initialised
      pass
  import tensorflow_datasets as tfds
  return tf, tfds


# ------------------------------------------------------------------- bundled photos


@functools.cache
def bundled_photos():
  """The bundled photos as a tuple of (H, W, 3) uint8 arrays (grayscale ones made RGB)."""
  try:
    import skimage
  except ImportError as e:
    raise ImportError("the bundled photo set needs scikit-image (pip install "
                      "scikit-image==0.26.0)") from e
  root = os.path.join(os.path.dirname(skimage.__file__), "data")
  photos = []
  for name in BUNDLED_PHOTOS:
    path = os.path.join(root, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"bundled photo {path} is missing from the scikit-image install")
    photos.append(load_image(path))
  return tuple(photos)


def random_resized_crop_box(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """(top, left, h, w) of a crop with area fraction in `scale` and aspect in `ratio`.

  Ten tries like torchvision, then a centre crop clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def fixed_size_crop_box(rng, height, width):
  """(top, left, side, side): a square of 224/256 of the shorter side at a random place."""
  side = max(1, int(round(min(height, width) * EVAL_CROP_FRACTION)))
  return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side


class PhotoBatches:
  """Endless pre-training batches from the bundled photos.

  `batch_size` is the global batch; each batch holds this process's share: `images`
  (B, S, S, 3) (float32 normalised, or uint8 with `ship_uint8`) and `index` (B,) int32
  global example ids (step * batch_size + offset + i). Example `id` is a pure function of
  (seed, id); `state()` / `restore()` carry the step.
  """

  def __init__(self, batch_size, image_size, *, seed=0, scale=(0.2, 1.0),
               ratio=(3 / 4, 4 / 3), hflip=True, crop="random_resized", random_crop=None,
               ship_uint8=False, start_step=0, process_index=0, process_count=1):
    if random_crop is not None:  # older spelling: True = random-resized, False = centre crop
      crop = "random_resized" if random_crop else "center"
    self.photos = bundled_photos()
    self.global_batch = batch_size
    self.batch_size = _local_batch(batch_size, process_count)
    self.offset = process_index * self.batch_size
    self.image_size, self.seed = image_size, seed
    self.scale, self.ratio, self.hflip, self.crop = tuple(scale), tuple(ratio), hflip, crop
    self.ship_uint8 = ship_uint8
    self.step = start_step

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step}

  def restore(self, state):
    self.step = int(state["step"])

  def augment(self, rng, photo):
    """One pre-training view of `photo`: crop (random-resized, fixed-size or centre) + flip."""
    if self.crop == "random_resized":
      view = resize(photo, self.image_size,
                    random_resized_crop_box(rng, *photo.shape[:2], self.scale, self.ratio))
    elif self.crop == "fixed_size":
      view = resize(photo, self.image_size, fixed_size_crop_box(rng, *photo.shape[:2]))
    else:
      view = center_crop(photo, self.image_size)
    if self.hflip and rng.random() < 0.5:
      view = view[:, ::-1]
    return view

  def __next__(self):
    ids = self.step * self.global_batch + self.offset + np.arange(self.batch_size)
    views = []
    for i in ids:
      rng = np.random.default_rng([self.seed, int(i)])
      views.append(self.augment(rng, self.photos[rng.integers(len(self.photos))]))
    images = np.stack(views)
    self.step += 1
    return {"images": images if self.ship_uint8 else normalize(images), "index": _int32_ids(ids)}


def preview_images(count, image_size):
  """`count` fixed, centre-cropped bundled photos, normalised: (count, S, S, 3) float32."""
  photos = bundled_photos()
  picks = [photos[i % len(photos)] for i in range(count)]
  return normalize(np.stack([center_crop(p, image_size) for p in picks]))


# ------------------------------------------------------------------ TF augmentation


def _random_resized_box(tf, height, width, seed, scale, ratio):
  """TF twin of `random_resized_crop_box`: ten (area, log-aspect) draws, first that fits wins."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  u = tf.random.stateless_uniform([4, 10], seed)  # area, aspect, top, left
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  target = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  cw = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first crop that fits
  # fallback: the whole image, clamped to the aspect range, centred
  in_ratio = w / h
  fw = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h * ratio[1]), tf.int32), width)
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  ch, cw = tf.where(found, ch[first], fh), tf.where(found, cw[first], fw)
  top = tf.where(found, _randint(tf, u[2][first], height - ch + 1), (height - ch) // 2)
  left = tf.where(found, _randint(tf, u[3][first], width - cw + 1), (width - cw) // 2)
  return top, left, ch, cw


def _randint(tf, u, n):
  """floor(u * n) for u in [0, 1), clamped against float rounding: an int in [0, n)."""
  return tf.minimum(tf.cast(tf.floor(u * tf.cast(n, tf.float32)), tf.int32), n - 1)


def _fixed_size_box(tf, height, width, seed):
  side = tf.maximum(tf.cast(tf.round(
      tf.cast(tf.minimum(height, width), tf.float32) * EVAL_CROP_FRACTION), tf.int32), 1)
  u = tf.random.stateless_uniform([2], seed)
  return _randint(tf, u[0], height - side + 1), _randint(tf, u[1], width - side + 1), side, side


def _center_box(tf, height, width):
  side = tf.minimum(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def _decode_crop(tf, encoded, box_fn):
  """Decode `encoded` (any of JPEG, PNG, GIF, BMP) to RGB and crop `box_fn(h, w)`.

  JPEGs (grayscale and CMYK included) go through the fused `decode_and_crop_jpeg`, which
  decodes only the crop window; other formats, e.g. a PNG named .JPEG, are decoded whole.
  Corrupt or truncated files raise, and the pipeline drops them (`ignore_errors`).
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = tf.stack(box_fn(shape[0], shape[1]))
    return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, h, w = box_fn(shape[0], shape[1])
    return image[top:top + h, left:left + w]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _resize(tf, image, size, antialias):
  """Bicubic resize to `size`, float32. With `antialias` the kernel widens when shrinking, as
  PIL's (torchvision's, the paper's) does, within ~0.1 grey level; without, 1.6x faster."""
  return tf.image.resize(image, size, method="bicubic", antialias=antialias)


def _color_jitter(tf, image, seed, strength):
  """Brightness, contrast, saturation each scaled by U[1-s, 1+s] (torchvision ColorJitter)."""
  f = 1.0 + strength * (2.0 * tf.random.stateless_uniform([3], seed) - 1.0)
  image = image * f[0]
  gray = tf.image.rgb_to_grayscale(tf.clip_by_value(image, 0.0, 255.0))
  image = (image - tf.reduce_mean(gray)) * f[1] + tf.reduce_mean(gray)
  gray = tf.image.rgb_to_grayscale(tf.clip_by_value(image, 0.0, 255.0))
  return gray + (image - gray) * f[2]


def _finish(tf, image, ship_uint8):
  """float32 pixels in [0, 255] -> uint8, or float32 normalised with ImageNet mean/std."""
  pixels = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  if ship_uint8:
    return tf.cast(pixels, tf.uint8)
  return (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def pretrain_transform(encoded, seed, *, size, crop="random_resized", scale=(0.2, 1.0),
                       ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.0, antialias=True,
                       ship_uint8=True):
  """One pre-training view (size, size, 3) of an encoded image; `seed` (2,) int keys every draw."""
  tf, _ = _tf()
  crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if crop == "random_resized":
    box_fn = lambda h, w: _random_resized_box(tf, h, w, crop_seed, scale, ratio)
  elif crop == "fixed_size":
    box_fn = lambda h, w: _fixed_size_box(tf, h, w, crop_seed)
  else:
    box_fn = lambda h, w: _center_box(tf, h, w)
  image = _resize(tf, _decode_crop(tf, encoded, box_fn), [size, size], antialias)
  if hflip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if color_jitter:
    image = _color_jitter(tf, image, jitter_seed, color_jitter)
  return _finish(tf, image, ship_uint8)


def eval_transform(encoded, *, size, antialias=True, ship_uint8=True):
  """Resize the shorter side to size * 256/224 (bicubic), then the central (size, size) crop."""
  tf, _ = _tf()
  image = _decode_crop(tf, encoded, lambda h, w: (0, 0, h, w))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = tf.cast(tf.round(size / EVAL_CROP_FRACTION), tf.float32)
  new = tf.cast(tf.round(shape * short / tf.reduce_min(shape)), tf.int32)
  image = _resize(tf, image, new, antialias)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return _finish(tf, image[top:top + size, left:left + size], ship_uint8)


# ------------------------------------------------------------------------ sources


def _local_batch(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) is not divisible by the "
                     f"{process_count} processes")
  return batch_size // process_count


def _int32_ids(ids):
  return (np.asarray(ids, np.int64) % np.iinfo(np.int32).max).astype(np.int32)


def _process_range(count, process_index, process_count):
  """[start, end) of `process_index`'s part of `count` items, like `tfds.even_splits`."""
  base, extra = divmod(count, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


def _epoch_seed(seed, process_index, epoch):
  """A 31-bit seed for one process's epoch (file order, shuffle buffer, augmentation)."""
  return int(np.random.SeedSequence([seed, process_index, epoch]).generate_state(1)[0] >> 1)


def list_image_folder(root):
  """(paths, labels, class names) of `root/<class>/<image>`, sorted; classes sorted by name."""
  tf, _ = _tf()
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
  return paths, labels, classes


class FolderSource:
  """This process's share of an image folder; each epoch a full permutation of it."""

  def __init__(self, root, process_index, process_count):
    self.root = root
    paths, labels, self.classes = list_image_folder(root)
    start, end = _process_range(len(paths), process_index, process_count)
    self.paths, self.labels = np.array(paths[start:end]), np.array(labels[start:end], np.int64)
    self.num_examples = end - start
    self.total_examples = len(paths)

  def records(self, epoch_seed, shuffle=True):
    """(path, label) dataset in epoch order; `load` turns a path into encoded bytes."""
    tf, _ = _tf()
    order = (np.random.default_rng(epoch_seed).permutation(self.num_examples) if shuffle
             else np.arange(self.num_examples))
    return tf.data.Dataset.from_tensor_slices((self.paths[order], self.labels[order]))

  def load(self, payload):
    return _tf()[0].io.read_file(payload)

  def describe(self):
    return f"image folder {self.root}"


class TfdsSource:
  """This process's share (`tfds.even_splits`) of a prepared TFDS split, images left encoded."""

  def __init__(self, data, split, process_index, process_count, *, prepare=True):
    _, tfds = _tf()
    self.builder = tfds_builder(data, prepare=prepare and process_count == 1)
    if not self.builder.is_prepared():  # several processes must not prepare one data_dir
      raise FileNotFoundError(f"{data.dataset} is not prepared in {self.builder.data_dir} and "
                              f"{process_count} processes cannot prepare it together; prepare "
                              f"it first. {IMAGENET_HOW_TO}")
    _check_split(self.builder, split, data)
    self.split = tfds.even_splits(split, n=process_count)[process_index]
    self.num_examples = self.builder.info.splits[self.split].num_examples
    self.total_examples = self.builder.info.splits[split].num_examples
    self.image_key, self.label_key = self.builder.info.supervised_keys or ("image", "label")
    self.shuffle_buffer = data.shuffle_buffer

  def records(self, epoch_seed, shuffle=True):
    """(encoded image, label) dataset in epoch order: files shuffled, then a shuffle buffer."""
    tf, tfds = _tf()
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

  def load(self, payload):
    return payload

  def describe(self):
    return f"{self.builder.name} {self.split} ({self.builder.data_dir})"


def tfds_builder(data, *, prepare=False):
  """The TFDS builder for `data.dataset`, prepared; one clear error if it cannot be."""
  tf, tfds = _tf()
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
                     f"{FOLDER!r} (with config.data.folder) or a TFDS image classification "
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
  log.info("preparing %s from manual_dir=%s into %s (once)", name, manual_dir, builder.data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _check_manual_dir(name, manual_dir):
  tf, _ = _tf()
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
  data = config.data
  if data.dataset == FOLDER:
    return FolderSource(data.folder, process_index, process_count)
  return TfdsSource(data, split, process_index, process_count, prepare=prepare)


def check_data(config):
  """Validate `config.data` before anything is compiled; one clear error naming what is wrong.

  Checks the crop mode and image size, that the folder holds images, or that the TFDS
  dataset exists and is prepared (or can be prepared from `data.manual_dir`) and has the
  split. Returns a one-line description of the source.
  """
  data = config.data
  if data.crop not in CROPS:
    raise ValueError(f"config.data.crop={data.crop!r}: expected one of {CROPS}")
  _image_size(config)
  if data.dataset == BUNDLED:
    return f"{len(bundled_photos())} bundled photos"
  if data.dataset == FOLDER:
    paths, _, classes = list_image_folder(data.folder)
    return f"{len(paths)} images in {len(classes)} classes under {data.folder}"
  builder = tfds_builder(data)
  if not builder.is_prepared():
    return f"{data.dataset}, to be prepared from {data.manual_dir} into {builder.data_dir}"
  _check_split(builder, data.split, data)
  return f"{data.dataset} {data.split}: {builder.info.splits[data.split].num_examples} examples"


# ---------------------------------------------------------------------- iterators


class TfBatches:
  """Endless pre-training batches from a source, one tf.data pipeline per epoch.

  A batch holds this process's share of the global batch: `images` (B, S, S, 3) uint8 (or
  float32 normalised), `index` (B,) int32 global example ids (step * global batch +
  process offset + i), `label` (B,) int32. Epochs run into each other (nothing dropped);
  unreadable images are dropped and counted (`skipped`). Position = (epoch, records of the
  epoch consumed): an epoch's order and augmentation are pure functions of (seed,
  process, epoch), so `restore(state())` continues with the exact next batch. The next
  epoch's pipeline fills in a background thread so an epoch boundary does not stall.
  """

  def __init__(self, source, config, *, process_index, process_count, start_step=0):
    data = config.data
    self.source = source
    self.global_batch = config.batch_size
    self.batch_size = _local_batch(config.batch_size, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.seed = config.seed
    self.transform = functools.partial(
        pretrain_transform, size=_image_size(config), crop=data.crop, scale=tuple(data.crop_scale),
        ratio=tuple(data.crop_ratio), hflip=data.hflip, color_jitter=data.color_jitter,
        antialias=data.antialias, ship_uint8=data.ship_uint8)
    self.parallel = data.num_parallel_calls
    self._warm = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next_epoch")
    self._log_skips_at = 1
    # Without a saved state, assume no unreadable records: step -> (epoch, position).
    epoch, position = divmod(start_step * self.batch_size, source.num_examples)
    self.restore({"step": start_step, "epoch": epoch, "position": position, "skipped": 0})

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step, "epoch": self.epoch, "position": self.position,
            "skipped": self.skipped, "process_index": self.process_index,
            "process_count": self.process_count}

  def restore(self, state):
    """Continue from `state()`: the pipeline restarts at that exact record."""
    if state.get("process_count", self.process_count) != self.process_count:
      log.warning("data state saved with %s processes, restored with %d: each process now "
                  "reads another part of the data, not the saved order",
                  state["process_count"], self.process_count)
    self.step, self.epoch = int(state["step"]), int(state["epoch"])
    self.position, self.skipped = int(state["position"]), int(state["skipped"])
    self._current = self._open(self.epoch, self.position)
    self._next = self._prefetch(self.epoch + 1)
    self._pending = None  # the part of a fetched chunk not yet returned

  def dataset(self, epoch, position=0):
    """Epoch `epoch` from record `position` on, in chunks of up to B: image, label, pos."""
    tf, _ = _tf()
    epoch_seed = _epoch_seed(self.seed, self.process_index, epoch)
    parallel = tf.data.AUTOTUNE if self.parallel < 0 else self.parallel

    def load(pos, record):
      payload, label = record
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), pos])
      return {"image": self.transform(self.source.load(payload), seed),
              "label": tf.cast(label, tf.int32), "pos": pos}

    records = self.source.records(epoch_seed)
    ds = records.enumerate().skip(position)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.ignore_errors()  # corrupt / truncated / not an image: dropped, counted by `pos` gaps
    ds = ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    cardinality = int(records.cardinality())
    return ds.with_options(options), cardinality if cardinality >= 0 else self.source.num_examples

  def _open(self, epoch, position):
    ds, size = self.dataset(epoch, position)
    return ds.as_numpy_iterator(), size

  def _prefetch(self, epoch):
    """Open epoch `epoch` now and fill its pipeline (first chunk) in a background thread."""
    it, size = self._open(epoch, 0)
    return it, size, self._warm.submit(next, it, None)

  def _chunk(self):
    """The next chunk of decoded examples, moving on to the next epoch when one ends."""
    while True:
      if self._pending is not None:
        chunk, self._pending = self._pending, None
        return chunk
      chunk = next(self._current[0], None)
      if chunk is not None:
        return chunk
      self._count_skips(self._current[1] - self.position)  # unreadable records at the end
      it, size, first = self._next
      self.epoch, self.position, self._current = self.epoch + 1, 0, (it, size)
      self._pending = first.result()
      if self._pending is None:
        raise RuntimeError(f"epoch {self.epoch} of {self.source.describe()} has no readable "
                           f"image on process {self.process_index}")
      self._next = self._prefetch(self.epoch + 1)

  def _count_skips(self, count):
    if count > 0:
      self.skipped += count
      if self.skipped >= self._log_skips_at:
        log.warning("skipped %d unreadable images so far (corrupt, truncated or not an image) "
                    "in %s", self.skipped, self.source.describe())
        self._log_skips_at = 2 * self.skipped

  def __next__(self):
    parts, need = [], self.batch_size
    while need:
      chunk = self._chunk()
      part = {k: v[:need] for k, v in chunk.items()}
      if len(chunk["pos"]) > need:
        self._pending = {k: v[need:] for k, v in chunk.items()}
      pos = part["pos"]
      self._count_skips(int(pos[-1]) + 1 - self.position - len(pos))
      self.position = int(pos[-1]) + 1
      parts.append(part)
      need -= len(pos)
    batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts])
                                             for k in parts[0]}
    ids = (self.step * self.global_batch + self.process_index * self.batch_size
           + np.arange(self.batch_size))
    self.step += 1
    return {"images": batch["image"], "index": _int32_ids(ids), "label": batch["label"]}


def _defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def create_pretrain_iterator(config, *, start_step=0, process_index=None, process_count=None):
  """The pre-training iterator `config.data` asks for, for this process's share of the batch.

  `__next__` gives dict(images, index[, label]); `state()` is JSON-serialisable and
  `restore(state)` continues with the exact next batch.
  """
  process_index, process_count = _defaults(process_index, process_count)
  data = config.data
  _local_batch(config.batch_size, process_count)
  if data.crop not in CROPS:
    raise ValueError(f"config.data.crop={data.crop!r}: expected one of {CROPS}")
  if data.dataset == BUNDLED:
    return PhotoBatches(config.batch_size, _image_size(config), seed=config.seed,
                        scale=data.crop_scale, ratio=data.crop_ratio, hflip=data.hflip,
                        crop=data.crop, ship_uint8=data.ship_uint8, start_step=start_step,
                        process_index=process_index, process_count=process_count)
  source = make_source(config, data.split, process_index, process_count)
  log.info("data: %s split %r, %d of %d examples on process %d/%d", data.dataset, data.split,
           source.num_examples, source.total_examples, process_index, process_count)
  return TfBatches(source, config, process_index=process_index, process_count=process_count,
                   start_step=start_step)


def create_eval_iterator(config, *, split=None, process_index=None, process_count=None):
  """One pass over this process's share of `split` (default `data.eval_split`) in order.

  Eval transform (shorter side to 256, centre 224, scaled to the image size). Batches
  hold `images`, `label` and `valid` (False on padding); every process yields the same
  number of batches, the last ones padded.
  """
  tf, _ = _tf()
  process_index, process_count = _defaults(process_index, process_count)
  data = config.data
  if data.dataset == BUNDLED:
    raise ValueError(f"config.data.dataset={BUNDLED!r} has no evaluation split")
  batch = _local_batch(config.batch_size, process_count)
  source = make_source(config, split or data.eval_split, process_index, process_count)
  per_process = -(-source.total_examples // process_count)
  num_batches = -(-per_process // batch)
  size = _image_size(config)

  def load(payload, label):
    image = eval_transform(source.load(payload), size=size, antialias=data.antialias,
                           ship_uint8=data.ship_uint8)
    return {"images": image, "label": tf.cast(label, tf.int32), "valid": True}

  pad = {"images": tf.zeros([size, size, 3], tf.uint8 if data.ship_uint8 else tf.float32),
         "label": tf.constant(-1, tf.int32), "valid": False}
  ds = source.records(0, shuffle=False).map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors().concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch).batch(batch).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def _image_size(config):
  size = config.model.img_size
  if not isinstance(size, int):
    raise ValueError(f"the input pipelines make square crops; config.model.img_size="
                     f"{size} must be an int")
  return size
