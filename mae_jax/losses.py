"""Reconstruction loss of MAE pre-training."""

import jax.numpy as jnp

NORM_PIX_EPS = 1e-6


def patch_stats(target):
  """Per-patch (mean, sqrt(var + 1e-6)) over the last axis, var unbiased (n - 1) as torch `.var()`."""
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return mean, jnp.sqrt(var + NORM_PIX_EPS)


def normalize_patches(target):
  """The norm-pix target: each patch as (t - mean) / sqrt(var + 1e-6)."""
  mean, std = patch_stats(target)
  return (target - mean) / std


def denormalize_patches(pred, target):
  """Norm-pix predictions back to pixels with each target patch's own statistics."""
  mean, std = patch_stats(target)
  return pred * std + mean


def mae_loss(pred, target, mask, norm_pix_loss=True):
  """Mean over removed patches of the per-patch MSE.

  pred, target: (B, L, p*p*C) in patchify order; mask: (B, L), 1 = removed.
  """
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # (B, L)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)
