r"""Images/s of the pre-training input pipeline on one host, and how many cores feed one chip.

  python benchmarks/input_pipeline.py --images=800 --parallel=1,2,-1

Writes a few hundred real JPEGs made from the bundled photos at ImageNet-like sizes
(shorter side 333-375, longer 500, quality 90: ~110 KB like ImageNet's), as an image
folder and as a TFDS imagenet2012 prepared from ILSVRC-style tars, then times the full
pre-training pipeline (read, fused decode-and-crop, RandomResizedCrop to 224, bicubic
with and without antialiasing, flip, batch as uint8) for each number of parallel calls
(-1 = tf.data.AUTOTUNE).
Compares with what one chip consumes training ViT-L/16 at 50% MFU (SPEC.md: 124.5
GFLOP per image). Whether the input keeps up with a real training step (in-memory arrays,
image folder, ArrayRecord TFDS; real input vs compute only; the longest waits over epoch
boundaries): benchmarks/input_training.py.
"""

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time

import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from configs import base  # noqa: E402
from mae_jax import data as ip  # noqa: E402
from mae_jax.data import transforms  # noqa: E402

VIT_L_GFLOP_PER_IMAGE = 124.5  # SPEC.md: fwd + bwd, 224 px, mask 0.75
CHIPS_BF16_TFLOPS = {"H100 SXM": 989.0, "TPU v5p": 459.0}  # dense bf16 peak per chip
MFU = 0.5


def imagenet_like_jpegs(count, seed=0):
  """`count` JPEG byte strings: random crops of the bundled photos, resized to 500 x 333-375."""
  rng = np.random.default_rng(seed)
  photos = ip.bundled_photos()
  out = []
  for _ in range(count):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) * 3 // 4, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    short = int(rng.integers(333, 376))
    size = (500, short) if rng.random() < 0.75 else (short, 500)  # mostly landscape
    img = Image.fromarray(photo[top:top + side, left:left + side]).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    out.append(buf.getvalue())
  return out


def _tar_add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_sources(root, jpegs, classes=10):
  """An image folder root/folder/<class>/ and an imagenet2012 manual_dir root/manual/."""
  tf, tfds = transforms.tf_modules()
  labels = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(labels) as f:
    synsets = f.read().split()[:classes]  # the builder accepts only real synsets
  os.makedirs(os.path.join(root, "manual"))
  with tarfile.open(os.path.join(root, "manual", "ILSVRC2012_img_train.tar"), "w") as outer:
    for k, synset in enumerate(synsets):
      os.makedirs(os.path.join(root, "folder", synset))
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for i, data in enumerate(jpegs[k::classes]):
          with open(os.path.join(root, "folder", synset, f"{i}.JPEG"), "wb") as f:
            f.write(data)
          _tar_add(inner, f"{synset}_{i}.JPEG", data)
      _tar_add(outer, f"{synset}.tar", inner_buf.getvalue())
  with tarfile.open(os.path.join(root, "manual", "ILSVRC2012_img_val.tar"), "w") as val:
    _tar_add(val, "ILSVRC2012_val_00000001.JPEG", jpegs[0])


def measure(config, batches, repeats):
  """Best images/s over `repeats` windows of `batches` batches, after two warm-up batches
  (pipeline filled). The best window is the least disturbed on a shared machine."""
  it = ip.create_pretrain_iterator(config, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    rates.append(batches * config.batch_size / (time.perf_counter() - start))
  assert batch["images"].shape == (config.batch_size, 224, 224, 3)
  return max(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=800, help="JPEGs to generate")
  parser.add_argument("--batch", type=int, default=64, help="per-host batch")
  parser.add_argument("--batches", type=int, default=10, help="timed batches per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best counts")
  parser.add_argument("--parallel", default="1,2,-1", help="num_parallel_calls (-1 = AUTOTUNE)")
  parser.add_argument("--sources", default="imagenet2012,image_folder")
  args = parser.parse_args()

  jpegs = imagenet_like_jpegs(args.images)
  root = tempfile.mkdtemp(prefix="mae_input_bench_")
  write_sources(root, jpegs)
  configs = {}
  for source in args.sources.split(","):
    configs[source] = config = base.get_config(f"batch_size={args.batch}")
    config.data.update(dataset=source, folder=os.path.join(root, "folder"),
                       data_dir=os.path.join(root, "tfds"),
                       manual_dir=os.path.join(root, "manual"))
    ip.check_data(config)
  transforms.tf_modules()[1].disable_progress_bar()
  if "imagenet2012" in configs:  # prepare before the table: TFDS prints while preparing
    ip.tfds_builder(configs["imagenet2012"].data, prepare=True)
  cores = os.cpu_count()
  print(f"{args.images} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; "
        f"{platform.processor() or platform.machine()}, {cores} cores; batch {args.batch}, "
        f"224 px, RandomResizedCrop + flip, uint8; load average {os.getloadavg()[0]:.1f}")
  print("| source | antialias | parallel calls | img/s per host | img/s per core |")
  print("|---|---|---|---|---|")
  best = {True: 0.0, False: 0.0}
  for source, config in configs.items():
    for antialias in (True, False):
      for parallel in (int(p) for p in args.parallel.split(",")):
        config.data.update(num_parallel_calls=parallel, antialias=antialias)
        img_s = measure(config, args.batches, args.repeats)
        best[antialias] = max(best[antialias], img_s)
        label = "AUTOTUNE" if parallel < 0 else str(parallel)
        print(f"| {source} | {antialias} | {label} | {img_s:.0f} | {img_s / cores:.0f} |")

  print(f"\nOne chip training ViT-L/16 at {MFU:.0%} MFU ({VIT_L_GFLOP_PER_IMAGE} GFLOP/image) "
        f"consumes (cores: at this host's best img/s per core):")
  print("| chip | img/s per chip | cores to feed one chip (antialias) | (no antialias) |")
  print("|---|---|---|---|")
  for chip, tflops in CHIPS_BF16_TFLOPS.items():
    need = MFU * tflops * 1e3 / VIT_L_GFLOP_PER_IMAGE
    print(f"| {chip} | {need:.0f} | {need / (best[True] / cores):.1f} | "
          f"{need / (best[False] / cores):.1f} |")


if __name__ == "__main__":
  main()
