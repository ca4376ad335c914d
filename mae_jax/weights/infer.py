"""What a weight file does not say: the model config, inferred from its shapes (and flags)."""

import math

from mae_jax import model as model_lib


def _count_blocks(state_dict, prefix):
  """How many `prefix.<i>.*` blocks the state dict has."""
  return len({k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


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
