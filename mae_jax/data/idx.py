r"""IDX files (MNIST / Fashion-MNIST format) and their conversion to an image folder.

  python -m mae_jax.data.idx \
      --images=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
      --labels=/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz \
      --out=/tmp/fmnist/train [--per_class=60]

writes out/<class>/<index>.png (the layout `data.dataset="image_folder"` reads) and
prints one line. numpy + PIL only: no TensorFlow.

IDX layout (big-endian): two zero bytes, a dtype byte (0x08 = unsigned byte, the only one
supported), a byte with the number of dimensions, one uint32 per dimension, then the data.
"""

import argparse
import gzip
import os
import sys

import numpy as np

UBYTE = 0x08


def _open(path):
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path):
  """The array stored in the IDX file `path` (gzip or plain), dtype uint8."""
  with _open(path) as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file: expected magic bytes 00 00 <dtype> <ndim>, "
                     f"got {raw[:4].hex(' ') or 'an empty file'}")
  dtype, ndim = raw[2], raw[3]
  if dtype != UBYTE:
    raise ValueError(f"{path}: IDX dtype 0x{dtype:02x} is not supported: expected 0x08 "
                     f"(unsigned byte)")
  if ndim < 1:
    raise ValueError(f"{path}: IDX header declares {ndim} dimensions: expected at least 1")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header: expected {header} bytes for {ndim} "
                     f"dimensions, got {len(raw)}")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise ValueError(f"{path}: IDX shape {shape} needs {expected} data bytes, got "
                     f"{len(raw) - header}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def select_per_class(labels, per_class, seed=0):
  """Sorted indices of a seeded subset of `per_class` examples of every class."""
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    if len(where) < per_class:
      raise ValueError(f"class {label} has {len(where)} examples: expected at least "
                       f"per_class={per_class}")
    chosen.append(rng.choice(where, per_class, replace=False))
  return np.sort(np.concatenate(chosen))


def write_image_folder(images_path, labels_path, out_dir, *, per_class=None, seed=0,
                       class_names=None):
  """Write out_dir/<class>/<index>.png for the IDX images + labels; returns the image count.

  `per_class`: only a fixed seeded subset of that many examples per class. `class_names`:
  folder names indexed by label (default: the zero-padded label, e.g. "07", so the sorted
  folder order is the label order). Existing files are kept, so a rerun is cheap.
  """
  from PIL import Image

  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3:
    raise ValueError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                     f"{images_path}), got shape {labels.shape}")
  indices = (np.arange(len(labels)) if per_class is None
             else select_per_class(labels, per_class, seed))
  num_classes = int(labels.max()) + 1
  if class_names is None:
    width = len(str(num_classes - 1))
    class_names = [str(c).zfill(width) for c in range(num_classes)]
  elif len(class_names) < num_classes:
    raise ValueError(f"class_names has {len(class_names)} names: expected at least "
                     f"{num_classes} for the labels in {labels_path}")
  width = len(str(len(labels) - 1))
  for name in {class_names[int(labels[i])] for i in indices}:
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
  for i in indices:
    path = os.path.join(out_dir, class_names[int(labels[i])], f"{str(i).zfill(width)}.png")
    if not os.path.exists(path):
      tmp = path + ".tmp"
      Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
      os.replace(tmp, path)  # atomic: an interrupted run leaves no half-written image
  return len(indices)


def main(argv=None):
  parser = argparse.ArgumentParser(description="IDX images + labels -> out/<class>/<index>.png")
  parser.add_argument("--images", required=True, help="IDX image file (.gz or plain)")
  parser.add_argument("--labels", required=True, help="IDX label file (.gz or plain)")
  parser.add_argument("--out", required=True, help="output folder root")
  parser.add_argument("--per_class", type=int, default=None,
                      help="only a seeded subset of N examples per class")
  parser.add_argument("--seed", type=int, default=0, help="seed of the per_class subset")
  args = parser.parse_args(argv)
  for flag in ("images", "labels"):
    if not os.path.isfile(getattr(args, flag)):
      print(f"error: --{flag}={getattr(args, flag)} does not exist: expected an IDX file",
            file=sys.stderr)
      return 2
  if args.per_class is not None and args.per_class <= 0:
    print(f"error: --per_class={args.per_class}: expected a positive count", file=sys.stderr)
    return 2
  try:
    count = write_image_folder(args.images, args.labels, args.out, per_class=args.per_class,
                               seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{count} images in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
