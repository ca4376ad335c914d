"""Patchify / unpatchify, 2-D sin-cos position tables and mask samplers.

Everything here is a pure function over arrays with static shapes, so it can be
unit-tested on its own and traced under `jax.jit` without recompiles.
"""

import math
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np

MASK_SAMPLERS = ("random", "block", "grid")


def grid_size(img_size, patch_size):
  """(rows, cols) of the patch grid; `img_size` is an int or (H, W)."""
  h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"model.img_size={img_size} is not divisible by model.patch_size={patch_size}")
  return h // patch_size, w // patch_size


def patchify(images, patch_size):
  """(B, H, W, C) -> (B, L, p*p*C), rows of the grid first, (row, col, chan) inside a patch."""
  return einops.rearrange(
      images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches, patch_size, grid, channels=3):
  """Exact inverse of `patchify`; `grid` = (rows, cols) of the patch grid."""
  return einops.rearrange(
      patches, "b (h w) (p q c) -> b (h p) (w q) c",
      h=grid[0], w=grid[1], p=patch_size, q=patch_size, c=channels)


def sincos_1d(dim, positions):
  """(N,) positions -> (N, dim) table laid out as [sin | cos], omega_k = 1/10000^(k/(dim/2))."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid, cls_token=True):
  """Fixed 2-D table (L [+1], dim): per token [sin(w) | cos(w) | sin(h) | cos(h)].

  `grid` = (rows, cols); a leading all-zero row is added for the cls token.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
  rows, cols = grid
  hh, ww = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols)
  table = np.concatenate(
      [sincos_1d(dim // 2, ww.reshape(-1)), sincos_1d(dim // 2, hh.reshape(-1))], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


class Masking(NamedTuple):
  """What every sampler returns; `len_keep` is static (a Python int)."""
  ids_keep: jax.Array     # (B, len_keep) int32, positions of visible patches
  mask: jax.Array         # (B, L) float32, 1 = removed, 0 = kept, original order
  ids_restore: jax.Array  # (B, L) int32, inverse permutation of the shuffle


def num_keep(num_patches, mask_ratio):
  """len_keep = int(L * (1 - mask_ratio)), as the official code."""
  return int(num_patches * (1 - mask_ratio))


def masking_from_noise(noise, len_keep):
  """Per-example shuffle: keep the `len_keep` patches with the lowest noise."""
  ids_shuffle = jnp.argsort(noise, axis=1)  # (B, L)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return Masking(ids_keep.astype(jnp.int32), mask, ids_restore.astype(jnp.int32))


def random_noise(key, batch, num_patches):
  """Uniform noise (B, L) for random masking."""
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def grid_noise(key, batch, grid):
  """Scores that keep one patch of every 2x2 cell (ratio 0.75): kept ones score lowest.

  `key` is unused: the grid is regular, as in the paper's Fig. 6.
  """
  del key
  rows, cols = grid
  hh, ww = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  removed = ((hh % 2 != 0) | (ww % 2 != 0)).reshape(-1).astype(np.float32)
  # Ties are broken by position (argsort is stable), so the kept set is exact.
  return jnp.broadcast_to(jnp.asarray(removed), (batch, rows * cols))


def _block_mask_one(key, grid, num_masking, min_patches=16, min_aspect=0.3,
                    max_attempts=100):
  """BEiT-style block mask for one image: (rows, cols) bool, about `num_masking` True.

  Rectangles of random area and aspect ratio are added while they mask at least
  one new patch and do not overshoot the target; like BEiT, the result may fall
  a little short of the target, which the caller tops up.
  """
  rows, cols = grid
  log_aspect = (np.log(min_aspect), np.log(1.0 / min_aspect))
  hh = jnp.arange(rows)[:, None]
  ww = jnp.arange(cols)[None, :]

  def cond(carry):
    _, mask, attempt = carry
    return (mask.sum() < num_masking) & (attempt < max_attempts)

  def body(carry):
    key, mask, attempt = carry
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    remaining = num_masking - mask.sum()
    lo = jnp.minimum(min_patches, remaining).astype(jnp.float32)
    area = jax.random.uniform(k_area, minval=lo, maxval=remaining.astype(jnp.float32))
    aspect = jnp.exp(jax.random.uniform(k_aspect, minval=log_aspect[0], maxval=log_aspect[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(rows - h, 0) + 1)
    left = jax.random.randint(k_left, (), 0, jnp.maximum(cols - w, 0) + 1)
    rect = (hh >= top) & (hh < top + h) & (ww >= left) & (ww < left + w)
    delta = (rect & ~mask).sum()
    ok = (h < rows) & (w < cols) & (delta > 0) & (delta <= remaining)
    return key, jnp.where(ok, mask | rect, mask), attempt + 1

  init = (key, jnp.zeros((rows, cols), bool), jnp.int32(0))
  return jax.lax.while_loop(cond, body, init)[1]


def block_noise(key, batch, grid, mask_ratio):
  """Scores for BEiT-style block masking: patches inside blocks score highest.

  Random tie-breaking inside each group lets `masking_from_noise` hit the
  static len_keep exactly even when the blocks under- or overshoot.
  """
  num_patches = grid[0] * grid[1]
  num_masking = num_patches - num_keep(num_patches, mask_ratio)
  k_blocks, k_tie = jax.random.split(key)
  blocks = jax.vmap(lambda k: _block_mask_one(k, grid, num_masking))(
      jax.random.split(k_blocks, batch))
  tie = jax.random.uniform(k_tie, (batch, num_patches), jnp.float32)
  return blocks.reshape(batch, num_patches).astype(jnp.float32) + tie


def sample_noise(sampler, key, batch, grid, mask_ratio):
  """Scores (B, L) for `sampler` in MASK_SAMPLERS; lowest `len_keep` scores are kept."""
  if sampler == "random":
    return random_noise(key, batch, grid[0] * grid[1])
  if sampler == "block":
    return block_noise(key, batch, grid, mask_ratio)
  if sampler == "grid":
    if num_keep(grid[0] * grid[1], mask_ratio) != ((grid[0] + 1) // 2) * ((grid[1] + 1) // 2):
      raise ValueError(f"grid masking keeps one patch per 2x2 cell; it needs mask_ratio=0.75 "
                       f"on an even grid, got mask_ratio={mask_ratio} on grid {grid}")
    return grid_noise(key, batch, grid)
  raise ValueError(f"unknown mask sampler {sampler!r}; expected one of {MASK_SAMPLERS}")


def example_noise(sampler, key, example_ids, grid, mask_ratio):
  """Scores (B, L) where row i depends only on (key, example_ids[i]).

  Folding the global example index into the key makes masks independent of how
  the batch is split over devices and processes, and distinct for every example.
  """
  def one(example_id):
    return sample_noise(sampler, jax.random.fold_in(key, example_id), 1, grid, mask_ratio)[0]
  return jax.vmap(one)(example_ids)


def _torch_bicubic_matrix(size_in, size_out, a=-0.75):
  """(size_out, size_in) weights of torch's bicubic resize, `align_corners=False`.

  Cubic convolution with a = -0.75, source coordinate (i + 0.5) * in/out - 0.5 (not
  clamped), neighbour indices clamped to the border: torch's `upsample_bicubic2d`.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  weights = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  for i in range(size_out):
    real = scale * (i + 0.5) - 0.5
    base = math.floor(real)
    t = real - base
    for k, w in zip(range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(base + k, 0), size_in - 1)] += w
  return weights


def resize_pos_embed(table, old_grid, new_grid):
  """(1, 1 + L_old, D) position table -> (1, 1 + L_new, D): the patch rows resized bicubically
  over the grid as torch's `F.interpolate(..., mode='bicubic', align_corners=False)`, the
  cls row kept (the official `interpolate_pos_embed`)."""
  table = np.asarray(table)
  if tuple(old_grid) == tuple(new_grid):
    return table
  (gh, gw), (nh, nw) = old_grid, new_grid
  if table.shape[1] != 1 + gh * gw:
    raise ValueError(f"position table has {table.shape[1]} rows, expected 1 + {gh}x{gw}")
  grid = table[0, 1:].reshape(gh, gw, -1).astype(np.float64)
  grid = np.einsum("ih,hwd->iwd", _torch_bicubic_matrix(gh, nh), grid)
  grid = np.einsum("jw,iwd->ijd", _torch_bicubic_matrix(gw, nw), grid)
  rows = np.concatenate([table[0, :1], grid.reshape(nh * nw, -1).astype(table.dtype)])
  return rows[None]
