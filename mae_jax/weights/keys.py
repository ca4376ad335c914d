"""Official PyTorch MAE names and layouts <-> our model's variables.

Our module names mirror the official ones (`blocks.3.attn.qkv`, `decoder_pred`, ...);
only the leaf names and layouts differ: torch linear weights are (out, in) and
become (in, out) kernels, the conv weight (D, C, p, p) becomes (p, p, C, D),
LayerNorm `weight` is our `scale`.
"""

import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import model as model_lib

_CONV_TO_OURS = (2, 3, 1, 0)   # (D, C, p, p) -> (p, p, C, D)
_CONV_TO_TORCH = (3, 2, 0, 1)  # inverse

DECODER_PREFIXES = ("decoder_", "mask_token")  # official keys of the MAE decoder
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")     # official keys a fine-tuned classifier adds
KINDS = {"pretrain": "a pre-trained MAE with its decoder",
         "encoder_only": "an encoder-only pre-trained file (no MAE decoder)",
         "finetuned": "a fine-tuned classifier (head / fc_norm, no MAE decoder)"}


def official_key(path):
  """('blocks', 0, 'norm1', 'scale') -> 'blocks.0.norm1.weight'."""
  *parents, leaf = (str(p) for p in path)
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parents + [leaf])


def torch_layout(leaf_name, array):
  """One of our arrays in the official (torch) layout."""
  array = np.asarray(array)
  if leaf_name == "kernel":
    return array.transpose(_CONV_TO_TORCH) if array.ndim == 4 else array.T
  return array


def torch_shape(leaf_name, shape):
  """The official (torch) shape of one of our variables."""
  if leaf_name == "kernel":
    return tuple(shape[i] for i in _CONV_TO_TORCH) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


def our_layout(leaf_name, array):
  """An official (torch) array in our layout."""
  if leaf_name == "kernel":
    return array.transpose(_CONV_TO_OURS) if array.ndim == 4 else array.T
  return array


def model_variables(model):
  """{official key: (path, variable)} for every parameter and fixed table of `model`."""
  state = nnx.state(model, (nnx.Param, model_lib.FixedEmbed))
  return {official_key(path): (path, var) for path, var in nnx.to_flat_state(state)}


def official_state_dict(model):
  """Our model -> an official-format state dict of numpy arrays (torch layouts)."""
  return {key: torch_layout(str(path[-1]), var[...])
          for key, (path, var) in model_variables(model).items()}


def checkpoint_kind(state_dict):
  """'pretrain' | 'encoder_only' | 'finetuned' for an official-format state dict."""
  if any(k.startswith(CLASSIFIER_PREFIXES) for k in state_dict):
    return "finetuned"
  if any(k.startswith(DECODER_PREFIXES) for k in state_dict):
    return "pretrain"
  return "encoder_only"


def fill(model, state_dict, source, allow_missing=(), allow_extra=()):
  """Copy `state_dict` into `model`; keys outside the allowed prefixes must match exactly.

  Returns (missing keys, i.e. left as initialised; extra keys, i.e. not used).
  """
  expected = model_variables(model)
  missing = sorted(set(expected) - set(state_dict))
  extra = sorted(set(state_dict) - set(expected))
  bad_missing = [k for k in missing if not k.startswith(allow_missing)]
  bad_extra = [k for k in extra if not k.startswith(allow_extra)]
  if bad_missing or bad_extra:
    hint = ""
    if any(k.startswith(CLASSIFIER_PREFIXES) for k in extra):
      hint = " (this looks like a fine-tuned classifier checkpoint, not a pre-trained MAE)"
    elif missing and all(k.startswith(DECODER_PREFIXES) for k in missing):
      hint = " (this looks like an encoder-only checkpoint without the MAE decoder)"
    raise KeyError(f"{source}: checkpoint does not match the model{hint}: "
                   f"{len(bad_missing)} missing key(s) {bad_missing[:5]}, "
                   f"{len(bad_extra)} unexpected key(s) {bad_extra[:5]}")
  for key, (path, var) in expected.items():
    if key not in state_dict:
      continue
    want = torch_shape(str(path[-1]), var.shape)
    got = tuple(state_dict[key].shape)
    if got != want:
      raise ValueError(f"{source}: checkpoint key {key!r} has shape {got} but the model "
                       f"expects {want}")
    var[...] = jnp.asarray(our_layout(str(path[-1]), state_dict[key]), var[...].dtype)
  return missing, extra


def warn_fresh(source, keys):
  """Warn that `keys` of `source` were not in the file and are freshly initialised."""
  warnings.warn(f"{source} has no {summarise_keys(keys)}: these {len(keys)} weights are "
                "freshly initialised (not pre-trained)", stacklevel=3)


def summarise_keys(keys):
  """['decoder_blocks.0.norm1.weight', ...] -> 'decoder_blocks.{0..7}.*, decoder_norm.{bias,weight}'."""
  groups = {}
  for key in sorted(keys):
    head, _, rest = key.partition(".")
    groups.setdefault(head, []).append(rest)
  parts = []
  for head, rests in groups.items():
    indices = sorted({int(r.split(".")[0]) for r in rests if r.split(".")[0].isdigit()})
    if indices and len(indices) == len({r.split(".")[0] for r in rests}):
      if len(indices) == 1:
        span = indices[0]
      elif indices == list(range(indices[0], indices[-1] + 1)):
        span = f"{{{indices[0]}..{indices[-1]}}}"
      else:
        span = "{" + ",".join(map(str, indices)) + "}"
      parts.append(f"{head}.{span}.*")
    elif rests == [""]:
      parts.append(head)
    else:
      parts.append(f"{head}.{{{','.join(rests)}}}")
  return ", ".join(parts)
