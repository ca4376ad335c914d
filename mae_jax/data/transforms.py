"""Augmentation and evaluation transforms as TF ops, for the tf.data pipelines.

Pre-training (paper): RandomResizedCrop (scale (0.2, 1), ratio (3/4, 4/3), bicubic) +
horizontal flip (+ optional colour jitter for the Table 1 ablation); evaluation: resize
the shorter side to 256/224 of the size and take the centre crop. Every random draw is
keyed by a (2,) stateless seed, so a view is a pure function of (image, seed).
"""

import math

from mae_jax.data import augment
from mae_jax.data.crops import EVAL_CROP_FRACTION
from mae_jax.data.tf_setup import randint, tf_modules  # noqa: F401  (tf_modules re-exported)
from mae_jax.imaging import IMAGENET_MEAN, IMAGENET_STD


def random_resized_box(tf, height, width, seed, scale, ratio):
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
  top = tf.where(found, randint(tf, u[2][first], height - ch + 1), (height - ch) // 2)
  left = tf.where(found, randint(tf, u[3][first], width - cw + 1), (width - cw) // 2)
  return top, left, ch, cw


def _fixed_size_box(tf, height, width, seed):
  side = tf.maximum(tf.cast(tf.round(
      tf.cast(tf.minimum(height, width), tf.float32) * EVAL_CROP_FRACTION), tf.int32), 1)
  u = tf.random.stateless_uniform([2], seed)
  return randint(tf, u[0], height - side + 1), randint(tf, u[1], width - side + 1), side, side


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
                       ship_uint8=True, rand_augment_ops=0, rand_augment_magnitude=9.0,
                       rand_augment_std=0.5, random_erasing=0.0):
  """One training view (size, size, 3) of an encoded image; `seed` (2,) int keys every draw.

  Pre-training: crop + flip (+ colour jitter for the ablation). Fine-tuning adds
  RandAugment (`rand_augment_ops` > 0: timm's rand-m9-mstd0.5-inc1 with the defaults) and
  random erasing after normalisation (`random_erasing` = its probability; the batch is
  then float32, whatever `ship_uint8` says).
  """
  tf, _ = tf_modules()
  crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if crop == "random_resized":
    box_fn = lambda h, w: random_resized_box(tf, h, w, crop_seed, scale, ratio)
  elif crop == "fixed_size":
    box_fn = lambda h, w: _fixed_size_box(tf, h, w, crop_seed)
  else:
    box_fn = lambda h, w: _center_box(tf, h, w)
  image = _resize(tf, _decode_crop(tf, encoded, box_fn), [size, size], antialias)
  if hflip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if color_jitter:
    image = _color_jitter(tf, image, jitter_seed, color_jitter)
  if not (rand_augment_ops or random_erasing):
    return _finish(tf, image, ship_uint8)
  # Seeds of their own, so that the pre-training stream above stays what it always was.
  augment_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(
      tf.random.experimental.stateless_fold_in(seed, 1), 2))
  if rand_augment_ops:
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    image = tf.cast(augment.rand_augment(tf.cast(image, tf.uint8), augment_seed,
                                         num_ops=rand_augment_ops,
                                         magnitude=rand_augment_magnitude,
                                         magnitude_std=rand_augment_std), tf.float32)
  if not random_erasing:
    return _finish(tf, image, ship_uint8)
  return augment.random_erasing(_finish(tf, image, False), erase_seed, prob=random_erasing)


def eval_transform(encoded, *, size, antialias=True, ship_uint8=True,
                   fraction=EVAL_CROP_FRACTION):
  """Resize the shorter side to size / fraction (bicubic), then the central (size, size) crop."""
  tf, _ = tf_modules()
  image = _decode_crop(tf, encoded, lambda h, w: (0, 0, h, w))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = tf.cast(tf.round(size / fraction), tf.float32)
  new = tf.cast(tf.round(shape * short / tf.reduce_min(shape)), tf.int32)
  image = _resize(tf, image, new, antialias)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return _finish(tf, image[top:top + size, left:left + size], ship_uint8)
