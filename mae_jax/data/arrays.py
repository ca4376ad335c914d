"""Images held in host memory: uint8 arrays from `.npy`, `.npz` or IDX files (Fashion-MNIST).

`config.data.dataset = "arrays"` reads `data.arrays` (images) and `data.labels` (labels):
- `.npy`: the images array; labels from `data.labels` (`.npy` or IDX) or none;
- `.npz`: its `images` array (or its only array) and, unless `data.labels` is set, its
  `labels` array when present;
- IDX (`*-images-idx3-ubyte[.gz]`, the MNIST / Fashion-MNIST format): labels from
  `data.labels`, else the sibling `*-labels-idx1-ubyte[.gz]` when it exists.
Images are (N, H, W) or (N, H, W, C) uint8 with C = 1 or 3; labels (N,) non-negative
integers. Each file is read once per process (`load_arrays` is cached).
No TensorFlow here.
"""

import functools
import os

import numpy as np

from mae_jax.data import idx
from mae_jax.data.idx import read_idx

ARRAYS = "arrays"
ARRAY_SUFFIXES = (".npy", ".npz", "-ubyte", "-ubyte.gz")
EXPECTED = ("expected uint8 images of shape (N, H, W) or (N, H, W, C) with C 1 or 3 in a .npy, "
            ".npz (key 'images', optional 'labels') or IDX (...-images-idx3-ubyte[.gz]) file")


# Fields the array source does not implement (TF ops of the tf.data pipelines).
TF_ONLY = ("color_jitter", "rand_augment_ops", "random_erasing")


def check_augment(data):
  """A clear error for augmentation the array source does not do."""
  on = [f"config.data.{k}={data[k]}" for k in TF_ONLY if data.get(k)]
  if on:
    raise ValueError(f"{', '.join(on)}: config.data.dataset={ARRAYS!r} does crops "
                     "and flips only; set it to 0, or write the images as an image folder "
                     "(python -m mae_jax.data.idx) and use dataset='image_folder'")


class Arrays:
  """uint8 images (N, H, W, C), int64 labels (N,) or None, and where they came from."""

  def __init__(self, images, labels, description):
    self.images, self.labels, self.description = images, labels, description
    self.num_classes = None if labels is None else int(labels.max()) + 1

  def __len__(self):
    return len(self.images)


def _field_error(field, path, what):
  return ValueError(f"config.data.{field}={path}: {what}")


def _read(field, path):
  """The array(s) of `path`: {name: array} for .npz, else {"array": array}."""
  if not path:
    raise ValueError(f"config.data.dataset={ARRAYS!r} needs config.data.{field}; {EXPECTED}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.{field}={path} does not exist; {EXPECTED}")
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    if path.endswith(".npy"):
      return {"array": np.load(path, allow_pickle=False)}
    return {"array": read_idx(path)}
  except (ValueError, OSError, EOFError) as e:  # pickled object arrays, truncated files, ...
    raise _field_error(field, path, f"cannot be read as an array ({e}); {EXPECTED}") from None


def _sibling_labels(path):
  """Fashion-MNIST's train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz, if present."""
  base = os.path.basename(path)
  if "images-idx3" not in base:
    return ""
  sibling = os.path.join(os.path.dirname(path), base.replace("images-idx3", "labels-idx1"))
  return sibling if os.path.isfile(sibling) else ""


def _images(field, path, found):
  if "images" in found:
    images = found["images"]
  elif len(found) == 1:
    images = next(iter(found.values()))
  else:
    raise _field_error(field, path, f"holds the arrays {sorted(found)} but none named "
                                    f"'images'; {EXPECTED}")
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
      images.ndim == 4 and images.shape[-1] not in (1, 3)) or 0 in images.shape:
    raise _field_error(field, path, f"holds {images.dtype} images of shape {images.shape}; "
                                    f"{EXPECTED}")
  return images if images.ndim == 4 else images[..., None]


