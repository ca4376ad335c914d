"""Encoder features for a folder of images, no masking: one row per image in a `.npy`.

  python -m mae_jax.features --checkpoint=workdirs/demo --images_dir=photos --out=feats.npy

writes feats.npy (N, D) float32 and feats.paths.txt (the N image paths, relative to
--images_dir, in row order). `--pool=cls` takes the cls token, `--pool=mean` the mean
of the patch tokens (cls excluded), both after the encoder's final LayerNorm.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from mae_jax import atomic, cli, imaging
from mae_jax.evaluators.context import POOLS, pool_tokens

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(images_dir):
  """Image files under `images_dir` (recursively), sorted, relative to it."""
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"--images_dir={images_dir} is not a directory")
  found = []
  for root, dirs, files in os.walk(images_dir):
    dirs.sort()
    found += [os.path.relpath(os.path.join(root, f), images_dir) for f in sorted(files)
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                            f"--images_dir={images_dir}")
  return found


def make_encoder(model, pool):
  """A jit-compiled images (B, H, W, C) normalised -> (B, D) features function."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, images):
    model = nnx.merge(graphdef, state)
    return pool_tokens(model.encode(images), pool)

  return lambda images: encode(state, jnp.asarray(images))


def extract(model, paths, *, pool="cls", batch_size=64, progress=True):
  """Features (N, D) float32 of image files; every batch is padded to `batch_size`."""
  encode = make_encoder(model, pool)
  bar = tqdm.tqdm(total=len(paths), disable=not progress, unit="img", dynamic_ncols=True,
                  bar_format="{n_fmt}/{total_fmt} images |{bar}| {elapsed}<{remaining}, "
                             "{rate_fmt}")
  out = []
  for start in range(0, len(paths), batch_size):
    images = imaging.load_batch(paths[start:start + batch_size], model.config.img_size,
                                model.config.in_chans)
    count = images.shape[0]
    if count < batch_size:  # one static shape: one compilation
      images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:],
                                                images.dtype)])
    out.append(np.asarray(encode(images))[:count])
    bar.update(count)
  bar.close()
  return np.concatenate(out)


def paths_file(out):
  """feats.npy -> feats.paths.txt."""
  stem = out[:-4] if out.endswith(".npy") else out
  return stem + ".paths.txt"


def main(argv=None):
  """Write --out (features) and its paths file; returns (features, names)."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.features",
      description="Encoder features (no masking) of every image under a folder, to .npy.")
  cli.add_checkpoint_flags(
      parser, "an official / HF file (encoder-only and fine-tuned files work)")
  parser.add_argument("--images_dir", required=True, help="folder searched recursively")
  parser.add_argument("--out", default="features.npy",
                      help="the (N, D) float32 .npy; image paths go to <out>.paths.txt")
  parser.add_argument("--pool", choices=POOLS, default="cls",
                      help="cls token or mean of the patch tokens")
  parser.add_argument("--batch_size", type=int, default=64, help="images per jitted call")
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
  names = list_images(args.images_dir)
  loaded = cli.load_from_flags(args)
  feats = extract(loaded.model, [os.path.join(args.images_dir, n) for n in names],
                  pool=args.pool, batch_size=args.batch_size)
  with atomic.AtomicOutput(args.out, overwrite=True, is_dir=False) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, feats)
    with atomic.AtomicOutput(paths_file(args.out), overwrite=True, is_dir=False) as tmp_paths:
      with open(tmp_paths, "w") as f:
        f.write("".join(n + "\n" for n in names))
  print(f"wrote {args.out} {feats.shape} ({args.pool} features) and {paths_file(args.out)}")
  return feats, names


if __name__ == "__main__":
  cli.run_cli(main, None)
