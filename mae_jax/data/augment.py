"""Fine-tuning augmentation as TF ops: timm's RandAugment `rand-m9-mstd0.5-inc1` and random erasing.

Hand-written from the PIL semantics timm relies on, because no registry package reproduces
timm's ops inside tf.data: tf-models-official (its RandAugment) pins another TensorFlow,
keras 3's RandAugment / preprocessing layers use other op sets, magnitudes and interpolation,
and tensorflow-addons is retired. Each op here mirrors what PIL does on a uint8 RGB image:
LUT ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd) exactly;
ImageEnhance (Color, Contrast, Brightness, Sharpness) with PIL's integer grey
(L = (19595 R + 38470 G + 7471 B + 2^15) >> 16), its float32 blend and truncation; geometric
ops with `Image.transform(AFFINE)` sampling.

Interpolation: MAE fine-tunes with timm `create_transform(..., interpolation='bicubic')`, which
hands 'bicubic' to RandAugment, so the affine ops use PIL's BICUBIC transform filter (the a = -1
cubic of libImaging/Geometry.c on a clamped 4x4 neighbourhood, truncated to uint8), rewritten
below in float64 on gathered neighbours; outside the source image the fill is the ImageNet mean
colour (124, 116, 104), as timm's `img_mean`.

Every op works on (H, W, 3) pixels in [0, 255] (uint8, or float32 which is first rounded to the
uint8 grid, as timm's ops see a PIL image) and returns the input's dtype. Randomness is keyed by
a (2,) stateless seed, like `transforms.pretrain_transform`.
"""

import functools
import math

from mae_jax.data.tf_setup import randint, tf_modules

FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean
LEVEL_DENOM = 10.0  # magnitudes are on timm's 0..10 scale
# timm's _RAND_INCREASING_TRANSFORMS, in its order (the op index draws over this tuple)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")


def _pixels(tf, image):
  """(H, W, 3) uint8 or float [0, 255] -> float32 on the uint8 grid."""
  image = tf.convert_to_tensor(image)
  return tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)


def _as_dtype(tf, pixels, dtype):
  return tf.cast(pixels, tf.uint8) if dtype == tf.uint8 else pixels


# ---- point ops (PIL ImageOps LUTs) -------------------------------------------------------------

def _auto_contrast(tf, x, _):
  """ImageOps.autocontrast: per channel lut(i) = int(i * 255/(hi-lo) - lo * 255/(hi-lo))."""
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])  # (3,)
  lo64, hi64 = tf.cast(lo, tf.float64), tf.cast(hi, tf.float64)
  scale = 255.0 / tf.maximum(hi64 - lo64, 1.0)
  out = tf.floor(tf.clip_by_value(tf.cast(x, tf.float64) * scale - lo64 * scale, 0.0, 255.0))
  return tf.where(hi > lo, tf.cast(out, tf.float32), x)


def _equalize_channel(tf, c):
  """ImageOps.equalize on one (H, W) int32 channel (integer arithmetic, as PIL)."""
  hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
  present = hist > 0
  last = tf.reduce_max(tf.where(present, tf.range(256), -1))  # the brightest value present
  step = (tf.reduce_sum(hist) - hist[last]) // 255
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
  lut = tf.clip_by_value(lut, 0, 255)  # PIL clips LUT entries to uint8
  ok = (tf.reduce_sum(tf.cast(present, tf.int32)) > 1) & (step > 0)
  return tf.where(ok, tf.gather(lut, c), c)


def _equalize(tf, x, _):
  xi = tf.cast(x, tf.int32)
  return tf.cast(tf.stack([_equalize_channel(tf, xi[..., k]) for k in range(3)], -1), tf.float32)


def _invert(tf, x, _):
  return 255.0 - x


def _posterize(tf, x, bits):
  """Keep the top `bits` bits (0..8) of every value."""
  q = tf.pow(2.0, 8.0 - tf.cast(tf.minimum(bits, 8), tf.float32))
  return tf.floor(x / q) * q