def _labels(field, path, labels, count, images_path):
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise _field_error(field, path, f"holds {labels.dtype} labels of shape {labels.shape}: "
                                    "expected a 1-D integer array, one label per image")
  if len(labels) != count:
    raise _field_error(field, path, f"holds {len(labels)} labels but {images_path} holds "
                                    f"{count} images: expected one label per image")
  if len(labels) and labels.min() < 0:
    raise _field_error(field, path, f"holds the label {labels.min()}: expected labels >= 0")
  return labels.astype(np.int64)


@functools.cache
def load_arrays(images_path, labels_path="", *, prefix=""):
  """The `Arrays` of an images file and (optional) labels file; one clear error when bad.

  `prefix` names the config fields in errors ("" -> data.arrays / data.labels, "eval_" ->
  data.eval_arrays / data.eval_labels). Cached: each file is read once per process.
  """
  image_field, label_field = f"{prefix}arrays", f"{prefix}labels"
  found = _read(image_field, images_path)
  images = _images(image_field, images_path, found)
  labels = None
  if labels_path:
    label_found = _read(label_field, labels_path)
    raw = label_found.get("labels", next(iter(label_found.values())))
    labels = _labels(label_field, labels_path, raw, len(images), images_path)
  elif "labels" in found:
    labels = _labels(image_field, images_path, found["labels"], len(images), images_path)
  elif _sibling_labels(images_path):
    sibling = _sibling_labels(images_path)
    labels = _labels(label_field, sibling, read_idx(sibling), len(images), images_path)
  n, h, w, c = images.shape
  what = f"{n:,} {h}x{w}x{c} images" + (f", {int(labels.max()) + 1} classes"
                                       if labels is not None else ", no labels")
  return Arrays(images, labels, f"{what} from {images_path}")


def train_arrays(data):
  """The training `Arrays` of `config.data` (`data.per_class` > 0: a fixed subset of it)."""
  per_class = data.get("per_class", 0)
  if per_class > 0:
    return per_class_subset(data.arrays, data.labels, per_class)
  return load_arrays(data.arrays, data.labels)


@functools.cache
def per_class_subset(images_path, labels_path, per_class):
  """`per_class` images of every class: the seed-0 subset that `python -m mae_jax.data.idx
  --per_class` writes as a folder (both sources train on the same images)."""
  found = load_arrays(images_path, labels_path)
  field = f"config.data.per_class={per_class}"
  if found.labels is None:
    raise ValueError(f"{field} needs labels: {found.description}")
  try:
    ids = idx.select_per_class(found.labels, per_class)
  except ValueError as e:
    raise ValueError(f"{field} of {found.description}: {e}") from None
  return Arrays(found.images[ids], found.labels[ids],
                f"{len(ids):,} images ({per_class} per class, seed 0) of {found.description}")


def eval_arrays(data):
  """The evaluation `Arrays` of `config.data` (`data.eval_arrays`, else an error)."""
  if not data.get("eval_arrays"):
    raise ValueError(f"config.data.dataset={ARRAYS!r} has no evaluation images: set "
                     "config.data.eval_arrays (and config.data.eval_labels); "
                     f"{EXPECTED}")
  return load_arrays(data.eval_arrays, data.get("eval_labels", ""), prefix="eval_")


def check_channels(in_chans, found):
  """Batches of `found` carry 3 channels (grey images repeated; ImageNet mean / std), or, for
  grey images and `in_chans` = 1, one (`imaging.GREY_MEAN` / `GREY_STD`); else a clear error."""
  grey = found.images.shape[-1] == 1
  if in_chans == 3 or (in_chans == 1 and grey):
    return
  raise ValueError(f"config.model.in_chans={in_chans}: {found.description} are "
                   f"{'grey' if grey else 'RGB'}: expected in_chans=3"
                   + (" or 1" if grey else ""))
