"""Official PyTorch MAE checkpoints <-> our models.

Our module names mirror the official ones (`blocks.3.attn.qkv`, `decoder_pred`, ...);
only the leaf names and layouts differ: torch linear weights are (out, in) and
become (in, out) kernels, the conv weight (D, C, p, p) becomes (p, p, C, D),
LayerNorm `weight` is our `scale`.

Command line (all flags: README "Converting checkpoints"):
  python -m mae_jax.convert --input=mae_pretrain_vit_base.pth --output=workdirs/vit_b_official
  python -m mae_jax.convert --input=workdirs/demo --output=demo_official.pth
  python -m mae_jax.convert --input=workdirs/demo --output=demo_hf --format=hf
Imports take official `.pth` files (pre-trained with or without the decoder,
fine-tuned with `head` / `fc_norm`) and HF `ViTMAEForPreTraining` weights
(`.safetensors`, `.bin` or a directory with `config.json`) and write an Orbax
checkpoint directory that `mae_jax.load` opens; exports go the other way.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import model as model_lib
from mae_jax import patches

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


def _read_safetensors(path):
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError(f"reading {path} needs safetensors (pip install safetensors)") from e
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_state_dict(path_or_state_dict):
  """A bare state dict from a `.pth` / `.bin` / `.safetensors` path, `{'model': sd}` or a dict."""
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"no checkpoint file at {source}")
    if os.fspath(source).endswith(".safetensors"):
      return _read_safetensors(source)
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


DECODER_PREFIXES = ("decoder_", "mask_token")  # official keys of the MAE decoder
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")     # official keys a fine-tuned classifier adds


def _fill(model, state_dict, source, allow_missing=(), allow_extra=()):
  """Copy `state_dict` into `model`; keys outside the allowed prefixes must match exactly.

  Returns (missing keys, i.e. left as initialised; extra keys, i.e. not used).
  """
  expected = _model_variables(model)
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
    want = _official_shape(str(path[-1]), var.shape)
    got = tuple(state_dict[key].shape)
    if got != want:
      raise ValueError(f"{source}: checkpoint key {key!r} has shape {got} but the model "
                       f"expects {want}")
    var[...] = jnp.asarray(_to_ours(str(path[-1]), state_dict[key]), var[...].dtype)
  return missing, extra


def _source_name(path_or_state_dict):
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    return os.fspath(path_or_state_dict)
  return "state dict"


def load_pytorch(path_or_state_dict, model_config, *, seed=0, allow_encoder_only=False):
  """Build an MAE from an official-format checkpoint; every key must be used, shapes must match.

  With `allow_encoder_only`, a file without the decoder (the published
  `mae_pretrain_vit_*.pth`) loads into the encoder; the decoder stays freshly
  initialised and a warning names its keys.
  """
  source = _source_name(path_or_state_dict)
  state_dict = read_state_dict(path_or_state_dict)
  model = model_lib.MAE(model_config, rngs=nnx.Rngs(seed))
  missing, _ = _fill(model, state_dict, source,
                     allow_missing=DECODER_PREFIXES if allow_encoder_only else ())
  if missing:
    _warn_fresh(source, missing)
  return model


def _warn_fresh(source, keys):
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


# ---------------------------------------------------------------------------------------------
# Whole files <-> Orbax checkpoint directories (the `python -m mae_jax.convert` CLI).

EXTRAS_FILE = "converted_extras.npz"  # beside `checkpoints/`: file weights mae_jax.load ignores
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
KINDS = {"pretrain": "a pre-trained MAE with its decoder",
         "encoder_only": "an encoder-only pre-trained file (no MAE decoder)",
         "finetuned": "a fine-tuned classifier (head / fc_norm, no MAE decoder)"}


@dataclasses.dataclass
class Imported:
  """An imported file: the model plus what the file did not provide or we could not use."""
  model: model_lib.MAE
  source: str
  format: str          # "official" | "hf"
  kind: str            # a key of KINDS
  fresh: list          # our official-format keys left freshly initialised
  extras: dict         # file weights the MAE cannot hold (head, fc_norm, non-sin-cos tables)
  assumed: dict        # model fields the file does not store, with the value used

  def meta(self):
    """JSON-able description stored in the checkpoint's meta item."""
    return {"converted_from": dict(
        file=os.path.abspath(self.source), format=self.format, kind=self.kind,
        decoder_from_file=not any(k.startswith(DECODER_PREFIXES) for k in self.fresh),
        fresh_keys=self.fresh, extra_keys=sorted(self.extras), assumed=self.assumed)}


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


