"""Feature extraction CLI: shapes, padding, determinism, equality with `encode`."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mae_jax
from mae_jax import features, imaging
from mae_jax import data as mae_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  """Five photos (png and jpg, one in a sub-folder) and a file that is not an image."""
  folder = tmp_path_factory.mktemp("photos")
  (folder / "sub").mkdir()
  photos = mae_data.bundled_photos()
  names = ["a.png", "b.jpg", "c.png", "sub/d.jpg", "sub/e.png"]
  for i, name in enumerate(names):
    Image.fromarray(photos[i]).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  return folder, names


def test_cli_shapes_paths_and_encode_equality(tmp_path, trained_workdir, images_dir):
  folder, names = images_dir
  out = tmp_path / "feats.npy"
  run = subprocess.run([sys.executable, "-m", "mae_jax.features",
                        f"--checkpoint={trained_workdir}", f"--images_dir={folder}",
                        f"--out={out}", "--pool=cls", "--batch_size=2"],
                       cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "5/5 images" in run.stderr  # progress lines
  cls = np.load(out)
  assert cls.shape == (5, 32) and cls.dtype == np.float32
  assert (tmp_path / "feats.paths.txt").read_text().split() == names

  loaded = mae_jax.load(trained_workdir)
  batch = imaging.load_batch([folder / n for n in names], 32)
  tokens = np.asarray(loaded.encode(batch))  # (5, 17, 32), unjitted, one batch of 5
  np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-5, atol=1e-5)
  mean, paths = features.main([f"--checkpoint={trained_workdir}", f"--images_dir={folder}",
                               f"--out={tmp_path / 'mean.npy'}", "--pool=mean",
                               "--batch_size=3"])
  assert paths == names
  np.testing.assert_allclose(mean, tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.load(tmp_path / "mean.npy"), mean)


def test_deterministic_and_padding_invariant(trained_workdir, images_dir):
  folder, names = images_dir
  model = mae_jax.load(trained_workdir).model
  paths = [str(folder / n) for n in names]
  first = features.extract(model, paths, batch_size=2, progress=False)  # last batch padded
  again = features.extract(model, paths, batch_size=2, progress=False)
  np.testing.assert_array_equal(first, again)
  whole = features.extract(model, paths, batch_size=8, progress=False)
  np.testing.assert_allclose(first, whole, rtol=1e-5, atol=1e-6)


def test_bad_folders(tmp_path, trained_workdir):
  with pytest.raises(FileNotFoundError, match="--images_dir=.*nope is not a directory"):
    features.main([f"--checkpoint={trained_workdir}", f"--images_dir={tmp_path / 'nope'}"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    features.main([f"--checkpoint={trained_workdir}", f"--images_dir={tmp_path / 'empty'}"])
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "x.png").write_text("not a png")
  out = tmp_path / "f.npy"
  with pytest.raises(ValueError, match="x.png is not a readable image"):
    features.main([f"--checkpoint={trained_workdir}", f"--images_dir={tmp_path / 'broken'}",
                   f"--out={out}"])
  assert not out.exists() and not (tmp_path / "f.paths.txt").exists()


def test_tools_import_no_tensorflow():
  code = ("import sys, mae_jax.convert, mae_jax.features, mae_jax.visualize; "
          "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules, "
          "sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch'))[:5]")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
