"""What a Python user calls: `mae_jax.load(...)` and the methods of a loaded model."""

import os

import jax.numpy as jnp
from flax import nnx

from mae_jax import checkpointing, losses, patches
from mae_jax import model as model_lib


class Pretrained:
  """A restored MAE with its training config; all image arguments are normalised NHWC float32."""

  def __init__(self, model, config, step=None, meta=None):
    self.model = model
    self.config = config
    self.step = step
    self.meta = meta or {}  # saved with the checkpoint: data position, conversion source, ...

  @property
  def model_config(self):
    return self.model.config

  def encode(self, images):
    """Encoder features of ALL patches, no masking: (B, 1 + L, D), cls token first."""
    self.model.check_images(images)
    return self.model.encode(jnp.asarray(images))

  def reconstruct(self, images, mask_ratio=None, key=None, sampler=None):
    """(reconstructed images (B, H, W, C) in the input's normalisation, mask (B, L))."""
    model = model_lib.with_mask_ratio(self.model, mask_ratio)
    images = jnp.asarray(images)
    noise = model.sample_noise(images.shape[0], key=key, sampler=sampler)
    _, pred, mask = model(images, noise=noise)
    mc = model.config
    if mc.norm_pix_loss:  # back to pixels with each patch's own statistics
      pred = losses.denormalize_patches(pred, patches.patchify(images, mc.patch_size))
    return patches.unpatchify(pred, mc.patch_size, mc.grid, mc.in_chans), mask

  def loss(self, images, noise=None, key=None, mask_ratio=None):
    """The pre-training loss for `images` with the given noise (or a key)."""
    model = model_lib.with_mask_ratio(self.model, mask_ratio)
    return model(jnp.asarray(images), noise=noise, key=key)[0]


def resolve_checkpoint(path_or_workdir, step=None):
  """(workdir, step) from a workdir, its checkpoints/ folder or one step's folder."""
  path = os.path.abspath(os.fspath(path_or_workdir))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  if os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_DIR)):
    return path, step
  parent, name = os.path.split(path)
  if os.path.basename(parent) == checkpointing.CHECKPOINT_DIR and name.isdigit():
    return os.path.dirname(parent), int(name) if step is None else step
  if os.path.basename(path) == checkpointing.CHECKPOINT_DIR:
    return parent, step
  raise FileNotFoundError(f"{path} is neither a workdir (with {checkpointing.CHECKPOINT_DIR}/) "
                          f"nor a checkpoint step directory")


def load(path_or_workdir, step=None):
  """Restore a pre-trained MAE from a workdir (latest step unless `step`) or a step directory.

  Needs no config files: the config saved beside the checkpoint defines the model.
  """
  workdir, step = resolve_checkpoint(path_or_workdir, step)
  meta, step = checkpointing.restore(workdir, step)
  model = model_lib.MAE(meta["config"].model, rngs=nnx.Rngs(meta["config"].get("seed", 0)))
  restored, _ = checkpointing.restore(workdir, step, params=nnx.state(model, nnx.Param))
  nnx.update(model, restored["params"])
  return Pretrained(model, meta["config"], step, meta["meta"])
