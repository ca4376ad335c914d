import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax import api, sharding
from mae_jax import steps as steps_lib
from mae_jax import data as mae_data


@pytest.fixture
def trained(trained_run):
  return trained_run


def _reference_model(config, state):
  mesh = sharding.make_mesh(config.mesh)
  built = steps_lib.build(config, mesh, 6, 2)
  _, static = built.init_fn()
  return nnx.merge(built.graphdef, state.params, static.rest)


def test_load_reproduces_training_loss(trained):
  workdir, config, state = trained
  images = mae_data.preview_images(3, 32)
  noise = np.random.default_rng(0).random((3, 16)).astype(np.float32)
  want = float(_reference_model(config, state)(images, noise=noise)[0])
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "6"):
    loaded = mae_jax.load(path)
    assert loaded.step == 6
    assert float(loaded.loss(images, noise=noise)) == pytest.approx(want, rel=1e-6)


def test_load_in_fresh_process(trained):
  workdir, config, state = trained
  images = mae_data.preview_images(2, 32)
  noise = np.random.default_rng(1).random((2, 16)).astype(np.float32)
  want = float(_reference_model(config, state)(images, noise=noise)[0])
  np.save(workdir / "x.npy", images)
  np.save(workdir / "n.npy", noise)
  code = (f"import numpy as np, mae_jax; m = mae_jax.load({str(workdir)!r}); "
          f"print(repr(float(m.loss(np.load({str(workdir / 'x.npy')!r}), "
          f"noise=np.load({str(workdir / 'n.npy')!r})))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)


def test_encode_and_reconstruct(trained):
  workdir, _, _ = trained
  loaded = mae_jax.load(workdir)
  images = mae_data.preview_images(2, 32)
  features = loaded.encode(images)
  assert features.shape == (2, 17, 32)
  np.testing.assert_allclose(loaded.encode(images), features)
  recon, mask = loaded.reconstruct(images, key=jax.random.key(0), mask_ratio=0.5)
  assert recon.shape == images.shape and int(mask.sum()) == 2 * 8
  with pytest.raises(ValueError, match="images have shape"):
    loaded.encode(np.zeros((1, 16, 16, 3), np.float32))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    mae_jax.load(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="neither a workdir"):
    api.load(tmp_path)