def checkpoint_kind(state_dict):
  """'pretrain' | 'encoder_only' | 'finetuned' for an official-format state dict."""
  if any(k.startswith(CLASSIFIER_PREFIXES) for k in state_dict):
    return "finetuned"
  if any(k.startswith(DECODER_PREFIXES) for k in state_dict):
    return "pretrain"
  return "encoder_only"


def _count_blocks(state_dict, prefix):
  return len({k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def _hf_config_fields(path):
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


def _default_heads(width, decoder):
  """Heads are not stored in a state dict: the paper's sizes, else 64 (32 in a decoder) per head."""
  known = {512: 16} if decoder else {s["embed_dim"]: s["num_heads"]
                                     for s in model_lib.SIZES.values()}
  if width in known:
    return known[width]
  per_head = 32 if decoder else 64
  return width // per_head if width % per_head == 0 else None


def infer_model_config(state_dict, source="state dict", **overrides):
  """(model fields, assumed) from an official-format state dict's shapes.

  `overrides` (None = not given) win over what is inferred. `assumed` lists the
  fields the file does not store (heads, loss type, a missing decoder's size).
  """
  overrides = {k: v for k, v in overrides.items() if v is not None}
  for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
    if key not in state_dict:
      raise KeyError(f"{source} is not an MAE / ViT checkpoint: it has no {key!r} "
                     f"(first keys: {sorted(state_dict)[:5]})")
  dim, chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
  fields = dict(embed_dim=dim, in_chans=chans, patch_size=patch,
                depth=_count_blocks(state_dict, "blocks"),
                mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim)
  if "img_size" not in overrides:
    fields["img_size"] = 224  # the official resolution, when the file has no table
    if "pos_embed" in state_dict:
      tokens = state_dict["pos_embed"].shape[1] - 1
      side = math.isqrt(tokens)
      if side * side != tokens:
        raise ValueError(f"{source}: pos_embed has {tokens} patch rows, not a square grid; "
                         "pass --img_size=H,W")
      fields["img_size"] = side * patch
  assumed = {}
  if "decoder_embed.weight" in state_dict:
    fields["decoder_embed_dim"] = state_dict["decoder_embed.weight"].shape[0]
    fields["decoder_depth"] = _count_blocks(state_dict, "decoder_blocks")
  else:
    for name in ("decoder_embed_dim", "decoder_depth"):
      assumed[name] = fields[name] = overrides.get(name, getattr(model_lib.ModelConfig, name))
  fields.update(overrides)
  for name, width, decoder in (("num_heads", fields["embed_dim"], False),
                               ("decoder_num_heads", fields["decoder_embed_dim"], True)):
    if name not in fields:
      fields[name] = assumed[name] = _default_heads(width, decoder)
      if fields[name] is None:
        raise ValueError(f"{source}: cannot guess {name} for width {width} (heads are not "
                         f"stored in the file); pass --{name}")
  for name in ("norm_pix_loss", "mask_ratio"):
    if name not in fields:
      fields[name] = assumed[name] = getattr(model_lib.ModelConfig, name)
  return fields, assumed


def import_checkpoint(path, *, seed=0, require_decoder=False, **overrides):
  """An official `.pth` or HF file / directory -> `Imported`, validated; nothing is written.

  Encoder-only and fine-tuned files load with the decoder freshly initialised
  (a warning names its keys) unless `require_decoder`, which makes them an error.
  """
  path = os.fspath(path)
  weights = hf_weights_path(path)
  state_dict, fmt = to_official(read_state_dict(weights), path)
  kind = checkpoint_kind(state_dict)
  if require_decoder and kind != "pretrain":
    raise ValueError(
        f"{path} is {KINDS[kind]}: it has no decoder keys (mask_token, decoder_*), and "
        "reconstructions need the MAE decoder. Use a file that has it (e.g. the official "
        "mae_visualize_vit_large.pth) or an mae_jax pre-training checkpoint")
  if fmt == "hf":
    overrides = {**_hf_config_fields(path), **{k: v for k, v in overrides.items()
                                               if v is not None}}
  fields, assumed = infer_model_config(state_dict, path, **overrides)
  model = model_lib.MAE(model_lib.model_config(fields), rngs=nnx.Rngs(seed))
  allow_missing = () if require_decoder else DECODER_PREFIXES
  if "fc_norm.weight" in state_dict:  # global-pool fine-tuning replaced the final norm
    allow_missing += ("norm.",)
  missing, extra = _fill(model, state_dict, path, allow_missing=allow_missing,
                         allow_extra=CLASSIFIER_PREFIXES)
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
    _warn_fresh(path, missing)
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


class AtomicOutput:
  """Build `path` under a temporary name beside it; rename into place only on success."""

  def __init__(self, path, overwrite, is_dir):
    self.path = os.path.abspath(os.fspath(path))
    self.overwrite, self.is_dir = overwrite, is_dir

  def __enter__(self):
    if os.path.exists(self.path) and not self.overwrite:
      raise FileExistsError(f"{self.path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    name = "." + os.path.basename(self.path) + ".tmp-"
    if self.is_dir:
      self.tmp = tempfile.mkdtemp(prefix=name, dir=parent)
    else:
      fd, self.tmp = tempfile.mkstemp(prefix=name, dir=parent)
      os.close(fd)
    umask = os.umask(0)
    os.umask(umask)  # temp files are private; the result gets the usual permissions
    os.chmod(self.tmp, (0o777 if self.is_dir else 0o666) & ~umask)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      _remove(self.tmp)
      return False
    if os.path.isdir(self.path) and not os.path.islink(self.path):
      shutil.rmtree(self.path)
    os.replace(self.tmp, self.path)
    return False


def _remove(path):
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def save_imported(imported, workdir, *, seed=0, overwrite=False):
  """Write an Orbax checkpoint directory (step 0) that `mae_jax.load(workdir)` opens."""
  from mae_jax import checkpointing  # pylint: disable=import-outside-toplevel
  config = full_config(imported.model.config, seed)
  with AtomicOutput(workdir, overwrite, is_dir=True) as tmp:
    checkpointing.save(tmp, 0, nnx.state(imported.model, nnx.Param), None, imported.meta(),
                       config)
    if imported.extras:
      np.savez(os.path.join(tmp, EXTRAS_FILE), **imported.extras)
  return os.path.abspath(workdir)


def _converted_from(path_or_workdir, step):
  """(meta['converted_from'] or {}, extras dict, workdir) of one of our checkpoints."""
  from mae_jax import api, checkpointing  # pylint: disable=import-outside-toplevel
  workdir, step = api.resolve_checkpoint(path_or_workdir, step)
  items, _ = checkpointing.restore(workdir, step)
  converted = dict(items["meta"].get("converted_from") or {})
  extras_path = os.path.join(workdir, EXTRAS_FILE)
  extras = {}
  if os.path.isfile(extras_path):
    with np.load(extras_path, allow_pickle=False) as npz:
      extras = {k: npz[k] for k in npz.files}
  return converted, extras


def load_any(path, *, step=None, require_decoder=False, **overrides):
  """A `Pretrained` from one of our checkpoint directories or an official / HF weights file."""
  from mae_jax import api  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n)) for n in HF_WEIGHTS):
    if require_decoder:
      converted, _ = _converted_from(path, step)
      if converted and not converted.get("decoder_from_file", True):
        raise ValueError(
            f"{path} was converted from {converted.get('file')}, {KINDS[converted['kind']]}: its "
            "decoder is freshly initialised, so reconstructions would be noise. Convert a file "
            "with the decoder (e.g. the official mae_visualize_vit_large.pth)")
    return api.load(path, step)
  imported = import_checkpoint(path, require_decoder=require_decoder, **overrides)
  return api.Pretrained(imported.model, full_config(imported.model.config))


