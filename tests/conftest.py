"""Shared fixtures: 8 fake CPU devices, tiny model configs, an official-formula numpy reference."""

import atexit
import os
import shutil
import tempfile

# Before jax is imported anywhere: 8 CPU devices for the mesh tests (child processes inherit it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# Many tests (and their subprocesses) compile the same tiny train step: one persistent XLA
# cache for this run turns the repeats into cache hits. Same executables, just not rebuilt.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402


def official_sincos_table(dim, rows, cols):
  """Numpy re-derivation of the official 2-D sin-cos table (cls row included).

  Written from the formula: the first half of each token's vector encodes its
  column (w), the second half its row (h); each half is [sin | cos] with
  omega_k = 1 / 10000^(k / (dim/4)).
  """
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  out = np.zeros((1 + rows * cols, dim))
  for r in range(rows):
    for c in range(cols):
      t = 1 + r * cols + c
      out[t] = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                               np.sin(r * omega), np.cos(r * omega)])
  return out


@pytest.fixture
def tiny_config():
  """The tiny config, shrunk further for unit tests."""
  config = tiny.get_config()
  config.model.update(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
  config.mesh.data = 1  # one device unless a test asks for a mesh
  return config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """(workdir, config, final state) of a tiny MAE pre-trained for 6 steps (seconds)."""
  from mae_jax import train  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.update(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
  config.total_steps, config.warmup_steps, config.log_every, config.num_preview_images = 6, 2, 3, 2
  config.mesh.data = 1
  workdir = tmp_path_factory.mktemp("trained")
  state, _ = train.train_and_evaluate(config, str(workdir))
  return workdir, config, state


@pytest.fixture(scope="session")
def trained_workdir(trained_run):
  """A workdir with a tiny MAE pre-trained for a few steps: checkpoints/6/."""
  return trained_run[0]


def write_pth(path, state_dict, wrap=True):
  """Save numpy arrays as an official-style `.pth` ({'model': sd}) with torch."""
  import torch  # pylint: disable=import-outside-toplevel
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  torch.save({"model": tensors} if wrap else tensors, path)
  return str(path)
