"""RandAugment ops against PIL called the way timm calls it, RandAugment draws, random erasing.

Tolerances: the LUT ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd) must
be exact; the enhance and affine ops at most 1 grey level on at most 0.5% of the values (they
are bit-exact on this machine; the slack only covers float rounding differences across CPUs).
"""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data import augment, bundled_photos
from mae_jax.data.transforms import tf_modules

tf, _ = tf_modules()

FILL = (124, 116, 104)
EXACT = {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
         "SolarizeAdd"}


def _crops():
  """A square 64x64 crop of the astronaut and a 48x64 one of the coffee cup (H != W)."""
  photos = bundled_photos()
  return photos[0][100:164, 180:244], photos[5][50:98, 100:164]


def _affine(im, matrix):
  return im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _posterize(im, bits):
  if bits >= 8:
    return im
  if bits == 0:  # older Pillow gave black; Pillow 13 refuses 0 bits
    return im.point(lambda _: 0)
  return ImageOps.posterize(im, bits)


def _solarize_add(im, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return im.point(lut * 3)


# PIL as timm's auto_augment.py calls it (bicubic resample, ImageNet-mean fill)
PIL_OPS = {
    "AutoContrast": lambda im, _: ImageOps.autocontrast(im),
    "Equalize": lambda im, _: ImageOps.equalize(im),
    "Invert": lambda im, _: ImageOps.invert(im),
    "Rotate": lambda im, a: im.rotate(a, resample=Image.BICUBIC, fillcolor=FILL),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": lambda im, a: ImageOps.solarize(im, a),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda im, a: ImageEnhance.Color(im).enhance(a),
    "ContrastIncreasing": lambda im, a: ImageEnhance.Contrast(im).enhance(a),
    "BrightnessIncreasing": lambda im, a: ImageEnhance.Brightness(im).enhance(a),
    "SharpnessIncreasing": lambda im, a: ImageEnhance.Sharpness(im).enhance(a),
    "ShearX": lambda im, a: _affine(im, (1, a, 0, 0, 1, 0)),
    "ShearY": lambda im, a: _affine(im, (1, 0, 0, a, 1, 0)),
    "TranslateXRel": lambda im, a: _affine(im, (1, 0, a * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im, a: _affine(im, (1, 0, 0, 0, 1, a * im.size[1])),
}


def _timm_arg(name, m, negate):
  """timm's level -> argument mappings for the 'increasing' ops, written out."""
  s = -1.0 if negate else 1.0
  return {"Rotate": s * (m / 10) * 30.0, "ShearX": s * (m / 10) * 0.3,
          "ShearY": s * (m / 10) * 0.3, "TranslateXRel": s * (m / 10) * 0.45,
          "TranslateYRel": s * (m / 10) * 0.45, "PosterizeIncreasing": 4 - int((m / 10) * 4),
          "SolarizeIncreasing": 256 - int((m / 10) * 256), "SolarizeAdd": int((m / 10) * 110),
          }.get(name, max(0.1, 1.0 + s * (m / 10) * 0.9) if name.endswith("Increasing") else None)


def test_ops_are_timms_fifteen():
  assert len(augment.OPS) == 15 and set(augment.OPS) == set(PIL_OPS)


@pytest.mark.parametrize("name", augment.OPS)
def test_op_matches_pil(name):
  for image in _crops():
    for m, negate in ((9.0, False), (7.3, True), (10.0, False)):
      arg = augment.level_to_arg(name, m, negate)
      want_arg = _timm_arg(name, m, negate)
      if arg is None:
        assert want_arg is None
        pil_arg = None
      else:
        pil_arg = arg.numpy().item()
        assert pil_arg == pytest.approx(want_arg, abs=1e-12), (name, m)
      want = np.asarray(PIL_OPS[name](Image.fromarray(image), pil_arg)).astype(int)
      got = augment.apply_op(name, image, arg)
      assert got.dtype == tf.uint8 and got.shape == image.shape
      diff = np.abs(got.numpy().astype(int) - want)
      if name in EXACT:
        assert diff.max() == 0, (name, m)
      else:
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (name, m, diff.max())


def test_apply_op_dtypes_and_float_input():
  image = _crops()[1]
  as_float = image.astype(np.float32) + 0.3  # rounded onto the uint8 grid first
  got = augment.apply_op("Rotate", as_float, 12.5)
  assert got.dtype == tf.float32
  np.testing.assert_array_equal(got.numpy(), augment.apply_op("Rotate", image, 12.5).numpy())
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    augment.apply_op("Cutout", image)


def test_rand_augment_deterministic_and_seed_dependent():
  image = _crops()[0]
  a = augment.rand_augment(image, tf.constant([1, 2])).numpy()
  b = augment.rand_augment(image, tf.constant([1, 2])).numpy()
  np.testing.assert_array_equal(a, b)
  outs = [augment.rand_augment(image, tf.constant([s, 0])).numpy() for s in range(6)]
  assert len({o.tobytes() for o in outs}) >= 4
  unchanged = augment.rand_augment(image, tf.constant([1, 2]), prob=0.0).numpy()
  np.testing.assert_array_equal(unchanged, image)


def test_rand_augment_in_tf_data_is_one_of_the_ops():
  """In a tf.data map (graph mode): with one op, prob 1, fixed magnitude, each output is one
  of the 15 ops (either sign) applied to the image, and several different ops get chosen."""
  image = _crops()[1][:32, :32]
  candidates = []
  for name in augment.OPS:
    for negate in (False, True):
      candidates.append(augment.apply_op(name, image, augment.level_to_arg(name, 9.0, negate)))
  candidates = np.stack([c.numpy() for c in candidates])
  seeds = tf.stack([tf.range(20), tf.zeros(20, tf.int32)], axis=1)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: augment.rand_augment(
      image, s, num_ops=1, prob=1.0, magnitude_std=0.0))
  picked = set()
  for out in ds.as_numpy_iterator():
    match = np.nonzero(np.all(candidates == out, axis=(1, 2, 3)))[0]
    assert match.size, "output is not any single op of the image"
    picked.add(int(match[0]) // 2)
  assert len(picked) >= 6


def test_rand_augment_default_recipe_in_tf_data():
  """2 ops, p 0.5, magnitude ~ N(9, 0.5), in graph mode: float32 in and out, uint8 grid."""
  image = _crops()[1][:32, :32]
  seeds = tf.stack([tf.range(4), tf.ones(4, tf.int32)], axis=1)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: augment.rand_augment(tf.cast(image, tf.float32), s))
  outs = list(ds.as_numpy_iterator())
  assert all(o.dtype == np.float32 and o.shape == image.shape for o in outs)
  assert np.all(np.stack(outs) == np.round(np.stack(outs)))  # stays on the uint8 grid


def _erase_many(image, count, **kwargs):
  seeds = tf.stack([tf.range(count), tf.fill([count], 5)], axis=1)
  fn = tf.function(lambda s: tf.map_fn(
      lambda one: augment.random_erasing(image, one, **kwargs), s,
      fn_output_signature=tf.float32))
  return fn(seeds).numpy()


def _timm_boxes(height, width, count, rng):
  """timm RandomErasing's box loop in numpy: (h, w) of the box, or None when no try fits."""
  lo, hi = math.log(0.3), math.log(1 / 0.3)
  out = []
  for _ in range(count):
    for _ in range(10):
      target = rng.uniform(0.02, 1 / 3) * height * width
      aspect = math.exp(rng.uniform(lo, hi))
      h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
      if w < width and h < height:
        out.append((h, w))
        break
  return np.array(out)


def test_random_erasing_box_statistics():
  height, width, count = 32, 48, 400
  outs = _erase_many(np.zeros((height, width, 3), np.float32), count, prob=1.0)
  erased = np.any(outs != 0, axis=-1)  # N(0,1) draws are never exactly 0
  sizes = []
  for mask, out in zip(erased, outs):
    rows, cols = np.nonzero(mask)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
    assert mask.sum() == h * w and h < height and w < width
    sizes.append((h, w))
  sizes = np.array(sizes)
  want = _timm_boxes(height, width, 20000, np.random.default_rng(0))
  for stat in (lambda s: s[:, 0] * s[:, 1] / (height * width),  # area fraction
               lambda s: np.log(s[:, 0] / s[:, 1])):  # log aspect h / w
    got, ref = stat(sizes), stat(want)
    assert abs(got.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(count)
  assert abs(sizes[:, 0].std() / want[:, 0].std() - 1) < 0.2
  values = outs[erased]
  assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05


def test_random_erasing_outside_unchanged_and_prob():
  rng = np.random.default_rng(3)
  image = rng.normal(size=(24, 20, 3)).astype(np.float32) + 5.0  # far from N(0,1) values
  outs = _erase_many(image, 400)  # default prob 0.25
  changed = np.any(outs != image, axis=(1, 2, 3))
  assert changed.mean() == pytest.approx(0.25, abs=0.07)
  for out in outs[changed]:
    inside = np.all(out != image, axis=-1)
    np.testing.assert_array_equal(out[~inside], image[~inside])
    assert np.abs(out[inside]).max() < 5.0  # replaced by N(0,1) noise, not a shifted copy
  again = _erase_many(image, 8)
  np.testing.assert_array_equal(again, outs[:8])  # a pure function of (image, seed)
