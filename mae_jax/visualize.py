"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible.

Command line (all flags: README "Reconstruction pictures"):
  python -m mae_jax.visualize --checkpoint=workdirs/demo --images a.jpg b.png --out grid.png
  python -m mae_jax.visualize --checkpoint=mae_visualize_vit_large.pth --norm_pix_loss=false
  python -m mae_jax.visualize --checkpoint=workdirs/demo --sampler=grid   # paper Fig. 6
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from mae_jax import convert, imaging, losses, patches, summaries
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


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.visualize",
      description="Reconstruction grid: original | masked | reconstruction | "
                  "reconstruction + visible patches, one row per image.")
  convert.add_checkpoint_flags(parser, "an official / HF file with the decoder")
  parser.add_argument("--images", nargs="*", default=[],
                      help="image files (centre-cropped to the model size); none: the "
                           "bundled photos")
  parser.add_argument("--num_images", type=int, default=6,
                      help="how many bundled photos when --images is not given")
  parser.add_argument("--out", default="reconstructions.png", help="the PNG to write")
  parser.add_argument("--mask_ratio", type=float, help="default: the model's (0.75)")
  parser.add_argument("--sampler", choices=patches.MASK_SAMPLERS, default="random",
                      help="mask sampler (paper Fig. 6); grid needs --mask_ratio 0.75")
  parser.add_argument("--seed", type=int, default=0, help="masking seed")
  parser.add_argument("--scale", type=int,
                      help="integer upscaling of the picture (default 224 // img_size)")
  args = parser.parse_args(argv)
  loaded = convert.load_from_flags(args, require_decoder=True)
  mc = loaded.model.config
  if args.images:
    images = imaging.load_batch(args.images, mc.img_size)
  else:
    from mae_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    images = input_pipeline.preview_images(args.num_images, mc.image_shape[0])
  scale = args.scale or max(1, 224 // mc.image_shape[0])
  picture, mask = render(loaded.model, images, mask_ratio=args.mask_ratio,
                         sampler=args.sampler, seed=args.seed, scale=scale)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  save_png(picture, args.out)
  print(f"wrote {args.out}: {images.shape[0]} row(s), {args.sampler} masking, "
        f"{int(mask[0].sum())}/{mask.shape[1]} patches removed per image "
        "(original | masked | reconstruction | reconstruction + visible)")
  return picture, mask


if __name__ == "__main__":
  convert.run_cli(main, None)
