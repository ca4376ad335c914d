"""Classifier weights: official `models_vit.py` / `main_linprobe.py` files <-> `Classifier`,
and the encoder weights any source gives to a classifier (`--config.init_from`).

Official fine-tuned files hold `head.{weight,bias}` and, with global pool, `fc_norm`
instead of `norm`; linear-probe files hold `head.0.running_{mean,var}` (BatchNorm1d
without affine) and `head.1.{weight,bias}`. Pooling and head type are read from the keys,
each on its own; the classifier keeps the file's TRAINED `pos_embed` (resized bicubically
when the image size differs).
"""

import os

import numpy as np
from flax import nnx

from mae_jax import checkpointing, classifier, patches
from mae_jax import model as model_lib
from mae_jax.weights import files, hf, infer, keys
from mae_jax.weights import workdir as workdir_lib

_BN_LEAVES = {"mean": "running_mean", "var": "running_var"}  # flax BatchStat -> torch buffer
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.")
IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch BN counter: no flax counterpart


def classifier_variables(model):
  """{official key: (path, variable)} for every parameter and BatchNorm statistic."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    key = keys.official_key(path)
    head, _, leaf = key.rpartition(".")
    leaf = _BN_LEAVES.get(leaf, leaf)
    out[f"{head}.{leaf}" if head else leaf] = (path, var)
  return out


def classifier_state_dict(model):
  """A `Classifier` -> an official-format state dict of numpy arrays (torch layouts)."""
  return {key: keys.torch_layout(str(path[-1]), var[...])
          for key, (path, var) in classifier_variables(model).items()}


def head_spec(state_dict, source="state dict"):
  """(pool, head, num_classes) that an official classifier state dict implies."""
  pool = "avg" if "fc_norm.weight" in state_dict else "cls"
  if "head.1.weight" in state_dict:
    head, weight = "bn_linear", state_dict["head.1.weight"]
  elif "head.weight" in state_dict:
    head, weight = "linear", state_dict["head.weight"]
  else:
    raise KeyError(f"{source} has no classifier head (head.weight or head.1.weight): it is a "
                   "pre-trained encoder, not a fine-tuned or linear-probe checkpoint")
  return pool, head, int(weight.shape[0])


def _fit_pos_embed(table, model, source):
  """The file's position table, resized over the patch grid when the image size differs."""
  want = model.pos_embed[...].shape
  tokens = table.shape[1] - 1
  side = int(round(tokens ** 0.5))
  if table.ndim != 3 or side * side != tokens or table.shape[2] != want[2]:
    raise ValueError(f"{source}: pos_embed has shape {tuple(table.shape)}; the classifier "
                     f"expects (1, 1 + L, {want[2]}) with a square grid")
  return patches.resize_pos_embed(table, (side, side), model.config.grid)


def fill(model, state_dict, source, *, encoder_only):
  """Copy official-format weights into a `Classifier`; returns (used keys, created keys).

  `encoder_only`: take patch_embed, cls_token, pos_embed and the blocks (plus the final
  norm / fc_norm where both sides have it) and leave the head fresh; otherwise every
  classifier key must be in the file. Sizes must match (the position table is resized).
  """
  expected = classifier_variables(model)
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
  wanted = [k for k in expected if not encoder_only or not k.startswith("head")]
  missing = [k for k in wanted if k not in state_dict]
  if encoder_only:
    bad = [k for k in missing if k.startswith(ENCODER_PREFIXES)]
  else:
    bad = missing
  if bad:
    raise KeyError(f"{source}: does not match the classifier: {len(bad)} missing key(s) "
                   f"{bad[:5]} ({keys.summarise_keys(bad)})")
  deeper = sorted(k for k in state_dict if k.startswith("blocks.") and k not in expected)
  if deeper:
    raise ValueError(f"{source}: has encoder blocks the classifier lacks ("
                     f"{keys.summarise_keys(deeper)}): the file's depth is "
                     f"{1 + max(int(k.split('.')[1]) for k in deeper)} but config.model.depth="
                     f"{model.config.depth}")
  used = []
  for key in wanted:
    if key not in state_dict:
      continue
    path, var = expected[key]
    value = state_dict[key]
    if key == "pos_embed":
      value = _fit_pos_embed(value, model, source)
    want = keys.torch_shape(str(path[-1]), var.shape)
    if tuple(value.shape) != want:
      raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)} but the "
                       f"classifier expects {want} (another model size?)")
    var[...] = np.asarray(keys.our_layout(str(path[-1]), value), var[...].dtype)
    used.append(key)
  created = sorted(set(expected) - set(used))
  return used, created


