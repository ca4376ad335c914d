"""Input pipelines. The bundled photo set: real photos shipped with scikit-image, no download.

Augmentation follows the paper's pre-training recipe: RandomResizedCrop (scale
(0.2, 1), ratio (3/4, 4/3), bicubic) + horizontal flip, then ImageNet mean/std.
Batches are a deterministic function of (seed, step), so the iterator position
is just the step and a resumed run sees exactly the batches it would have.
"""

import functools
import math
import os

import numpy as np

from mae_jax.imaging import center_crop, load_image, normalize, resize

# Real photographs (and micrographs) shipped inside scikit-image; synthetic
# images (chessboard, logo, phantom, ...), tiny ones and near-duplicates are left out.
BUNDLED_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png",
)


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


class PhotoBatches:
  """Endless pre-training batches from the bundled photos.

  Each batch is a dict: `images` (B, S, S, 3) float32 normalised, `index` (B,)
  int32 global example ids (step * batch + i) for mask noise. Batch `step` is a
  pure function of (seed, step); `state()` / `restore()` carry the position.
  """

  def __init__(self, batch_size, image_size, *, seed=0, scale=(0.2, 1.0),
               ratio=(3 / 4, 4 / 3), hflip=True, random_crop=True, start_step=0):
    self.photos = bundled_photos()
    self.batch_size, self.image_size = batch_size, image_size
    self.seed, self.scale, self.ratio = seed, tuple(scale), tuple(ratio)
    self.hflip, self.random_crop = hflip, random_crop
    self.step = start_step

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step}

  def restore(self, state):
    self.step = int(state["step"])

  def augment(self, rng, photo):
    """One pre-training view of `photo`: random-resized crop (or centre crop) + flip."""
    if self.random_crop:
      box = random_resized_crop_box(rng, *photo.shape[:2], self.scale, self.ratio)
      view = resize(photo, self.image_size, box)
    else:
      view = center_crop(photo, self.image_size)
    if self.hflip and rng.random() < 0.5:
      view = view[:, ::-1]
    return view

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    which = rng.integers(0, len(self.photos), self.batch_size)
    images = np.stack([self.augment(rng, self.photos[i]) for i in which])
    index = np.arange(self.batch_size, dtype=np.int64) + self.step * self.batch_size
    self.step += 1
    return {"images": normalize(images), "index": (index % np.iinfo(np.int32).max).astype(np.int32)}


def preview_images(count, image_size):
  """`count` fixed, centre-cropped bundled photos, normalised: (count, S, S, 3) float32."""
  photos = bundled_photos()
  picks = [photos[i % len(photos)] for i in range(count)]
  return normalize(np.stack([center_crop(p, image_size) for p in picks]))


def create_pretrain_iterator(config, start_step=0):
  """The pre-training iterator `config.data` asks for."""
  data = config.data
  if data.dataset != "bundled_photos":
    raise ValueError(f"config.data.dataset={data.dataset!r} is not available yet; this build "
                     "supports 'bundled_photos'")
  return PhotoBatches(config.batch_size, _image_size(config), seed=config.seed,
                      scale=data.crop_scale, ratio=data.crop_ratio, hflip=data.hflip,
                      random_crop=data.random_crop, start_step=start_step)


def _image_size(config):
  size = config.model.img_size
  if not isinstance(size, int):
    raise ValueError(f"the bundled photo pipeline makes square crops; config.model.img_size="
                     f"{size} must be an int")
  return size
