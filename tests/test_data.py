import math

import numpy as np
import pytest

from mae_jax import imaging
from mae_jax import data as ip


def test_bundled_photos_are_real_rgb():
  photos = ip.bundled_photos()
  assert len(photos) == len(ip.BUNDLED_PHOTOS) == 18
  for photo in photos:
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert min(photo.shape[:2]) >= 128 and photo.std() > 10  # not blank, not tiny


def test_crop_area_and_aspect_statistics():
  rng = np.random.default_rng(0)
  h, w = 300, 400
  fractions, aspects = [], []
  for _ in range(4000):
    _, _, ch, cw = ip.random_resized_crop_box(rng, h, w)
    fractions.append(ch * cw / (h * w))
    aspects.append(cw / ch)
  fractions, aspects = np.array(fractions), np.array(aspects)
  # rounding the side lengths moves the area a little outside [0.2, 1]
  assert fractions.min() >= 0.2 - 0.01 and fractions.max() <= 1.0
  assert fractions.max() > 0.95 and fractions.min() < 0.21
  assert aspects.min() >= 0.75 - 0.02 and aspects.max() <= 4 / 3 + 0.02
  # Where no draw can be rejected (every crop fits), the area fraction is uniform on
  # `scale` and log(aspect) uniform on log(ratio): check means and spreads.
  side = 2000
  draws = [ip.random_resized_crop_box(rng, side, side, scale=(0.2, 0.5)) for _ in range(4000)]
  fractions = np.array([h * w / side ** 2 for _, _, h, w in draws])
  log_aspect = np.log([w / h for _, _, h, w in draws])
  assert abs(fractions.mean() - 0.35) < 0.005 and abs(fractions.std() - 0.3 / 12 ** 0.5) < 0.005
  assert abs(log_aspect.mean()) < 0.01
  assert abs(log_aspect.std() - 2 * np.log(4 / 3) / 12 ** 0.5) < 0.01
  assert all(0 <= t <= side - h and 0 <= l <= side - w for t, l, h, w in draws)


def test_crop_fallback_is_centered():
  class Always:  # every draw too large: falls back to a centre crop clamped to the ratio
    def uniform(self, lo, hi):
      return hi * 10
    def integers(self, lo, hi):
      raise AssertionError("fallback must not draw a position")
  top, left, h, w = ip.random_resized_crop_box(Always(), 100, 400, scale=(5, 5))
  assert (h, w) == (100, round(100 * 4 / 3)) and left == (400 - w) // 2 and top == 0


def test_flip_rate_and_normalisation():
  batches = ip.PhotoBatches(8, 32, seed=0, crop="center")
  flips, total = 0, 0
  for _ in range(50):
    rng = np.random.default_rng([1, total])
    photo = ip.bundled_photos()[total % 5]
    view = batches.augment(rng, photo)
    flips += int(not np.array_equal(view, imaging.center_crop(photo, 32)))
    total += 1
  assert 15 <= flips <= 35  # ~50% over 50 draws (binomial, p(outside) < 0.5%)
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  want = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(imaging.normalize(images), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(imaging.denormalize(imaging.normalize(images)), images)


def test_batches_deterministic_and_resumable():
  a = ip.PhotoBatches(4, 32, seed=3)
  first = [next(a) for _ in range(3)]
  assert first[0]["images"].shape == (4, 32, 32, 3) and first[0]["images"].dtype == np.float32
  np.testing.assert_array_equal(first[1]["index"], [4, 5, 6, 7])
  b = ip.PhotoBatches(4, 32, seed=3)
  b.restore(ip.PhotoBatches(4, 32, seed=3, start_step=2).state())
  np.testing.assert_array_equal(next(b)["images"], first[2]["images"])
  c = ip.PhotoBatches(4, 32, seed=4)
  assert not np.array_equal(next(c)["images"], first[0]["images"])


def test_unknown_dataset_error(tiny_config):
  tiny_config.data.dataset = "imagenet2013"
  with pytest.raises(ValueError, match="config.data.dataset='imagenet2013'"):
    ip.create_pretrain_iterator(tiny_config)
  assert math.isfinite(ip.preview_images(2, 32).sum())
