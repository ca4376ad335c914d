import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mae_jax import optim


def _official_lr(it, iters_per_epoch, lr, warmup_epochs, epochs, min_lr=0.0):
  """The official per-iteration rule: linear warm-up, then half-cycle cosine (by epoch fraction)."""
  epoch = it / iters_per_epoch
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_scaled_lr():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_schedule_matches_official_rule():
  per_epoch, epochs, warmup = 10, 20, 4
  peak = optim.scaled_lr(1.5e-4, 4096)
  schedule = optim.warmup_cosine(peak, warmup * per_epoch, epochs * per_epoch)
  for it in range(epochs * per_epoch):
    np.testing.assert_allclose(float(schedule(it)), _official_lr(it, per_epoch, peak, warmup, epochs),
                               rtol=1e-5, atol=1e-6 * peak)


def test_schedule_rejects_bad_steps():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.warmup_cosine(1e-3, 50, 10)


def test_decay_mask_ndim():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4), "scale": jnp.ones(4),
            "cls_token": jnp.ones((1, 1, 4)), "conv": jnp.ones((2, 2, 3, 4))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False,
                                      "cls_token": True, "conv": True}


def test_adamw_step_matches_numpy():
  """Two AdamW steps against a numpy re-derivation with decoupled, masked weight decay."""
  lr, b1, b2, wd, eps = 1e-2, 0.9, 0.95, 0.05, 1e-8
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  grads = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))} for _ in range(2)]
  tx = optim.adamw(optax.constant_schedule(lr))
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  for name in params:
    x, m, v = params[name].copy(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
      m = b1 * m + (1 - b1) * g[name]
      v = b2 * v + (1 - b2) * g[name] ** 2
      step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
      decay = wd * x if x.ndim >= 2 else 0.0
      x = x - lr * (step + decay)
    np.testing.assert_allclose(np.asarray(p[name]), x, rtol=1e-5)


# ---- fine-tuning: layer-wise lr decay, weight-decay mask, AdamW with groups; LARS -------------

def _vit_names(depth):
  """Official (dotted) names of a global-pool ViT classifier, with tiny stand-in shapes."""
  names = {"cls_token": (1, 1, 4), "pos_embed": (1, 5, 4), "patch_embed.proj.kernel": (2, 2, 3, 4),
           "patch_embed.proj.bias": (4,)}
  for i in range(depth):
    for sub, shape in (("norm1.scale", (4,)), ("norm1.bias", (4,)), ("attn.qkv.kernel", (4, 12)),
                       ("attn.qkv.bias", (12,)), ("attn.proj.kernel", (4, 4)),
                       ("attn.proj.bias", (4,)), ("norm2.scale", (4,)), ("norm2.bias", (4,)),
                       ("mlp.fc1.kernel", (4, 16)), ("mlp.fc1.bias", (16,)),
                       ("mlp.fc2.kernel", (16, 4)), ("mlp.fc2.bias", (4,))):
      names[f"blocks.{i}.{sub}"] = shape
  names.update({"fc_norm.scale": (4,), "fc_norm.bias": (4,), "head.kernel": (4, 3),
                "head.bias": (3,)})
  return names


def _nest(flat, make):
  """Dotted names -> nested dict (block indices as int keys, as nnx.State has them)."""
  tree = {}
  for name, value in flat.items():
    keys = [int(k) if k.isdigit() else k for k in name.split(".")]
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = make(name, value)
  return tree


def _get(tree, name):
  for k in name.split("."):
    tree = tree[int(k) if k.isdigit() else k]
  return tree


def _official_scale(name, depth, decay):
  """util/lr_decay.py written out on the dotted name: num_layers there is depth + 1."""
  num_layers = depth + 1
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    lid = 0
  elif name.startswith("blocks"):
    lid = int(name.split(".")[1]) + 1
  else:
    lid = num_layers
  return decay ** (num_layers - lid)


def _official_decays(name, shape):
  return not (len(shape) == 1 or name in ("pos_embed", "cls_token"))


def test_layer_decay_scales_vit_b():
  flat = _vit_names(12)
  params = _nest(flat, lambda _, s: jnp.zeros(s))
  scales = optim.layer_decay_scales(params, 12, 0.65)
  assert jax.tree.structure(scales) == jax.tree.structure(params)
  for name in flat:
    assert _get(scales, name) == pytest.approx(_official_scale(name, 12, 0.65), rel=1e-12), name
  assert _get(scales, "head.kernel") == 1.0
  assert _get(scales, "cls_token") == pytest.approx(0.65 ** 13)


def test_layer_id_key_kinds():
  du = jax.tree_util
  assert optim.layer_id((du.DictKey("blocks"), du.SequenceKey(3), du.GetAttrKey("value")), 12) == 4
  assert optim.layer_id(("blocks", 11, "mlp", "fc1", "kernel"), 12) == 12
  assert optim.layer_id(("patch_embed", "proj", "kernel"), 12) == 0
  assert optim.layer_id((du.GetAttrKey("pos_embed"),), 12) == 0
  assert optim.layer_id(("norm", "scale"), 12) == 13
  with pytest.raises(ValueError, match="num_layers"):
    optim.layer_decay_scales({"blocks": {12: {"w": jnp.ones(2)}}}, 12, 0.65)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(4, rngs=rngs)
    self.fc = nnx.Linear(4, 4, rngs=rngs)


class _Classifier(nnx.Module):
  """The attribute names of the classifier (patch_embed, cls_token, pos_embed, blocks, ...)."""
  def __init__(self, depth, rngs):
    self.patch_embed = nnx.Linear(12, 4, rngs=rngs)
    self.cls_token = nnx.Param(jnp.full((1, 1, 4), 0.5))
    self.pos_embed = nnx.Param(jnp.full((1, 5, 4), 0.25))
    self.blocks = nnx.List([_Block(rngs) for _ in range(depth)])
    self.fc_norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)