def load_pytorch_classifier(path_or_state_dict, model_config, *, drop_path=0.0):
  """An official fine-tuned / linear-probe checkpoint -> a `Classifier` (eval by default).

  `model_config` gives the encoder (img_size, patch, width, depth, heads); num_classes,
  pooling and head type are read from the keys. `model(images)` returns logits.
  """
  source = files.source_name(path_or_state_dict)
  state_dict = files.read_state_dict(path_or_state_dict)
  pool, head, num_classes = head_spec(state_dict, source)
  cc = classifier.ClassifierConfig(num_classes=num_classes, pool=pool, head=head,
                                   drop_path=drop_path)
  model = classifier.Classifier(model_config, cc, rngs=nnx.Rngs(0))
  fill(model, state_dict, source, encoder_only=False)
  return model


def _is_classifier_workdir(config):
  return config.get("task", "pretrain") == "classify"


def restore_classifier(path_or_workdir, step=None):
  """(Classifier with restored params and BatchNorm statistics, config, step, meta)."""
  workdir, step = checkpointing.resolve_checkpoint(path_or_workdir, step)
  items, step = checkpointing.restore(workdir, step)
  config = items["config"]
  model = classifier.Classifier(config.model, config.classifier,
                                rngs=nnx.Rngs(config.get("seed", 0)))
  abstract = dict(params=nnx.state(model, nnx.Param))
  stats = nnx.state(model, nnx.BatchStat)
  if len(nnx.to_flat_state(stats)):
    abstract["model_state"] = stats
  restored, _ = checkpointing.restore(workdir, step, **abstract)
  nnx.update(model, restored["params"], *([restored["model_state"]]
                                          if "model_state" in restored else []))
  return model, config, step, items["meta"]


def source_state_dict(path, step=None):
  """(official-format state dict, what it is) of any weights `init_from` accepts.

  Our pre-training workdir / step directory, our classifier checkpoint, an official
  `.pth` (pre-trained encoder, visualize file with decoder, fine-tuned, linear probe) or an
  HF ViTMAE file / directory.
  """
  path = os.fspath(path)
  if workdir_lib.is_our_checkpoint(path):
    saved, _ = checkpointing.restore(*checkpointing.resolve_checkpoint(path, step))
    if _is_classifier_workdir(saved["config"]):
      model, _, step, _ = restore_classifier(path, step)
      return classifier_state_dict(model), f"mae_jax classifier checkpoint (step {step})"
    model, _, step, _ = workdir_lib.restore_mae(path, step)
    return keys.official_state_dict(model), f"mae_jax pre-training checkpoint (step {step})"
  state_dict, fmt = hf.to_official(files.read_state_dict(hf.hf_weights_path(path)), path)
  return state_dict, f"{fmt} file, {keys.KINDS[keys.checkpoint_kind(state_dict)]}"


def encoder_config_of(state_dict, source):
  """Encoder fields (embed_dim, depth, patch_size, ...) a state dict implies, for messages."""
  fields, _ = infer.infer_model_config(state_dict, source, decoder_embed_dim=512,
                                       decoder_depth=8, num_heads=1, decoder_num_heads=1)
  return {k: fields[k] for k in ("embed_dim", "depth", "patch_size", "img_size")}


def check_encoder_size(state_dict, model_config, source):
  """One clear error when the file's encoder is not the configured one (before compile)."""
  mc = model_lib.model_config(model_config)
  got = encoder_config_of(state_dict, source)
  for name in ("embed_dim", "depth", "patch_size"):
    if got[name] != getattr(mc, name):
      raise ValueError(f"{source}: the checkpoint's encoder has {name}={got[name]} "
                       f"(embed_dim={got['embed_dim']}, depth={got['depth']}, patch_size="
                       f"{got['patch_size']}) but config.model has {name}="
                       f"{getattr(mc, name)}")
