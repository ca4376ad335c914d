import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax import optim


def _official_lr(it, iters_per_epoch, lr, warmup_epochs, epochs, min_lr=0.0):
  """The official per-iteration rule: linear warm-up, then half-cycle cosine (by epoch fraction)."""
  epoch = it / iters_per_epoch
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_scaled_lr():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_schedule_matches_official_rule():
  per_epoch, epochs, warmup = 10, 20, 4
  peak = optim.scaled_lr(1.5e-4, 4096)
  schedule = optim.warmup_cosine(peak, warmup * per_epoch, epochs * per_epoch)
  for it in range(epochs * per_epoch):
    np.testing.assert_allclose(float(schedule(it)), _official_lr(it, per_epoch, peak, warmup, epochs),
                               rtol=1e-5, atol=1e-6 * peak)


def test_schedule_rejects_bad_steps():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.warmup_cosine(1e-3, 50, 10)


def test_decay_mask_ndim():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4), "scale": jnp.ones(4),
            "cls_token": jnp.ones((1, 1, 4)), "conv": jnp.ones((2, 2, 3, 4))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False,
                                      "cls_token": True, "conv": True}


def test_adamw_step_matches_numpy():
  """Two AdamW steps against a numpy re-derivation with decoupled, masked weight decay."""
  lr, b1, b2, wd, eps = 1e-2, 0.9, 0.95, 0.05, 1e-8
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  grads = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))} for _ in range(2)]
  tx = optim.adamw(optax.constant_schedule(lr))
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  for name in params:
    x, m, v = params[name].copy(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
      m = b1 * m + (1 - b1) * g[name]
      v = b2 * v + (1 - b2) * g[name] ** 2
      step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
      decay = wd * x if x.ndim >= 2 else 0.0
      x = x - lr * (step + decay)
    np.testing.assert_allclose(np.asarray(p[name]), x, rtol=1e-5)
