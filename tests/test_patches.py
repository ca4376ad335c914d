import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import official_sincos_table
from mae_jax import patches


def _official_patchify(images_nhwc, p):
  """The official torch code's reshape + einsum('nchpwq->nhwpqc'), in numpy on NCHW."""
  x = np.transpose(images_nhwc, (0, 3, 1, 2))
  n, c, hh, ww = x.shape
  x = x.reshape(n, c, hh // p, p, ww // p, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, (hh // p) * (ww // p), p * p * c)


def test_patchify_hand_built_order():
  p, h, w, c = 2, 4, 6, 3  # non-square: grid (2, 3)
  image = np.zeros((1, h, w, c), np.float32)
  for y in range(h):
    for x in range(w):
      for ch in range(c):
        image[0, y, x, ch] = 100 * y + 10 * x + ch
  out = np.asarray(patchify_np := patches.patchify(jnp.asarray(image), p))
  assert out.shape == (1, 6, 12)
  for i in range(2):
    for j in range(3):
      for r in range(p):
        for s in range(p):
          for ch in range(c):
            want = 100 * (p * i + r) + 10 * (p * j + s) + ch
            assert out[0, i * 3 + j, r * p * c + s * c + ch] == want
  np.testing.assert_array_equal(out, _official_patchify(image, p))
  del patchify_np


@pytest.mark.parametrize("shape,p", [((2, 32, 32, 3), 8), ((3, 28, 42, 3), 14), ((1, 16, 8, 1), 4)])
def test_patchify_matches_official_and_round_trips(shape, p):
  images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out = patches.patchify(jnp.asarray(images), p)
  np.testing.assert_array_equal(np.asarray(out), _official_patchify(images, p))
  grid = (shape[1] // p, shape[2] // p)
  back = patches.unpatchify(out, p, grid, shape[3])
  np.testing.assert_array_equal(np.asarray(back), images)


def test_grid_size_rejects_indivisible():
  with pytest.raises(ValueError, match="img_size=225.*patch_size=16"):
    patches.grid_size(225, 16)


@pytest.mark.parametrize("dim,grid", [(64, (4, 4)), (32, (3, 5)), (768, (14, 14)), (16, (1, 2))])
def test_sincos_matches_official_formula(dim, grid):
  ours = patches.sincos_2d(dim, grid)
  ref = official_sincos_table(dim, *grid)
  assert ours.shape == (1 + grid[0] * grid[1], dim) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  assert not ours[0].any()


def test_sincos_rejects_bad_dim():
  with pytest.raises(ValueError, match="multiple of 4"):
    patches.sincos_2d(30, (2, 2))


def test_random_masking_contract():
  batch, num_patches, ratio = 16, 49, 0.75
  len_keep = patches.num_keep(num_patches, ratio)
  assert len_keep == 12  # int(49 * 0.25)
  noise = patches.random_noise(jax.random.key(0), batch, num_patches)
  m = jax.jit(patches.masking_from_noise, static_argnums=1)(noise, len_keep)
  ids_keep, mask, ids_restore = map(np.asarray, m)
  noise = np.asarray(noise)
  assert ids_keep.shape == (batch, len_keep) and mask.shape == (batch, num_patches)
  np.testing.assert_array_equal(mask.sum(1), num_patches - len_keep)
  for b in range(batch):
    shuffle = np.argsort(noise[b])
    np.testing.assert_array_equal(ids_keep[b], shuffle[:len_keep])
    # ids_restore inverts the shuffle
    np.testing.assert_array_equal(shuffle[ids_restore[b]], np.arange(num_patches))
    # kept patches are unmasked, all others masked
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(shuffle[:len_keep]))
  # different examples get different masks
  assert len({mask[b].tobytes() for b in range(batch)}) == batch


def test_example_noise_depends_only_on_example_index():
  key, grid = jax.random.key(3), (4, 4)
  ids = jnp.arange(8, dtype=jnp.int32) + 100
  whole = patches.example_noise("random", key, ids, grid, 0.75)
  halves = jnp.concatenate([patches.example_noise("random", key, ids[:4], grid, 0.75),
                            patches.example_noise("random", key, ids[4:], grid, 0.75)])
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(halves))
  assert len({np.asarray(r).tobytes() for r in whole}) == 8


def _masked_neighbour_fraction(mask, grid):
  m = np.asarray(mask).reshape(-1, *grid).astype(bool)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  neighbours = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
  return (neighbours & m).sum() / m.sum()


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_masking_ratio_shape_and_blockiness(ratio):
  grid, batch = (14, 14), 32
  len_keep = patches.num_keep(196, ratio)
  sample = jax.jit(lambda k: patches.sample_noise("block", k, batch, grid, ratio))
  block = patches.masking_from_noise(sample(jax.random.key(1)), len_keep)
  rand = patches.masking_from_noise(patches.random_noise(jax.random.key(1), batch, 196), len_keep)
  assert block.mask.shape == (batch, 196) and block.ids_keep.shape == (batch, len_keep)
  np.testing.assert_array_equal(np.asarray(block.mask).sum(1), 196 - len_keep)
  # Blocks: removed patches are surrounded by removed patches far more often than at random.
  assert _masked_neighbour_fraction(block.mask, grid) > 1.5 * _masked_neighbour_fraction(
      rand.mask, grid)
  assert len({np.asarray(r).tobytes() for r in block.mask}) == batch


def test_grid_masking_keeps_one_of_each_2x2():
  grid = (4, 6)
  m = patches.masking_from_noise(patches.sample_noise("grid", jax.random.key(0), 2, grid, 0.75),
                                 patches.num_keep(24, 0.75))
  want = np.ones(grid)
  want[::2, ::2] = 0
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(m.mask[b]).reshape(grid), want)
  assert np.asarray(m.mask).mean() == 0.75
  with pytest.raises(ValueError, match="mask_ratio=0.75"):
    patches.sample_noise("grid", jax.random.key(0), 2, grid, 0.5)


def test_unknown_sampler():
  with pytest.raises(ValueError, match="unknown mask sampler 'spiral'"):
    patches.sample_noise("spiral", jax.random.key(0), 1, (2, 2), 0.75)
