"""Batched crop + bicubic resize + flip in numpy, for images held in host memory.

A whole batch of equally sized uint8 images is cropped and resized in two batched matrix
products: every output row (column) is a weighted sum of input rows (columns), with
weights from the Keys bicubic kernel (a = -0.5, as `tf.image.resize(method="bicubic")`
and PIL), widened when shrinking with `antialias`, and renormalised over the pixels the
kernel may see. A training crop sees only its box (crop first, then resize, as the tf.data
pipeline does); the evaluation transform resizes the whole image and takes the centre.

Random draws come from a counter-based hash of (seed, position) (`uniforms`), so a view is a
pure function of its image, the epoch seed and its position in the epoch, whatever the batch
or process it falls in.
"""

import math

import numpy as np

from mae_jax.data.crops import EVAL_CROP_FRACTION

_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * _MUL1
  x = (x ^ (x >> np.uint64(27))) * _MUL2
  return x ^ (x >> np.uint64(31))


def uniforms(seed, positions, count):
  """(len(positions), count) float64 draws in [0, 1), a pure function of (seed, position, i)."""
  with np.errstate(over="ignore"):
    key = _mix(np.uint64(seed) * _GOLDEN + _GOLDEN)
    pos = np.asarray(positions, np.uint64)[:, None] * np.uint64(count)
    bits = _mix(key ^ _mix(pos + np.arange(count, dtype=np.uint64) + np.uint64(1)))
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _randint(u, n):
  """floor(u * n) clamped to [0, n): the numpy twin of `tf_setup.randint`."""
  return np.minimum(np.floor(u * n).astype(np.int64), n - 1)


def random_resized_boxes(u, height, width, scale, ratio):
  """(top, left, h, w) arrays (B,) from draws `u` (B, 40): ten (area, aspect) tries as
  torchvision, the first that fits wins, else the whole image clamped to `ratio`."""
  area_u, aspect_u, top_u, left_u = (u[:, 10 * i:10 * (i + 1)] for i in range(4))
  target = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_lo + (log_hi - log_lo) * aspect_u)
  cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
  ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
  fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  first = np.argmax(fits, axis=1)
  found = fits.any(axis=1)
  rows = np.arange(len(u))
  in_ratio = width / height
  fw = round(height * ratio[1]) if in_ratio > ratio[1] else width
  fh = round(width / ratio[0]) if in_ratio < ratio[0] else height
  h = np.where(found, ch[rows, first], fh)
  w = np.where(found, cw[rows, first], fw)
  top = np.where(found, _randint(top_u[rows, first], height - h + 1), (height - h) // 2)
  left = np.where(found, _randint(left_u[rows, first], width - w + 1), (width - w) // 2)
  return top, left, h, w


def fixed_size_boxes(u, height, width):
  """A square of 224/256 of the shorter side at a random place (Table 1e 'fixed size')."""
  side = max(1, round(min(height, width) * EVAL_CROP_FRACTION))
  full = np.full(len(u), side)
  return _randint(u[:, 0], height - side + 1), _randint(u[:, 1], width - side + 1), full, full


def center_boxes(count, height, width):
  """The largest centred square, `count` times."""
  side = min(height, width)
  ones = np.ones(count, np.int64)
  return ones * ((height - side) // 2), ones * ((width - side) // 2), ones * side, ones * side


def _cubic(x):
  """The Keys bicubic kernel with a = -0.5."""
  x = np.abs(x)
  near = (1.5 * x - 2.5) * x * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_weights(size, in_size, lo, hi, origin, inv_scale, antialias):
  """(B, size, in_size) float32 weights: output i samples input coordinate
  origin + (i + 0.5) * inv_scale - 0.5 from the input pixels [lo, hi) only."""
  sample = origin[:, None] + (np.arange(size) + 0.5) * inv_scale[:, None] - 0.5  # (B, S)
  kernel_scale = np.maximum(inv_scale, 1.0) if antialias else np.ones_like(inv_scale)
  j = np.arange(in_size)
  w = _cubic((j[None, None, :] - sample[:, :, None]) / kernel_scale[:, None, None])
  w = w * ((j >= lo[:, None, None]) & (j < hi[:, None, None]))
  total = w.sum(axis=2, keepdims=True)
  return (w / np.where(np.abs(total) > 1e-9, total, 1.0)).astype(np.float32)


def apply_weights(images, wy, wx):
  """uint8 (B, H, W, C) -> uint8 (B, S, S, C): rows by `wy` (B, S, H), columns by `wx`."""
  b, h, w, c = images.shape
  rows = np.matmul(wy, images.reshape(b, h, w * c).astype(np.float32))  # (B, S, W*C)
  rows = rows.reshape(b, -1, w, c).transpose(0, 1, 3, 2)                # (B, S, C, W)
  out = np.matmul(rows, wx.transpose(0, 2, 1)[:, None])                  # (B, S, C, S)
  return np.clip(np.round(out.transpose(0, 1, 3, 2)), 0, 255).astype(np.uint8)


def crop_resize(images, boxes, size, *, flip=None, antialias=True):
  """Crop each image's box (top, left, h, w) and resize it to (size, size); `flip` (B,) bool
  mirrors those outputs left-right."""
  top, left, h, w = (np.asarray(x, np.float64) for x in boxes)
  wy = resize_weights(size, images.shape[1], top, top + h, top, h / size, antialias)
  wx = resize_weights(size, images.shape[2], left, left + w, left, w / size, antialias)
  if flip is not None:
    wx = np.where(np.asarray(flip)[:, None, None], wx[:, ::-1], wx)
  return apply_weights(images, wy, wx)


def eval_resize(images, size, *, antialias=True, fraction=EVAL_CROP_FRACTION):
  """The evaluation transform: the shorter side to size / fraction (bicubic), centre crop."""
  b, height, width = images.shape[:3]
  short = round(size / fraction)
  new_h, new_w = (round(s * short / min(height, width)) for s in (height, width))
  weights = []
  for in_size, new in ((height, new_h), (width, new_w)):
    inv = np.full(b, in_size / new)
    offset = np.full(b, ((new - size) // 2) * in_size / new)
    weights.append(resize_weights(size, in_size, np.zeros(b), np.full(b, in_size), offset, inv,
                                  antialias))
  return apply_weights(images, *weights)