def export_state_dict(path_or_workdir, step=None, include_fresh=False):
  """Our checkpoint -> official-format state dict (numpy), as the file it was converted from.

  Weights that a conversion left freshly initialised are dropped (unless
  `include_fresh`); what the MAE could not hold (head, fc_norm, tables) is restored.
  """
  from mae_jax import api  # pylint: disable=import-outside-toplevel
  loaded = api.load(path_or_workdir, step)
  converted, extras = _converted_from(path_or_workdir, step)
  state_dict = official_state_dict(loaded.model)
  if not include_fresh:
    for key in converted.get("fresh_keys", ()):
      state_dict.pop(key, None)
  state_dict.update(extras)
  return state_dict, loaded.model.config


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


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing .pth files needs PyTorch (pip install torch==2.13.0)") from e
  return torch


def _tensors(state_dict):
  torch = _torch()
  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}  # writable copies


def export_checkpoint(path_or_workdir, output, *, fmt="official", step=None, include_fresh=False,
                      overwrite=False):
  """Write our checkpoint as an official `.pth` ({'model': sd}) or an HF model directory."""
  state_dict, model_config = export_state_dict(path_or_workdir, step, include_fresh)
  if fmt == "official":
    tensors = _tensors(state_dict)
    with AtomicOutput(output, overwrite, is_dir=False) as tmp:
      _torch().save({"model": tensors}, tmp)
    return os.path.abspath(output)
  if fmt != "hf":
    raise ValueError(f"--format={fmt!r}; expected 'official' or 'hf'")
  unmapped = sorted(k for k in state_dict if k.startswith(CLASSIFIER_PREFIXES))
  if unmapped:
    raise ValueError(f"{path_or_workdir} holds a classifier ({unmapped[:3]}) that HF "
                     "ViTMAEForPreTraining has no place for; export with --format=official")
  if not any(k.startswith(DECODER_PREFIXES) for k in state_dict):
    raise ValueError(f"{path_or_workdir} has no trained decoder; HF ViTMAEForPreTraining needs "
                     "one: pass --include_fresh to export the freshly initialised decoder")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  hf = {k: np.ascontiguousarray(v) for k, v in official_to_hf(state_dict).items()}
  with AtomicOutput(output, overwrite, is_dir=True) as tmp:
    save_file(hf, os.path.join(tmp, HF_WEIGHTS[0]), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(model_config), f, indent=2)
  return os.path.abspath(output)


