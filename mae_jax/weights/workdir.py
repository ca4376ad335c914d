"""Imported weights <-> our checkpoint directories (the conversions behind `mae_jax.convert`).

An import writes step 0 of a workdir: the MAE params, no optimizer state, a `meta` item
saying where the weights came from and an `extras` item with what the MAE has no place
for (a fine-tuned `head` / `fc_norm`, a trained position table), so that an export gives
the original file back bit for bit.
"""

import json
import os

import numpy as np
from flax import nnx

from mae_jax import atomic, checkpointing
from mae_jax import model as model_lib
from mae_jax.weights import files, hf, keys, load

EXTRAS_ITEM = "extras"  # checkpoint item: file weights the MAE cannot hold


def _nest(state_dict):
  """{'head.0.weight': a} -> {'head': {'0': {'weight': a}}}: Orbax joins item paths with '.'."""
  tree = {}
  for key, value in state_dict.items():
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value)
  return tree


def flatten(tree, leaf=np.asarray, prefix=""):
  """{'a.b.c': leaf(value)} of a nested dict (the inverse of `_nest`)."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, leaf, f"{prefix}{name}."))
    else:
      out[prefix + name] = leaf(value)
  return out


def save_imported(imported, workdir, *, seed=0, overwrite=False):
  """Write an Orbax checkpoint directory (step 0) that `mae_jax.load(workdir)` opens."""
  config = load.full_config(imported.model.config, seed)
  extra_items = {EXTRAS_ITEM: _nest(imported.extras)} if imported.extras else {}
  with atomic.AtomicOutput(workdir, overwrite, is_dir=True) as tmp:
    checkpointing.save(tmp, 0, nnx.state(imported.model, nnx.Param), None, imported.meta(),
                       config, **extra_items)
  return os.path.abspath(workdir)


def converted_from(path_or_workdir, step=None):
  """(meta['converted_from'] or {}, extras {official key: array}) of one of our checkpoints."""
  workdir, step = checkpointing.resolve_checkpoint(path_or_workdir, step)
  items, step = checkpointing.restore(workdir, step)
  converted = dict(items["meta"].get("converted_from") or {})
  extras = checkpointing.restore_arrays(workdir, step, EXTRAS_ITEM)
  return converted, flatten(extras) if extras is not None else {}


def restore_mae(path_or_workdir, step=None):
  """(MAE with restored params, training config, step, meta) from one of our checkpoints.

  Needs no config files: the config saved beside the checkpoint defines the model.
  """
  workdir, step = checkpointing.resolve_checkpoint(path_or_workdir, step)
  items, step = checkpointing.restore(workdir, step)
  config = items["config"]
  model = model_lib.MAE(config.model, rngs=nnx.Rngs(config.get("seed", 0)))
  restored, _ = checkpointing.restore(workdir, step, params=nnx.state(model, nnx.Param))
  nnx.update(model, restored["params"])
  return model, config, step, items["meta"]


def export_state_dict(path_or_workdir, step=None, include_fresh=False):
  """Our checkpoint -> official-format state dict (numpy), as the file it was converted from.

  Weights that a conversion left freshly initialised are dropped (unless
  `include_fresh`); what the MAE could not hold (head, fc_norm, tables) is restored.
  """
  model, _, step, _ = restore_mae(path_or_workdir, step)
  converted, extras = converted_from(path_or_workdir, step)
  state_dict = keys.official_state_dict(model)
  if not include_fresh:
    for key in converted.get("fresh_keys", ()):
      state_dict.pop(key, None)
  state_dict.update(extras)
  return state_dict, model.config


def export_checkpoint(path_or_workdir, output, *, fmt="official", step=None, include_fresh=False,
                      overwrite=False):
  """Write our checkpoint as an official `.pth` ({'model': sd}) or an HF model directory."""
  if fmt not in ("official", "hf"):
    raise ValueError(f"--format={fmt!r}; expected 'official' or 'hf'")
  state_dict, model_config = export_state_dict(path_or_workdir, step, include_fresh)
  if fmt == "official":
    with atomic.AtomicOutput(output, overwrite, is_dir=False) as tmp:
      files.write_pth(state_dict, tmp)
    return os.path.abspath(output)
  unmapped = sorted(k for k in state_dict if k.startswith(keys.CLASSIFIER_PREFIXES))
  if unmapped:
    raise ValueError(f"{path_or_workdir} holds a classifier ({unmapped[:3]}) that HF "
                     "ViTMAEForPreTraining has no place for; export with --format=official")
  if not any(k.startswith(keys.DECODER_PREFIXES) for k in state_dict):
    raise ValueError(f"{path_or_workdir} has no trained decoder; HF ViTMAEForPreTraining needs "
                     "one: pass --include_fresh to export the freshly initialised decoder")
  with atomic.AtomicOutput(output, overwrite, is_dir=True) as tmp:
    files.write_safetensors(hf.official_to_hf(state_dict), os.path.join(tmp, hf.HF_WEIGHTS[0]))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf.hf_config(model_config), f, indent=2)
  return os.path.abspath(output)


def is_our_checkpoint(path):
  """True for a workdir with checkpoints/, that folder, or one step directory of it."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    return False
  parent, name = os.path.split(path)
  return (os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_DIR))
          or name == checkpointing.CHECKPOINT_DIR
          or (os.path.basename(parent) == checkpointing.CHECKPOINT_DIR and name.isdigit()))
