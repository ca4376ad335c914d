"""Official PyTorch MAE checkpoints <-> our models.

Our module names mirror the official ones (`blocks.3.attn.qkv`, `decoder_pred`, ...);
only the leaf names and layouts differ: torch linear weights are (out, in) and
become (in, out) kernels, the conv weight (D, C, p, p) becomes (p, p, C, D),
LayerNorm `weight` is our `scale`.
"""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import model as model_lib

_CONV_TO_OURS = (2, 3, 1, 0)   # (D, C, p, p) -> (p, p, C, D)
_CONV_TO_TORCH = (3, 2, 0, 1)  # inverse


def _official_key(path):
  """('blocks', 0, 'norm1', 'scale') -> 'blocks.0.norm1.weight'."""
  *parents, leaf = (str(p) for p in path)
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parents + [leaf])


def _to_official(leaf_name, array):
  array = np.asarray(array)
  if leaf_name == "kernel":
    return array.transpose(_CONV_TO_TORCH) if array.ndim == 4 else array.T
  return array


def _official_shape(leaf_name, shape):
  if leaf_name == "kernel":
    return tuple(shape[i] for i in _CONV_TO_TORCH) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


def _to_ours(leaf_name, array):
  if leaf_name == "kernel":
    return array.transpose(_CONV_TO_OURS) if array.ndim == 4 else array.T
  return array


def _model_variables(model):
  """{official key: (path, variable)} for every parameter and fixed table of `model`."""
  state = nnx.state(model, (nnx.Param, model_lib.FixedEmbed))
  return {_official_key(path): (path, var) for path, var in nnx.to_flat_state(state)}


def official_state_dict(model):
  """Our model -> an official-format state dict of numpy arrays (torch layouts)."""
  return {key: _to_official(str(path[-1]), var[...])
          for key, (path, var) in _model_variables(model).items()}


def _as_numpy(value, key):
  if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed otherwise
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.element_size() != 4:
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not an array")


def read_state_dict(path_or_state_dict):
  """A bare state dict from a `.pth` path, `{'model': state_dict}` or a bare dict."""
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"no checkpoint file at {source}")
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {source} needs PyTorch (pip install torch==2.13.0); or pass "
                        "a dict of numpy arrays instead of a path") from e
    try:
      source = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"{source} is not a PyTorch checkpoint readable with "
                       f"weights_only=True: {e}") from e
  if not isinstance(source, dict):
    raise ValueError(f"expected a state dict or {{'model': state_dict}}, got "
                     f"{type(source).__name__}")
  if "model" in source and isinstance(source["model"], dict):
    source = source["model"]
  return {key: _as_numpy(value, key) for key, value in source.items()}


def load_pytorch(path_or_state_dict, model_config, *, seed=0):
  """Build an MAE from an official-format checkpoint; every key must be used, shapes must match."""
  state_dict = read_state_dict(path_or_state_dict)
  model = model_lib.MAE(model_config, rngs=nnx.Rngs(seed))
  expected = _model_variables(model)
  missing = sorted(set(expected) - set(state_dict))
  extra = sorted(set(state_dict) - set(expected))
  if missing or extra:
    hint = ""
    if any(k.startswith(("head.", "fc_norm.")) for k in extra):
      hint = " (this looks like a fine-tuned classifier checkpoint, not a pre-trained MAE)"
    elif missing and all(k.startswith(("decoder", "mask_token")) for k in missing):
      hint = " (this looks like an encoder-only checkpoint without the MAE decoder)"
    raise KeyError(f"checkpoint does not match the model{hint}: "
                   f"{len(missing)} missing key(s) {missing[:5]}, "
                   f"{len(extra)} unexpected key(s) {extra[:5]}")
  for key, (path, var) in expected.items():
    want = _official_shape(str(path[-1]), var.shape)
    got = tuple(state_dict[key].shape)
    if got != want:
      raise ValueError(f"checkpoint key {key!r} has shape {got} but the model "
                       f"expects {want}")
    var[...] = jnp.asarray(_to_ours(str(path[-1]), state_dict[key]), var[...].dtype)
  return model


# HuggingFace transformers 5.x `ViTMAEForPreTraining` names <-> official names.
_HF_PREFIXES = (  # (HF prefix, official prefix), most specific first
    ("vit.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("vit.embeddings.position_embeddings", "pos_embed"),
    ("vit.embeddings.cls_token", "cls_token"),
    ("vit.layernorm.", "norm."),
    ("vit.layers.", "blocks."),
    ("decoder.decoder_layers.", "decoder_blocks."),
    ("decoder.", ""),
)
_HF_LAYER_PARTS = (
    (".attention.o_proj.", ".attn.proj."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
)


def _swap_prefix(key, pairs, reverse=False):
  for hf, official in pairs:
    src, dst = (official, hf) if reverse else (hf, official)
    if src and key.startswith(src):
      return dst + key[len(src):]
  if reverse:  # official decoder keys map under "decoder."
    return "decoder." + key
  raise KeyError(f"unexpected HuggingFace ViTMAE key {key!r}")


def hf_to_official(hf_state_dict):
  """HF `ViTMAEForPreTraining` state dict -> official names (q, k, v stacked into qkv)."""
  out, qkv = {}, {}
  for key, value in hf_state_dict.items():
    key = _swap_prefix(key, _HF_PREFIXES)
    for hf, official in _HF_LAYER_PARTS:
      key = key.replace(hf, official)
    for i, name in enumerate(("q", "k", "v")):
      part = f".attention.{name}_proj."
      if part in key:
        head, leaf = key.split(part)
        qkv.setdefault(f"{head}.attn.qkv.{leaf}", [None] * 3)[i] = value
        break
    else:
      out[key] = value
  for key, parts in qkv.items():
    if any(p is None for p in parts):
      raise KeyError(f"HuggingFace checkpoint lacks one of q/k/v for {key!r}")
    out[key] = np.concatenate([_as_numpy(p, key) for p in parts], axis=0)
  return out


def official_to_hf(state_dict):
  """Official names -> HF `ViTMAEForPreTraining` names (qkv split into q, k, v)."""
  out = {}
  for key, value in state_dict.items():
    if ".attn.qkv." in key:
      head, leaf = key.split(".attn.qkv.")
      for name, part in zip(("q", "k", "v"), np.split(_as_numpy(value, key), 3, axis=0)):
        out[_swap_prefix(f"{head}.attention.{name}_proj.{leaf}", _HF_PREFIXES, True)] = part
      continue
    for hf, official in _HF_LAYER_PARTS:
      key = key.replace(official, hf)
    out[_swap_prefix(key, _HF_PREFIXES, reverse=True)] = value
  return out