def is_our_checkpoint(path):
  """True for a workdir with checkpoints/, that folder, or one step directory of it."""
  from mae_jax import checkpointing  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    return False
  parent, name = os.path.split(path)
  return (os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_DIR))
          or name == checkpointing.CHECKPOINT_DIR
          or (os.path.basename(parent) == checkpointing.CHECKPOINT_DIR and name.isdigit()))


# ------------------------------------------------------------------------------ command line

def _img_size(text):
  values = tuple(int(v) for v in text.split(","))
  return values[0] if len(values) == 1 else values


def _bool(text):
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_model_flags(parser):
  """Flags for what a PyTorch file does not store (or to override what it implies)."""
  group = parser.add_argument_group("model fields for official / HF files (inferred if unset)")
  group.add_argument("--img_size", type=_img_size, help="H or H,W (default: from pos_embed)")
  group.add_argument("--num_heads", type=int, help="encoder heads (default: paper size, else D/64)")
  group.add_argument("--decoder_embed_dim", type=int,
                     help="decoder width for files without one (default 512)")
  group.add_argument("--decoder_depth", type=int,
                     help="decoder depth for files without one (default 8)")
  group.add_argument("--decoder_num_heads", type=int,
                     help="decoder heads (default 16 at width 512, else width/32)")
  group.add_argument("--norm_pix_loss", type=_bool,
                     help="true|false: targets were per-patch normalised (default true; "
                          "false for the official mae_visualize_*.pth)")
  group.add_argument("--init_seed", type=int, default=0,
                     help="initialisation of weights the file lacks (e.g. a decoder)")


