"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible.

numpy, PIL and the model only (no TensorFlow, no CLI): used by the training loop for
TensorBoard and `reconstructions.png`, and by the `mae_jax.visualize` command line.
"""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from mae_jax import imaging, losses, patches, summaries
from mae_jax import model as model_lib

MASKED_GRAY = 0.35  # brightness (0..1) shown in place of removed patches


def reconstruction_panels(images, pred, mask, patch_size, norm_pix_loss):
  """Normalised images (B, H, W, C), pred (B, L, p*p*C), mask (B, L) -> 4 normalised panels.

  Norm-pix predictions are mapped back to pixels with each target patch's own
  mean and (unbiased) variance, as the official demo does.
  """
  images = jnp.asarray(images, jnp.float32)
  grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
  channels = images.shape[-1]
  target = patches.patchify(images, patch_size)
  if norm_pix_loss:
    pred = losses.denormalize_patches(pred, target)
  removed = jnp.asarray(mask)[:, :, None] > 0
  gray = ((MASKED_GRAY - imaging.IMAGENET_MEAN) / imaging.IMAGENET_STD)
  gray_patches = jnp.tile(jnp.asarray(gray), patch_size * patch_size)
  to_image = lambda x: patches.unpatchify(x, patch_size, grid, channels)
  masked = to_image(jnp.where(removed, gray_patches, target))
  recon = to_image(pred)
  pasted = to_image(jnp.where(removed, pred, target))
  return images, masked, recon, pasted


def grid_image(panels, gap=2):
  """Panels of normalised (B, H, W, 3) -> one uint8 picture, a row per image."""
  columns = [imaging.denormalize(p) for p in panels]
  batch, height, width, _ = columns[0].shape
  canvas = np.full((batch * (height + gap) + gap, len(columns) * (width + gap) + gap, 3), 255,
                   np.uint8)
  for col, images in enumerate(columns):
    for row in range(batch):
      top, left = gap + row * (height + gap), gap + col * (width + gap)
      canvas[top:top + height, left:left + width] = images[row]
  return canvas


def reconstruction_grid(model, images, *, key=None, noise=None, scale=1):
  """Run `model` on normalised images and return the picture (uint8), optionally upscaled."""
  _, pred, mask = model(jnp.asarray(images), noise=noise, key=key)
  panels = reconstruction_panels(images, pred, mask, model.config.patch_size,
                                 model.config.norm_pix_loss)
  picture = grid_image(panels)
  if scale > 1:
    picture = np.asarray(Image.fromarray(picture).resize(
        (picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST))
  return picture


def save_png(picture, path):
  """Write a uint8 (H, W, 3) picture as PNG (local path or gs://)."""
  epath.Path(path).write_bytes(summaries.png_bytes(picture))


def render(model, images, *, mask_ratio=None, sampler=None, seed=0, scale=1):
  """(picture uint8, mask (B, L)) with `sampler` (random | block | grid) at `mask_ratio`."""
  model = model_lib.with_mask_ratio(model, mask_ratio)
  noise = model.sample_noise(images.shape[0], key=jax.random.key(seed), sampler=sampler)
  picture = reconstruction_grid(model, images, noise=noise, scale=scale)
  mask = patches.masking_from_noise(noise, model.config.len_keep).mask
  return picture, np.asarray(mask)