def _solarize(tf, x, threshold):
  return tf.where(x < tf.cast(threshold, tf.float32), x, 255.0 - x)


def _solarize_add(tf, x, add, threshold=128):
  return tf.where(x < threshold, tf.minimum(255.0, x + tf.cast(add, tf.float32)), x)


# ---- ImageEnhance ------------------------------------------------------------------------------

def _blend(tf, degenerate, x, factor):
  """Image.blend(degenerate, x, factor): float32 d + f (x - d), clipped, truncated."""
  out = degenerate + tf.cast(factor, tf.float32) * (x - degenerate)
  return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


def _grey(tf, x):
  """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, (H, W) int32."""
  xi = tf.cast(x, tf.int32)
  return (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 32768) // 65536


def _color(tf, x, factor):
  grey = tf.cast(_grey(tf, x), tf.float32)[..., None]
  return _blend(tf, tf.broadcast_to(grey, tf.shape(x)), x, factor)


def _contrast(tf, x, factor):
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(tf, x), tf.float64)) + 0.5)
  return _blend(tf, tf.cast(mean, tf.float32) * tf.ones_like(x), x, factor)


def _brightness(tf, x, factor):
  return _blend(tf, tf.zeros_like(x), x, factor)


def _smooth(tf, x):
  """ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13, float32, +0.5, truncated), in PIL's
  summation order; the one-pixel border is copied unchanged, as PIL's 3x3 filter does."""
  k1, k5 = 1.0 / 13.0, 5.0 / 13.0  # rounded to float32 like PIL's kernel

  def row(r, centre):
    return (r[:, :-2] * k1 + r[:, 1:-1] * centre) + r[:, 2:] * k1

  ss = 0.5 + row(x[2:], k1)
  ss = ss + row(x[1:-1], k5)
  ss = ss + row(x[:-2], k1)
  inner = tf.floor(tf.clip_by_value(ss, 0.0, 255.0))
  middle = tf.concat([x[1:-1, :1], inner, x[1:-1, -1:]], axis=1)
  return tf.concat([x[:1], middle, x[-1:]], axis=0)


def _sharpness(tf, x, factor):
  shape = tf.shape(x)
  tiny = (shape[0] < 3) | (shape[1] < 3)  # PIL leaves images without an interior unchanged
  degenerate = tf.cond(tiny, lambda: x, lambda: _smooth(tf, x))
  return _blend(tf, degenerate, x, factor)


# ---- geometric ops (Image.transform AFFINE, BICUBIC, fill) -------------------------------------

def _cubic(v1, v2, v3, v4, d):
  """PIL's transform-filter cubic through v2 (d = 0) and v3 (d = 1), its evaluation order."""
  p1 = v2
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return p1 + d * (p2 + d * (p3 + d * p4))


