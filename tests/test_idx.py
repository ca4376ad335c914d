"""mae_jax.data.idx: IDX reading (gzip / plain), conversion to an image folder, the CLI."""

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from mae_jax.data import idx

FASHION = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, array, *, compress=True):
  """An IDX file of uint8 `array`: 00 00 08 <ndim>, big-endian uint32 dims, then the bytes."""
  header = bytes([0, 0, idx.UBYTE, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())
  return str(path)


def _toy(tmp_path, n_per_class=5, classes=3):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n_per_class * classes, 6, 5), dtype=np.uint8)
  labels = np.repeat(np.arange(classes, dtype=np.uint8), n_per_class)[::-1].copy()
  return (_write_idx(tmp_path / "img.gz", images), _write_idx(tmp_path / "lab.gz", labels),
          images, labels)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = _write_idx(tmp_path / "a.idx", array, compress=compress)
  out = idx.read_idx(path)
  assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, array)


def test_bad_magic_names_the_file(tmp_path):
  path = tmp_path / "bad.idx"
  path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match=r"bad\.idx: not an IDX file: expected magic"):
    idx.read_idx(str(path))


def test_wrong_size_and_dtype(tmp_path):
  path = tmp_path / "short.idx"
  path.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes() + b"\x00" * 3)
  with pytest.raises(ValueError, match=r"short\.idx: IDX shape \(5,\) needs 5 data bytes, got 3"):
    idx.read_idx(str(path))
  path = tmp_path / "float.idx"
  path.write_bytes(bytes([0, 0, 0x0D, 1]) + np.asarray([1], ">u4").tobytes() + b"\x00" * 4)
  with pytest.raises(ValueError, match=r"float\.idx: IDX dtype 0x0d is not supported"):
    idx.read_idx(str(path))


def test_write_image_folder(tmp_path):
  images_path, labels_path, images, labels = _toy(tmp_path)
  out = tmp_path / "folder"
  assert idx.write_image_folder(images_path, labels_path, str(out)) == 15
  assert sorted(os.listdir(out)) == ["0", "1", "2"]
  for label in range(3):
    files = sorted(os.listdir(out / str(label)))
    assert len(files) == 5
    for file in files:
      i = int(file.split(".")[0])
      assert labels[i] == label
      np.testing.assert_array_equal(np.asarray(Image.open(out / str(label) / file)), images[i])
  first = out / "2" / files[0]
  before = os.path.getmtime(first)
  assert idx.write_image_folder(images_path, labels_path, str(out)) == 15  # idempotent
  assert os.path.getmtime(first) == before


def test_per_class_subset_is_seeded(tmp_path):
  images_path, labels_path, _, labels = _toy(tmp_path)
  listing = []
  for name in ("a", "b", "c"):
    seed = 1 if name == "c" else 0
    out = tmp_path / name
    assert idx.write_image_folder(images_path, labels_path, str(out), per_class=2, seed=seed) == 6
    listing.append({c: sorted(os.listdir(out / c)) for c in sorted(os.listdir(out))})
  assert listing[0] == listing[1] and listing[0] != listing[2]
  for c, files in listing[0].items():
    assert len(files) == 2 and all(labels[int(f.split(".")[0])] == int(c) for f in files)
  with pytest.raises(ValueError, match="has 5 examples: expected at least per_class=6"):
    idx.write_image_folder(images_path, labels_path, str(tmp_path / "d"), per_class=6)


def test_class_names_and_label_count_mismatch(tmp_path):
  images_path, labels_path, _, _ = _toy(tmp_path)
  out = tmp_path / "named"
  idx.write_image_folder(images_path, labels_path, str(out), class_names=["x", "y", "z"])
  assert sorted(os.listdir(out)) == ["x", "y", "z"]
  short = _write_idx(tmp_path / "short.gz", np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match=r"short\.gz: expected 15 labels"):
    idx.write_image_folder(images_path, short, str(tmp_path / "e"))


def test_cli(tmp_path, capsys):
  images_path, labels_path, _, _ = _toy(tmp_path)
  out = str(tmp_path / "cli")
  assert idx.main([f"--images={images_path}", f"--labels={labels_path}", f"--out={out}",
                   "--per_class=3"]) == 0
  assert capsys.readouterr().out.strip() == f"9 images in {out}"
  assert idx.main([f"--images={tmp_path / 'nope'}", f"--labels={labels_path}", f"--out={out}"]) == 2
  assert "error: --images=" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"Fashion-MNIST not installed in {FASHION}")
def test_real_fashion_mnist():
  images = idx.read_idx(os.path.join(FASHION, "train-images-idx3-ubyte.gz"))
  labels = idx.read_idx(os.path.join(FASHION, "train-labels-idx1-ubyte.gz"))
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
  assert idx.read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")).shape == (10000, 28, 28)
