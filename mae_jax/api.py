"""What a Python user calls: `mae_jax.load(...)` and the methods of a loaded model
(`Pretrained`: encode / reconstruct / loss; `Classifier`: logits / predict / encode)."""

import os

import jax.numpy as jnp

from mae_jax import checkpointing, losses, patches
from mae_jax import model as model_lib
from mae_jax.weights import classifier as classifier_weights
from mae_jax.weights import hf, keys
from mae_jax.weights import load as weights_load
from mae_jax.weights import workdir as workdir_lib


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


resolve_checkpoint = checkpointing.resolve_checkpoint  # (workdir, step) of a checkpoint path


class Classifier:
  """A restored classifier (fine-tuned / linear probe); images are normalised NHWC float32."""

  def __init__(self, model, config, step=None, meta=None):
    self.model = model
    self.config = config
    self.step = step
    self.meta = meta or {}

  def logits(self, images):
    """(B, num_classes) logits in inference mode (BatchNorm uses its running statistics)."""
    self.model.check_images(images)
    return self.model(jnp.asarray(images))

  def predict(self, images):
    """(B,) predicted class ids."""
    return jnp.argmax(self.logits(images), axis=-1)

  def encode(self, images):
    """(B, D) pooled features before the head (fc_norm(mean of patch tokens) or cls token)."""
    self.model.check_images(images)
    return self.model.features(jnp.asarray(images))


def load(path_or_workdir, step=None):
  """Restore a workdir (latest step unless `step`) or a step directory: a pre-trained MAE
  (`Pretrained`) or a fine-tuned / linear-probe classifier (`Classifier`).

  Needs no config files: the config saved beside the checkpoint defines the model.
  """
  workdir, step = checkpointing.resolve_checkpoint(path_or_workdir, step)
  saved, step = checkpointing.restore(workdir, step)
  if saved["config"].get("task", "pretrain") == "classify":
    return Classifier(*classifier_weights.restore_classifier(workdir, step))
  model, config, step, meta = workdir_lib.restore_mae(workdir, step)
  return Pretrained(model, config, step, meta)


def load_any(path, *, step=None, require_decoder=False, **overrides):
  """A `Pretrained` from one of our checkpoint directories or an official / HF weights file.

  `overrides` are model fields a PyTorch file does not store (see `mae_jax.convert`).
  """
  path = os.fspath(path)
  if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n))
                                     for n in hf.HF_WEIGHTS):
    if require_decoder:
      converted, _ = workdir_lib.converted_from(path, step)
      if converted and not converted.get("decoder_from_file", True):
        raise ValueError(
            f"{path} was converted from {converted.get('file')}, "
            f"{keys.KINDS[converted['kind']]}: its decoder is freshly initialised, so "
            "reconstructions would be noise. Convert a file with the decoder (e.g. the "
            "official mae_visualize_vit_large.pth)")
    return load(path, step)
  imported = weights_load.import_checkpoint(path, require_decoder=require_decoder, **overrides)
  return Pretrained(imported.model, weights_load.full_config(imported.model.config))