def _affine(tf, x, matrix):
  """`Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=FILL)` of x (H, W, 3).

  Output pixel (x, y) samples the source at matrix @ (x + .5, y + .5, 1); outside the source
  it is FILL. The 4x4 neighbours are gathered per pixel (H, W, 4, 4, 3) and filtered in float64.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float64) for v in matrix]
  shape = tf.shape(x)
  h, w = shape[0], shape[1]
  yo = tf.cast(tf.range(h), tf.float64)[:, None] + 0.5
  xo = tf.cast(tf.range(w), tf.float64)[None, :] + 0.5
  xin = a * xo + b * yo + c  # (H, W) source coordinates
  yin = d * xo + e * yo + f
  inside = ((xin >= 0.0) & (xin < tf.cast(w, tf.float64)) &
            (yin >= 0.0) & (yin < tf.cast(h, tf.float64)))
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = tf.floor(xs), tf.floor(ys)
  dx, dy = xs - x0, ys - y0
  # clamp far-away (filled) coordinates before the int cast; they are discarded anyway
  x0 = tf.cast(tf.clip_by_value(x0, -2.0, tf.cast(w, tf.float64)), tf.int32)
  y0 = tf.cast(tf.clip_by_value(y0, -2.0, tf.cast(h, tf.float64)), tf.int32)
  taps = tf.range(-1, 3)
  cols = tf.clip_by_value(x0[..., None] + taps, 0, w - 1)  # (H, W, 4)
  rows = tf.clip_by_value(y0[..., None] + taps, 0, h - 1)
  flat = tf.reshape(x, [-1, 3])
  p = tf.cast(tf.gather(flat, rows[..., :, None] * w + cols[..., None, :]), tf.float64)
  across = _cubic(p[..., 0, :], p[..., 1, :], p[..., 2, :], p[..., 3, :],
                  dx[..., None, None])  # (H, W, 4 rows, 3)
  v = _cubic(across[..., 0, :], across[..., 1, :], across[..., 2, :], across[..., 3, :],
             dy[..., None])  # (H, W, 3)
  out = tf.cast(tf.floor(tf.clip_by_value(v, 0.0, 255.0)), tf.float32)
  fill = tf.constant(FILL, tf.float32)
  return tf.where(inside[..., None], out, tf.broadcast_to(fill, tf.shape(out)))


def _round15(tf, v):
  return tf.round(v * 1e15) / 1e15  # PIL rounds the rotation matrix to 15 decimals


def _rotate(tf, x, degrees):
  """Image.rotate(degrees, BICUBIC, fillcolor): counter-clockwise about the image centre."""
  shape = tf.cast(tf.shape(x), tf.float64)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = _round15(tf, tf.cos(angle)), _round15(tf, tf.sin(angle))
  c = cos * -cx + sin * -cy + 0.0 + cx
  f = -sin * -cx + cos * -cy + 0.0 + cy
  return _affine(tf, x, (cos, sin, c, -sin, cos, f))


def _shear_x(tf, x, factor):
  return _affine(tf, x, (1.0, factor, 0.0, 0.0, 1.0, 0.0))


def _shear_y(tf, x, factor):
  return _affine(tf, x, (1.0, 0.0, 0.0, factor, 1.0, 0.0))


def _translate_x_rel(tf, x, pct):
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(x)[1], tf.float64)
  return _affine(tf, x, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def _translate_y_rel(tf, x, pct):
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(x)[0], tf.float64)
  return _affine(tf, x, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add, "ColorIncreasing": _color, "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness, "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x, "ShearY": _shear_y, "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}


def level_to_arg(name, magnitude, negate=False):
  """timm's magnitude (0..10) -> the op's PIL argument; `negate` is timm's random sign flip.

  Rotate 30 m/10 deg, shear 0.3 m/10, translate 0.45 m/10 of the side (all signed); posterize
  4 - int(4 m/10) bits; solarize threshold 256 - int(256 m/10); solarize-add int(110 m/10);
  enhance factors max(0.1, 1 +- 0.9 m/10). None for the ops without an argument.
  """
  tf, _ = tf_modules()
  level = tf.cast(tf.convert_to_tensor(magnitude, dtype_hint=tf.float64), tf.float64) / LEVEL_DENOM
  sign = tf.where(tf.cast(negate, tf.bool), -1.0, 1.0)
  sign = tf.cast(sign, tf.float64)
  if name == "Rotate":
    return sign * (level * 30.0)
  if name in ("ShearX", "ShearY"):
    return sign * (level * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * (level * 0.45)
  if name == "PosterizeIncreasing":
    return 4 - tf.cast(tf.floor(level * 4.0), tf.int32)
  if name == "SolarizeIncreasing":
    return 256 - tf.cast(tf.floor(level * 256.0), tf.int32)
  if name == "SolarizeAdd":
    return tf.cast(tf.floor(level * 110.0), tf.int32)
  if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
    return tf.maximum(tf.constant(0.1, tf.float64), 1.0 + sign * (level * 0.9))
  if name in _OPS:
    return None
  raise ValueError(f"unknown RandAugment op {name!r}; expected one of {', '.join(OPS)}")


def apply_op(name, image, magnitude_arg=None):
  """One RandAugment op on (H, W, 3) pixels in [0, 255] with its PIL argument (`level_to_arg`)."""
  if name not in _OPS:
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {', '.join(OPS)}")
  tf, _ = tf_modules()
  image = tf.convert_to_tensor(image)
  return _as_dtype(tf, _OPS[name](tf, _pixels(tf, image), magnitude_arg), image.dtype)


def rand_augment(image, seed, *, num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5,
                 magnitude_max=LEVEL_DENOM):
  """timm `rand-m{magnitude}-mstd{magnitude_std}-inc1` on (H, W, 3) pixels, keyed by `seed` (2,).

  `num_ops` ops drawn uniformly with replacement; each applied with probability `prob`, with
  its own magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (uniform in
  [0, magnitude] when magnitude_std is inf, as timm) and its own random sign.
  """
  tf, _ = tf_modules()
  image = tf.convert_to_tensor(image)
  x = _pixels(tf, image)
  for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
    s_op, s_coin, s_mag = tf.unstack(tf.random.experimental.stateless_split(op_seed, 3))
    index = tf.random.stateless_uniform([], s_op, 0, len(OPS), dtype=tf.int32)
    coin = tf.random.stateless_uniform([2], s_coin, dtype=tf.float64)  # apply?, negate?
    if math.isinf(magnitude_std):
      m = tf.random.stateless_uniform([], s_mag, 0.0, magnitude, dtype=tf.float64)
    elif magnitude_std > 0:
      m = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag, dtype=tf.float64)
    else:
      m = tf.constant(magnitude, tf.float64)
    m = tf.clip_by_value(m, 0.0, magnitude_max)
    negate = coin[1] > 0.5

    def branch(name, x=x, m=m, negate=negate):
      return _OPS[name](tf, x, level_to_arg(name, m, negate))

    branches = [functools.partial(branch, name) for name in OPS]
    x = tf.cond(coin[0] <= prob, lambda x=x: tf.switch_case(index, branches), lambda x=x: x)
    x = tf.ensure_shape(x, image.shape)
  return _as_dtype(tf, x, image.dtype)


def random_erasing(image_normalised, seed, *, prob=0.25, area=(0.02, 1 / 3),
                   log_aspect=(math.log(0.3), math.log(1 / 0.3)), tries=10):
  """timm RandomErasing, mode 'pixel', one box, on a normalised float (H, W, C) image.

  With probability `prob`: up to `tries` (area fraction, log aspect h/w) draws; the first box
  with h < H and w < W (sides rounded half-to-even, as Python's round) is placed uniformly and
  its pixels replaced by N(0, 1) draws; if none fits the image is returned unchanged.
  """
  tf, _ = tf_modules()
  image = tf.convert_to_tensor(image_normalised)
  s_apply, s_box, s_pos, s_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  u = tf.random.stateless_uniform([2, tries], s_box, dtype=tf.float64)  # area, aspect
  target = (area[0] + (area[1] - area[0]) * u[0]) * tf.cast(h * w, tf.float64)
  aspect = tf.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
  box_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (box_w < w) & (box_h < h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # the first try that fits
  box_h, box_w = box_h[first], box_w[first]
  pos = tf.random.stateless_uniform([2, tries], s_pos)
  top = randint(tf, pos[0][first], h - box_h + 1)  # randint(0, H - h), both ends included
  left = randint(tf, pos[1][first], w - box_w + 1)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  box = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], s_apply) <= prob)
  noise = tf.random.stateless_normal(shape, s_noise, dtype=image.dtype)
  return tf.where(erase & box[..., None], noise, image)
