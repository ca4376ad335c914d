"""HuggingFace transformers `ViTMAEForPreTraining` names, files and configs <-> official names."""

import json
import os
import warnings

import numpy as np

from mae_jax import model as model_lib
from mae_jax.weights import files


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


# Files keep the transformers 4.x layout: hub checkpoints, and what 5.x `save_pretrained`
# writes (it maps names back on saving); 5.x state dicts use the names above.
_HF_LEGACY = (
    ("vit.encoder.layer.", "vit.layers."),
    ("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def _hf_v5_name(key):
  """A transformers 4.x / on-disk ViTMAE key -> its 5.x name (5.x names pass unchanged)."""
  for old, new in _HF_LEGACY:
    key = key.replace(old, new)
  return key


def hf_to_official(hf_state_dict):
  """HF `ViTMAEForPreTraining` state dict (5.x or on-disk 4.x names) -> official names."""
  out, qkv = {}, {}
  for key, value in hf_state_dict.items():
    key = _swap_prefix(_hf_v5_name(key), _HF_PREFIXES)
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
    out[key] = np.concatenate([files.as_numpy(p, key) for p in parts], axis=0)
  return out


def official_to_hf(state_dict):
  """Official names -> HF `ViTMAEForPreTraining` names (qkv split into q, k, v)."""
  out = {}
  for key, value in state_dict.items():
    if ".attn.qkv." in key:
      head, leaf = key.split(".attn.qkv.")
      for name, part in zip(("q", "k", "v"), np.split(files.as_numpy(value, key), 3, axis=0)):
        out[_swap_prefix(f"{head}.attention.{name}_proj.{leaf}", _HF_PREFIXES, True)] = part
      continue
    for hf, official in _HF_LAYER_PARTS:
      key = key.replace(official, hf)
    out[_swap_prefix(key, _HF_PREFIXES, reverse=True)] = value
  return out


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in an HF model directory


def hf_weights_path(path):
  """The weights file of an HF model directory (config.json + model.safetensors), or `path`."""
  if os.path.isdir(path):
    for name in HF_WEIGHTS:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path} is a directory with neither {' nor '.join(HF_WEIGHTS)} "
                            "nor an mae_jax checkpoint (checkpoints/<step>/)")
  return path


def to_official(state_dict, source="state dict"):
  """(official-format state dict, 'official' | 'hf') from either naming scheme."""
  if any(k.startswith(("vit.", "decoder.")) for k in state_dict):
    try:
      return hf_to_official(state_dict), "hf"
    except KeyError as e:
      raise KeyError(f"{source}: {e.args[0]}") from e
  return state_dict, "official"


def hf_config_fields(path):
  """Model fields from an HF config.json beside (or in) `path`; {} when there is none."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    return {}
  with open(config_path) as f:
    hf = json.load(f)
  if hf.get("hidden_act", "gelu") != "gelu":
    warnings.warn(f"{config_path}: hidden_act={hf['hidden_act']!r}; mae_jax uses exact gelu")
  if abs(hf.get("layer_norm_eps", model_lib.LN_EPS) - model_lib.LN_EPS) > 1e-9:
    warnings.warn(f"{config_path}: layer_norm_eps={hf['layer_norm_eps']}; mae_jax uses "
                  f"{model_lib.LN_EPS} (the official value), outputs will differ slightly")
  names = dict(image_size="img_size", num_attention_heads="num_heads",
               decoder_num_attention_heads="decoder_num_heads",
               norm_pix_loss="norm_pix_loss", mask_ratio="mask_ratio")
  fields = {ours: hf[theirs] for theirs, ours in names.items() if theirs in hf}
  if isinstance(fields.get("img_size"), list):
    fields["img_size"] = tuple(fields["img_size"])
  return fields


def hf_config(model_config):
  """An HF `ViTMAEConfig` dict for `model_config` (exact gelu, eps 1e-6, as official)."""
  mc = model_config
  if not isinstance(mc.img_size, int):
    raise ValueError(f"HF ViTMAE export needs a square image; img_size={mc.img_size}")
  return dict(
      model_type="vit_mae", architectures=["ViTMAEForPreTraining"], image_size=mc.img_size,
      patch_size=mc.patch_size, num_channels=mc.in_chans, hidden_size=mc.embed_dim,
      num_hidden_layers=mc.depth, num_attention_heads=mc.num_heads,
      intermediate_size=int(mc.embed_dim * mc.mlp_ratio), decoder_hidden_size=mc.decoder_embed_dim,
      decoder_num_hidden_layers=mc.decoder_depth, decoder_num_attention_heads=mc.decoder_num_heads,
      decoder_intermediate_size=int(mc.decoder_embed_dim * mc.mlp_ratio), hidden_act="gelu",
      layer_norm_eps=model_lib.LN_EPS, qkv_bias=True, norm_pix_loss=mc.norm_pix_loss,
      mask_ratio=mc.mask_ratio, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