def add_checkpoint_flags(parser, what):
  """--checkpoint (`what` it may be), --step and the model flags, for tools that read a model."""
  parser.add_argument("--checkpoint", required=True,
                      help=f"an mae_jax workdir / step directory, or {what}")
  parser.add_argument("--step", type=int, help="checkpoint step (default latest)")
  add_model_flags(parser)


def load_from_flags(args, require_decoder=False):
  """The `Pretrained` that --checkpoint, --step and the model flags name."""
  return load_any(args.checkpoint, step=args.step, require_decoder=require_decoder,
                  **model_overrides(args))


def model_overrides(args):
  names = ("img_size", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
           "norm_pix_loss")
  return dict({n: getattr(args, n) for n in names}, seed=args.init_seed)


def run_cli(main, argv):
  """Run `main(argv)`; user errors become one 'error: ...' line and exit status 1."""
  try:
    return main(argv)
  except (KeyError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.convert",
      description="Official / HF PyTorch MAE weights <-> mae_jax Orbax checkpoints.")
  parser.add_argument("--input", required=True,
                      help="an official .pth, an HF .safetensors/.bin or HF model directory "
                           "(import), or an mae_jax workdir / step directory (export)")
  parser.add_argument("--output", required=True,
                      help="import: the workdir to create; export: the .pth file "
                           "(--format=official) or HF model directory (--format=hf)")
  parser.add_argument("--format", choices=("official", "hf"), default="official",
                      help="export format (imports detect it)")
  parser.add_argument("--step", type=int, help="export: the checkpoint step (default latest)")
  parser.add_argument("--include_fresh", action="store_true",
                      help="export: also write weights a conversion left freshly initialised")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  add_model_flags(parser)
  args = parser.parse_args(argv)
  if is_our_checkpoint(args.input):
    out = export_checkpoint(args.input, args.output, fmt=args.format, step=args.step,
                            include_fresh=args.include_fresh, overwrite=args.overwrite)
    print(f"wrote {out} ({args.format} format)")
    return out
  overrides = model_overrides(args)
  imported = import_checkpoint(args.input, **overrides)
  out = save_imported(imported, args.output, seed=overrides["seed"], overwrite=args.overwrite)
  mc = imported.model.config
  print(f"read {imported.source}: {imported.format} format, {KINDS[imported.kind]}; "
        f"ViT D={mc.embed_dim} depth={mc.depth} patch={mc.patch_size} img={mc.img_size}, "
        f"decoder {mc.decoder_embed_dim}x{mc.decoder_depth}")
  if imported.assumed:
    print("not stored in the file, assumed (override with flags): "
          + ", ".join(f"{k}={v}" for k, v in imported.assumed.items()))
  if imported.extras:
    print(f"kept for export only ({EXTRAS_FILE}): {summarise_keys(imported.extras)}")
  print(f"wrote {out} (open with mae_jax.load({out!r}))")
  return out


if __name__ == "__main__":
  run_cli(main, None)
