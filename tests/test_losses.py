import numpy as np
import pytest

from mae_jax import losses


def _numpy_loss(pred, target, mask, norm_pix):
  pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
  if norm_pix:
    n = target.shape[-1]
    mean = target.sum(-1, keepdims=True) / n
    var = ((target - mean) ** 2).sum(-1, keepdims=True) / (n - 1)  # unbiased, like torch
    target = (target - mean) / np.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(norm_pix):
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 16, 48)).astype(np.float32)
  target = rng.normal(2.0, 3.0, size=(3, 16, 48)).astype(np.float32)
  mask = (rng.random((3, 16)) < 0.75).astype(np.float32)
  got = float(losses.mae_loss(pred, target, mask, norm_pix))
  np.testing.assert_allclose(got, _numpy_loss(pred, target, mask, norm_pix), rtol=2e-6)


def test_loss_ignores_visible_patches_and_uses_unbiased_variance():
  rng = np.random.default_rng(1)
  target = rng.normal(size=(1, 4, 12)).astype(np.float32)
  pred = np.array(losses.normalize_patches(target))
  mask = np.array([[1, 1, 0, 0]], np.float32)
  pred[0, 2:] += 100.0  # errors on visible patches must not count
  assert float(losses.mae_loss(pred, target, mask, True)) < 1e-10
  # a biased (ddof=0) variance would differ by the factor n / (n - 1)
  t = target[0, 0].astype(np.float64)
  want = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
  np.testing.assert_allclose(np.asarray(losses.normalize_patches(target))[0, 0], want, rtol=1e-5)
