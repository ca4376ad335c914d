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
  mean, std = imaging.stats(channels)
  gray = (MASKED_GRAY - mean) / std
  gray_patches = jnp.tile(jnp.asarray(gray), patch_size * patch_size)
  to_image = lambda x: patches.unpatchify(x, patch_size, grid, channels)
  masked = to_image(jnp.where(removed, gray_patches, target))
  recon = to_image(pred)
  pasted = to_image(jnp.where(removed, pred, target))
  return images, masked, recon, pasted


def to_unit(images):
  """Normalised (..., C) -> pixel values in [0, 1] (float64, clipped: what a picture shows)."""
  mean, std = imaging.stats(images.shape[-1])
  pixels = np.asarray(images, np.float64) * std + mean
  return np.clip(pixels, 0.0, 1.0)


def psnr(mse):
  """Peak signal-to-noise ratio (dB) of a mean squared error of [0, 1] pixels."""
  return float(10.0 * np.log10(1.0 / max(float(mse), 1e-12)))


def masked_psnr(images, pred, mask, patch_size, norm_pix_loss):
  """(model dB, oracle dB): PSNR over the removed patches' pixels, in [0, 1] pixel space.

  The model's prediction (norm-pix predictions mapped back with each patch's own mean and
  variance, as in the pictures) against an oracle that fills each removed patch with its
  true mean colour (per channel). The errors of all images' removed pixels are pooled.
  """
  panels = reconstruction_panels(images, pred, mask, patch_size, norm_pix_loss)
  return panels_psnr(panels, mask, patch_size)


def panels_psnr(panels, mask, patch_size):
  """`masked_psnr` of the panels `reconstruction_panels` made."""
  original, _, recon, _ = panels
  channels = original.shape[-1]
  removed = np.asarray(mask) > 0
  per_pixel = lambda x: np.asarray(patches.patchify(to_unit(x), patch_size)).reshape(
      *removed.shape, -1, channels)[removed]                       # (M, p*p, C)
  truth, guess = per_pixel(original), per_pixel(recon)
  oracle = truth.mean(axis=1, keepdims=True)
  return psnr(np.mean((guess - truth) ** 2)), psnr(np.mean((oracle - truth) ** 2))


def grid_image(panels, gap=2):
  """Panels of normalised (B, H, W, 3 or 1) -> one uint8 RGB picture, a row per image."""
  columns = [np.broadcast_to(imaging.denormalize(p), p.shape[:3] + (3,)) for p in panels]
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
  return preview(model, images, key=key, noise=noise, scale=scale)[0]


def preview(model, images, *, key=None, noise=None, scale=1):
  """(picture uint8, (model dB, oracle dB) of `masked_psnr`) of `model` on normalised images."""
  _, pred, mask = model(jnp.asarray(images), noise=noise, key=key)
  size, norm_pix = model.config.patch_size, model.config.norm_pix_loss
  panels = reconstruction_panels(images, pred, mask, size, norm_pix)
  picture = grid_image(panels)
  if scale > 1:
    picture = np.asarray(Image.fromarray(picture).resize(
        (picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST))
  return picture, panels_psnr(panels, mask, size)


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
