"""Official `.pth` / HF files -> an MAE, validated: every key used or named, shapes checked."""

import dataclasses
import os
import warnings

import numpy as np
from flax import nnx

from mae_jax import model as model_lib
from mae_jax import patches
from mae_jax.weights import files, hf, infer, keys


def load_pytorch(path_or_state_dict, model_config, *, seed=0, allow_encoder_only=False):
  """Build an MAE from an official-format checkpoint; every key must be used, shapes must match.

  With `allow_encoder_only`, a file without the decoder (the published
  `mae_pretrain_vit_*.pth`) loads into the encoder; the decoder stays freshly
  initialised and a warning names its keys.
  """
  source = files.source_name(path_or_state_dict)
  state_dict = files.read_state_dict(path_or_state_dict)
  model = model_lib.MAE(model_config, rngs=nnx.Rngs(seed))
  missing, _ = keys.fill(model, state_dict, source,
                         allow_missing=keys.DECODER_PREFIXES if allow_encoder_only else ())
  if missing:
    keys.warn_fresh(source, missing)
  return model


@dataclasses.dataclass
class Imported:
  """An imported file: the model plus what the file did not provide or we could not use."""
  model: model_lib.MAE
  source: str
  format: str          # "official" | "hf"
  kind: str            # a key of keys.KINDS
  fresh: list          # our official-format keys left freshly initialised
  extras: dict         # file weights the MAE cannot hold (head, fc_norm, non-sin-cos tables)
  assumed: dict        # model fields the file does not store, with the value used

  def meta(self):
    """JSON-able description stored in the checkpoint's meta item."""
    return {"converted_from": dict(
        file=os.path.abspath(self.source), format=self.format, kind=self.kind,
        decoder_from_file=not any(k.startswith(keys.DECODER_PREFIXES) for k in self.fresh),
        fresh_keys=self.fresh, extra_keys=sorted(self.extras), assumed=self.assumed)}


def import_checkpoint(path, *, seed=0, require_decoder=False, **overrides):
  """An official `.pth` or HF file / directory -> `Imported`, validated; nothing is written.

  Encoder-only and fine-tuned files load with the decoder freshly initialised
  (a warning names its keys) unless `require_decoder`, which makes them an error.
  """
  path = os.fspath(path)
  weights = hf.hf_weights_path(path)
  state_dict, fmt = hf.to_official(files.read_state_dict(weights), path)
  kind = keys.checkpoint_kind(state_dict)
  if require_decoder and kind != "pretrain":
    raise ValueError(
        f"{path} is {keys.KINDS[kind]}: it has no decoder keys (mask_token, decoder_*), and "
        "reconstructions need the MAE decoder. Use a file that has it (e.g. the official "
        "mae_visualize_vit_large.pth) or an mae_jax pre-training checkpoint")
  if fmt == "hf":
    overrides = {**hf.hf_config_fields(path), **{k: v for k, v in overrides.items()
                                               if v is not None}}
  fields, assumed = infer.infer_model_config(state_dict, path, **overrides)
  model = model_lib.MAE(model_lib.model_config(fields), rngs=nnx.Rngs(seed))
  allow_missing = () if require_decoder else keys.DECODER_PREFIXES
  if "fc_norm.weight" in state_dict:  # global-pool fine-tuning replaced the final norm
    allow_missing += ("norm.",)
  missing, extra = keys.fill(model, state_dict, path, allow_missing=allow_missing,
                             allow_extra=keys.CLASSIFIER_PREFIXES)
  extras = {k: state_dict[k] for k in extra}
  mc = model.config
  for key, width in (("pos_embed", mc.embed_dim), ("decoder_pos_embed", mc.decoder_embed_dim)):
    ours = patches.sincos_2d(width, mc.grid)[None]  # what mae_jax.load will use
    if key in state_dict and not np.array_equal(state_dict[key], ours):
      extras[key] = state_dict[key]  # kept for export; the model uses its fixed sin-cos table
      if not np.allclose(state_dict[key], ours, atol=1e-5):
        warnings.warn(f"{path}: {key} differs from the fixed 2-D sin-cos table (max |diff| "
                      f"{np.abs(state_dict[key] - ours).max():.3g}, e.g. a fine-tuned table); "
                      "mae_jax uses the sin-cos table, the file's is kept for export only")
  if missing:
    keys.warn_fresh(path, missing)
  return Imported(model, path, fmt, kind, missing, extras, assumed)


def full_config(model_config, seed=0):
  """A complete training ConfigDict (paper recipe) whose `model` is `model_config`."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  by_width = {s["embed_dim"]: name for name, s in model_lib.SIZES.items()}
  config = base.sized_config(by_width.get(model_config.embed_dim, "vit_b"))
  config.model = ml_collections.ConfigDict(dataclasses.asdict(model_config))
  config.seed = seed
  return config
