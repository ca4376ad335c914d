"""Learning-rate schedules, weight-decay masks and the optimizers (optax).

Pre-training: AdamW with decay on ndim >= 2. Fine-tuning: AdamW with layer-wise lr decay
(official util/lr_decay.py). Linear probing: LARS (official util/lars.py). The last two are
written here from optax building blocks because optax has no layer-decay helper and its
`optax.lars` puts the lr before the momentum and adapts 1-D parameters too.
"""

import jax
import jax.numpy as jnp
import optax


def scaled_lr(base_lr, batch_size):
  """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
  return base_lr * batch_size / 256


def warmup_cosine(peak_lr, warmup_steps, total_steps, end_lr=0.0):
  """Linear warm-up from 0 to `peak_lr`, then half-cycle cosine to `end_lr`, per step."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_lr)


def decay_mask(params):
  """Weight decay on every parameter with ndim >= 2 (not biases / LayerNorm), as official."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(schedule, *, b1=0.9, b2=0.95, weight_decay=0.05):
  """AdamW with decoupled weight decay on the parameters `decay_mask` selects."""
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                     mask=decay_mask)


# ---------------------------------------------------------------------------------------------
# Fine-tuning and linear probing (official util/lr_decay.py and util/lars.py, SPEC section 7).
# Parameter trees are addressed by their `jax.tree_util` key paths, so the same functions serve
# plain nested dicts and `nnx.state(model, nnx.Param)` (whose paths end in `.value`).

_EMBEDDING_NAMES = ("cls_token", "pos_embed")  # layer 0 with everything under `patch_embed`
_NO_DECAY_NAMES = ("pos_embed", "cls_token")  # the classifier's official no_weight_decay()


def _key_name(key):
  """A key-path entry (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey, str, int) as str/int."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def layer_id(path, num_layers):
  """The official layer id of the parameter at `path` (a key path from the classifier's root).

  cls_token, pos_embed, patch_embed/... -> 0; blocks/i/... -> i + 1; everything else
  (fc_norm, norm, head, ...) -> num_layers + 1.
  """
  names = [_key_name(k) for k in path]
  if not names:
    return num_layers + 1
  first = str(names[0])
  if first in _EMBEDDING_NAMES or first.startswith("patch_embed"):
    return 0
  if first == "blocks" and len(names) > 1:
    return int(names[1]) + 1
  return num_layers + 1


def _layer_scale(path, num_layers, layer_decay):
  lid = layer_id(path, num_layers)
  if lid > num_layers and str(_key_name(path[0])) == "blocks":  # a depth/num_layers mix-up
    raise ValueError(f"parameter {jax.tree_util.keystr(tuple(path))} lies beyond num_layers="
                     f"{num_layers} blocks")
  return float(layer_decay ** (num_layers + 1 - lid))


def layer_decay_scales(params, num_layers, layer_decay):
  """A tree shaped like `params` holding each leaf's lr multiplier decay**(num_layers + 1 - id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _layer_scale(path, num_layers, layer_decay), params)


def finetune_decay_mask(params):
  """Weight decay on leaves with ndim >= 2, except `pos_embed` and `cls_token` (as official)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and str(_key_name(path[0])) not in _NO_DECAY_NAMES, params)


def _scale_by_layer_decay(num_layers, layer_decay):
  """Multiply each update by its layer's lr multiplier.

  The multiplier is read off the update's own key path (a python constant under jit), so the
  transform also works inside `optax.multi_transform`, whose masked trees hold placeholders.
  """
  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(_layer_scale(path, num_layers, layer_decay), u.dtype),
        updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def only_trainable(tx, trainable):
  """`tx` on the leaves `trainable` (a bool tree shaped like the params) marks; zero updates
  and no optimizer state on the others (linear probing, partial fine-tuning)."""
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def finetune_adamw(schedule, params, *, num_layers, layer_decay, b1=0.9, b2=0.999,
                   weight_decay=0.05, trainable=None):
  """AdamW with layer-wise lr decay, as torch AdamW over the official parameter groups.

  update = -lr * scale * (adam + wd * p): the group lr scales the decay too (torch decays by
  lr * wd), decay only where `finetune_decay_mask`. No gradient clipping. `params` fixes the
  tree (it is checked against `num_layers`); `trainable`, an optional bool tree shaped like
  it, freezes the False leaves.
  """
  layer_decay_scales(params, num_layers, layer_decay)  # fail early on a wrong num_layers
  tx = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
      optax.add_decayed_weights(weight_decay, mask=finetune_decay_mask),
      optax.scale_by_learning_rate(schedule),
      _scale_by_layer_decay(num_layers, layer_decay))
  return tx if trainable is None else only_trainable(tx, trainable)


def _lars_direction(weight_decay, trust_coefficient):
  """d = trust * |p| / |g + wd p| * (g + wd p) on leaves with ndim > 1; 1-D leaves pass g."""
  def one(g, p):
    if p.ndim <= 1:  # biases and norms: no decay, no trust ratio (official)
      return g
    d = g + weight_decay * p
    p_norm, d_norm = jnp.linalg.norm(p), jnp.linalg.norm(d)
    ok = (p_norm > 0) & (d_norm > 0)
    q = jnp.where(ok, trust_coefficient * p_norm / jnp.where(ok, d_norm, 1.0), 1.0)
    return d * q.astype(d.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lars needs the parameters: call tx.update(grads, state, params)")
    return jax.tree.map(one, updates, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def lars(schedule, *, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
  """LARS as the official util/lars.py: mu = momentum * mu + d; p -= lr * mu.

  optax.lars differs: it applies the lr before the momentum and adapts 1-D leaves too.
  """
  return optax.chain(
      _lars_direction(weight_decay, trust_coefficient),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule))
