"""Mixup / CutMix against timm Mixup mode='batch' semantics (SPEC section 7), from the rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import mixup

B, H, W, C, N = 4, 16, 12, 3, 5
LABELS = jnp.array([0, 1, 2, 4])  # partner labels (flipped) always differ from one's own


def _constant_images():
  """Image i filled with the value i + 1: each pixel tells whose it is."""
  return jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None],
                          (B, H, W, C))


def _lam_from_targets(targets, smoothing):
  """Recover λ from row 0: its own label holds λ on + (1-λ) off."""
  off = smoothing / N
  on = 1.0 - smoothing + off
  return (np.asarray(targets)[0, int(LABELS[0])] - off) / (on - off)


def _many(fn, count):
  keys = jax.random.split(jax.random.key(7), count)
  return jax.jit(jax.vmap(fn))(keys)


def test_smooth_one_hot():
  y = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
  np.testing.assert_allclose(y[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("cutmix_alpha,mixup_alpha", [(1.0, 0.0), (0.0, 0.8), (1.0, 0.8)])
def test_label_mass_is_one(cutmix_alpha, mixup_alpha):
  _, targets = _many(lambda k: mixup.mixup_cutmix(
      k, _constant_images(), LABELS, num_classes=N, mixup_alpha=mixup_alpha,
      cutmix_alpha=cutmix_alpha), 64)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(targets) >= 0)


def test_cutmix_partner_fraction_equals_corrected_lambda():
  images = _constant_images()
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=N, mixup_alpha=0.0,
                                 cutmix_alpha=1.0))
  for seed in range(20):
    out, targets = fn(jax.random.key(seed), images, LABELS)
    out = np.asarray(out)
    lam = _lam_from_targets(targets, 0.1)
    from_partner = out[0] == B  # the partner of example 0 is example B-1 (value B)
    assert set(np.unique(out[0])) <= {1.0, float(B)}
    assert from_partner.mean() == pytest.approx(1.0 - lam, abs=1e-6)
    # one box, the same for the whole batch, and each example got its flipped partner's pixels
    rows, cols = np.nonzero(from_partner[..., 0])
    if rows.size:
      assert from_partner[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    for i in range(B):
      np.testing.assert_array_equal(out[i] == B - i, from_partner)
    # targets: λ y + (1-λ) y_flipped
    y = np.asarray(mixup.smooth_one_hot(LABELS, N, 0.1))
    np.testing.assert_allclose(np.asarray(targets), lam * y + (1 - lam) * y[::-1], atol=1e-6)


def test_cutmix_box_follows_timm_rule():
  """Box sides 2 * (int(side * sqrt(1-λ)) // 2) before clipping, centre anywhere in the image."""
  fn = lambda k: mixup.mixup_cutmix(k, _constant_images(), LABELS, num_classes=N,
                                    mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
  outs, targets = _many(fn, 400)
  outs, lam0 = np.asarray(outs), np.asarray(targets)[:, 0, 0]
  heights = (outs[:, 0, :, :, 0] == B).any(2).sum(1)
  assert heights.max() <= H and (heights % 2 == 1).any()  # odd heights only from clipping
  centres_cover = (outs[:, 0, :, :, 0] == B).any(0)
  assert centres_cover[0, 0] and centres_cover[-1, -1]  # boxes reach every corner
  assert 0.4 < lam0.mean() < 0.75  # U(0,1) before the clip correction pushes λ up


def test_mixup_is_convex_with_flipped_batch():
  images = jax.random.uniform(jax.random.key(0), (B, H, W, C)) * 255
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=N, mixup_alpha=0.8,
                                 cutmix_alpha=0.0))
  for seed in range(5):
    out, targets = fn(jax.random.key(seed), images.astype(jnp.uint8), LABELS)
    assert out.dtype == jnp.float32
    lam = _lam_from_targets(targets, 0.1)
    x = np.asarray(images.astype(jnp.uint8), np.float32)
    np.testing.assert_allclose(np.asarray(out), lam * x + (1 - lam) * x[::-1], atol=1e-3)


def test_mixup_lambda_statistics():
  count, alpha = 1500, 0.8
  fn = lambda k: mixup.mixup_cutmix(k, _constant_images(), LABELS, num_classes=N,
                                    mixup_alpha=alpha, cutmix_alpha=0.0, smoothing=0.0)
  _, targets = _many(fn, count)
  lam = np.asarray(targets)[:, 0, 0]
  var = 1.0 / (4 * (2 * alpha + 1))  # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1))
  assert lam.mean() == pytest.approx(0.5, abs=4 * np.sqrt(var / count))
  assert lam.var() == pytest.approx(var, rel=0.1)


def test_switch_prob_picks_cutmix():
  """Both alphas: cutmix (pixels only ever 1 or B in image 0) about switch_prob of the time."""
  fn = lambda k: mixup.mixup_cutmix(k, _constant_images(), LABELS, num_classes=N,
                                    switch_prob=0.3)[0]
  outs = np.asarray(_many(fn, 600))[:, 0]
  is_cut = np.all((outs == 1) | (outs == B), axis=(1, 2, 3))
  assert is_cut.mean() == pytest.approx(0.3, abs=0.06)


def test_prob_leaves_batches_unmixed():
  fn = lambda k: mixup.mixup_cutmix(k, _constant_images(), LABELS, num_classes=N, prob=0.3)
  outs, targets = _many(fn, 1000)
  unmixed = np.all(np.asarray(outs) == np.asarray(_constant_images()), axis=(1, 2, 3, 4))
  assert unmixed.mean() == pytest.approx(0.7, abs=0.05)
  smoothed = np.asarray(mixup.smooth_one_hot(LABELS, N, 0.1))
  np.testing.assert_allclose(np.asarray(targets)[unmixed], np.broadcast_to(
      smoothed, (unmixed.sum(), B, N)), atol=1e-7)


def test_jits_with_static_shapes():
  images = jax.random.uniform(jax.random.key(1), (B, H, W, C))
  fn = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=N))
  out, targets = fn(jax.random.key(3), images, LABELS)
  assert out.shape == (B, H, W, C) and out.dtype == jnp.float32 and targets.shape == (B, N)
  again, _ = fn(jax.random.key(3), images, LABELS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(again))  # a pure function of key
  assert fn._cache_size() == 1  # no retrace: nothing data-dependent in the shapes


def test_rejects_no_alpha():
  with pytest.raises(ValueError, match="alpha"):
    mixup.mixup_cutmix(jax.random.key(0), _constant_images(), LABELS, num_classes=N,
                       mixup_alpha=0.0, cutmix_alpha=0.0)


def test_soft_target_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, N)).astype(np.float32)
  targets = rng.dirichlet(np.ones(N), size=3).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.mean(np.sum(-targets * logp, -1))
  got = mixup.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert float(got) == pytest.approx(want, rel=1e-5)
