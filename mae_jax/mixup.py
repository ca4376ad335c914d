"""Mixup / CutMix on device and the soft-target loss (timm `Mixup`, mode 'batch'; SPEC section 7).

Hand-written in JAX: timm's version is torch code that draws with numpy on the host and slices a
data-dependent box; here one pure function keyed by a PRNG key does the same draws, keeps every
shape static (the box is a mask built from iotas) and mixes in float32 under jit.

Per batch: with probability `prob` mix, else leave the images alone (targets still smoothed);
choose CutMix with probability `switch_prob` (when both alphas are > 0), λ ~ Beta(α, α);
the partner of example i is example B-1-i (the batch flipped). CutMix pastes the partner's box
of side sqrt(1-λ) * (H, W) centred uniformly, clipped to the image, and λ becomes the kept area
fraction. Targets: λ y + (1-λ) y_flipped on label-smoothed one-hots.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes, smoothing=0.0):
  """(B,) int labels -> (B, num_classes) float32: off = s / n, on = 1 - s + off."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = labels[:, None] == jnp.arange(num_classes)[None, :]
  return jnp.where(hot, on, off).astype(jnp.float32)


def _cutmix_box(key, lam, height, width):
  """timm's box for λ: (H, W) bool mask of the pasted region and the corrected λ.

  Half sides are floor(cut / 2) on both sides of the centre, so the box side is even before
  clipping, as timm's (yl = cy - cut_h // 2, yh = cy + cut_h // 2).
  """
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # (H, W)
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  return box, 1.0 - area / (height * width)


def mixup_cutmix(key, images, labels, *, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, prob=1.0, smoothing=0.1):
  """Mix a batch: (B, H, W, C) images, (B,) labels -> (mixed float32 images, (B, n) targets)."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError(f"mixup_cutmix needs mixup_alpha ({mixup_alpha}) or cutmix_alpha "
                     f"({cutmix_alpha}) > 0")
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  _, height, width, _ = images.shape
  x = images.astype(jnp.float32)
  partner = x[::-1]
  y = smooth_one_hot(labels, num_classes, smoothing)

  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

  box, lam_box = _cutmix_box(k_box, lam, height, width)
  cut = jnp.where(box[None, :, :, None], partner, x)
  mixed = lam * x + (1.0 - lam) * partner
  out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), x)
  lam = jnp.where(apply & use_cutmix, lam_box, lam)
  return out, lam * y + (1.0 - lam) * y[::-1]


def soft_target_cross_entropy(logits, targets):
  """Mean over the batch of sum_k -targets_k * log_softmax(logits)_k (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(-targets * logp, axis=-1))
