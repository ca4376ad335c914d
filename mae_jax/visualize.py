"""Command line: reconstruction pictures (paper Fig. 2-4, 6) from a checkpoint or weight file.

  python -m mae_jax.visualize --checkpoint=workdirs/demo --images a.jpg b.png --out grid.png
  python -m mae_jax.visualize --checkpoint=mae_visualize_vit_large.pth --norm_pix_loss=false
  python -m mae_jax.visualize --checkpoint=workdirs/demo --sampler=grid   # paper Fig. 6

All flags: README "Reconstruction pictures". The pictures are drawn by `mae_jax.pictures`
(whose names are re-exported here).
"""

import argparse
import os

from mae_jax import cli, imaging, patches
from mae_jax.data import photos
from mae_jax.pictures import (MASKED_GRAY, grid_image, reconstruction_grid,
                              reconstruction_panels, render, save_png)

__all__ = ["MASKED_GRAY", "grid_image", "main", "reconstruction_grid", "reconstruction_panels",
           "render", "save_png"]


def main(argv=None):
  """Write the picture --out; returns (picture, mask)."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.visualize",
      description="Reconstruction grid: original | masked | reconstruction | "
                  "reconstruction + visible patches, one row per image.")
  cli.add_checkpoint_flags(parser, "an official / HF file with the decoder")
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
  loaded = cli.load_from_flags(args, require_decoder=True)
  mc = loaded.model.config
  if args.images:
    images = imaging.load_batch(args.images, mc.img_size, mc.in_chans)
  else:
    images = photos.preview_images(args.num_images, mc.image_shape[0], mc.in_chans)
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
  cli.run_cli(main, None)