def test_layer_decay_and_mask_on_nnx_state():
  params = nnx.state(_Classifier(3, nnx.Rngs(0)), nnx.Param)
  scales = optim.layer_decay_scales(params, 3, 0.75)
  mask = optim.finetune_decay_mask(params)
  flat_s = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(scales)}
  flat_m = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat_s["['blocks'][1]['fc']['kernel'].value"] == pytest.approx(0.75 ** 2)
  assert flat_s["['patch_embed']['kernel'].value"] == pytest.approx(0.75 ** 4)
  assert flat_s["['head']['bias'].value"] == 1.0
  assert flat_m["['blocks'][0]['fc']['kernel'].value"]
  assert not flat_m["['blocks'][0]['fc']['bias'].value"]
  assert not flat_m["['pos_embed'].value"] and not flat_m["['cls_token'].value"]
  # and the optimizer runs on the State, frozen leaves included
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key == "head", params)
  tx = optim.finetune_adamw(optax.constant_schedule(1e-3), params, num_layers=3,
                            layer_decay=0.75, trainable=trainable)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert np.array_equal(new["pos_embed"].value, params["pos_embed"].value)
  assert not np.array_equal(new["head"]["kernel"].value, params["head"]["kernel"].value)


def test_finetune_decay_mask():
  flat = _vit_names(2)
  params = _nest(flat, lambda _, s: jnp.zeros(s))
  mask = optim.finetune_decay_mask(params)
  for name, shape in flat.items():
    assert _get(mask, name) == _official_decays(name, shape), name
  assert not _get(mask, "pos_embed") and not _get(mask, "cls_token")
  assert _get(mask, "patch_embed.proj.kernel") and not _get(mask, "fc_norm.scale")


def test_finetune_adamw_matches_torch_style_groups():
  """Two steps against numpy torch-AdamW per group: lr_g = lr * scale, decay lr_g * wd * p."""
  depth, decay, wd, b1, b2, eps = 2, 0.65, 0.05, 0.9, 0.999, 1e-8
  lr_of = lambda step: 1e-2 * (1.0 + step)  # a changing lr checks the step count too
  flat = _vit_names(depth)
  rng = np.random.default_rng(1)
  init = {n: rng.normal(size=s) for n, s in flat.items()}
  grads = [{n: rng.normal(size=s) for n, s in flat.items()} for _ in range(2)]
  frozen = {"blocks.0.attn.qkv.kernel", "blocks.0.norm1.bias", "pos_embed"}
  params = _nest(init, lambda _, v: jnp.asarray(v, jnp.float32))
  trainable = _nest(flat, lambda n, _: n not in frozen)
  tx = optim.finetune_adamw(lr_of, params, num_layers=depth, layer_decay=decay, b1=b1, b2=b2,
                            weight_decay=wd, trainable=trainable)
  state, p, update = tx.init(params), params, jax.jit(tx.update)
  for g in grads:
    updates, state = update(_nest(g, lambda _, v: jnp.asarray(v, jnp.float32)), state, p)
    p = optax.apply_updates(p, updates)
  for name, shape in flat.items():
    x, m, v = init[name].copy(), 0.0, 0.0
    if name not in frozen:
      lr_scale = _official_scale(name, depth, decay)
      group_wd = wd if _official_decays(name, shape) else 0.0
      for t, g in enumerate(grads, start=1):
        group_lr = lr_of(t - 1) * lr_scale
        x = x * (1 - group_lr * group_wd)
        m = b1 * m + (1 - b1) * g[name]
        v = b2 * v + (1 - b2) * g[name] ** 2
        x = x - group_lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    # float32 vs float64: 1e-6 absolute is 1e-4 of one step at these lrs
    np.testing.assert_allclose(np.asarray(_get(p, name)), x, rtol=2e-5, atol=1e-6, err_msg=name)


def _official_lars(params, grads, lrs, momentum, wd, trust):
  """util/lars.py in numpy."""
  p = {k: v.copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for g, lr in zip(grads, lrs):
    for k in p:
      d = g[k]
      if p[k].ndim > 1:
        d = d + wd * p[k]
        pn, dn = np.linalg.norm(p[k]), np.linalg.norm(d)
        q = trust * pn / dn if (pn > 0 and dn > 0) else 1.0
        d = d * q
      mu[k] = momentum * mu[k] + d
      p[k] = p[k] - lr * mu[k]
  return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lars_matches_official(wd):
  rng = np.random.default_rng(2)
  params = {"w": rng.normal(size=(4, 3)), "conv": rng.normal(size=(2, 2, 3, 2)),
            "zero": np.zeros((3, 3)), "b": rng.normal(size=(3,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2)]
  lr_of = lambda step: 0.1 * (1.0 + step)
  tx = optim.lars(lr_of, momentum=0.9, weight_decay=wd, trust_coefficient=0.001)
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  state = tx.init(p)
  for g in grads:
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  want = _official_lars(params, grads, [lr_of(0), lr_of(1)], 0.9, wd, 0.001)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # the zero-norm matrix moved with q = 1 (its step is the raw gradient), not with q = 0
  assert not np.allclose(np.asarray(p["zero"]), 0.0)
