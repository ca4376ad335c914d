"""The jitted steps of a run: initial state, the pure train step, the eval step, and `build`,
which compiles them with explicit in / out shardings over the device mesh and a donated state.

Every random draw of a step comes from (seed, step) and, per example, its global index.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax import sharding
from mae_jax import state as state_lib
from mae_jax import tasks
from mae_jax.evaluators import context as context_lib


def _run_key(seed, attempt=0):
  """The run's random stream; a roll-back (`attempt` > 0) re-seeds the replayed steps."""
  key = jax.random.fold_in(jax.random.key(seed), 0x3A5C)
  return jax.random.fold_in(key, attempt) if attempt else key


def init_state(task, config, tx, attempt=0):
  """(TrainState, Static) of a fresh run; `attempt` > 0: the re-seeded stream of a roll-back."""
  model = task.build_model(config, nnx.Rngs(config.seed))
  _, params, model_state, rest = state_lib.split_model(task, model)
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     model_state=model_state)
  return state, state_lib.Static(rest=rest, key=_run_key(config.seed, attempt),
                                 attempt=jnp.int32(attempt))


def _accumulated(grad_fn, params, batch, key, accum):
  """(mean loss, mean metrics, mean grads) of `batch` as `accum` micro-batches in a scan."""
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % accum:
    raise ValueError(f"config.accum_steps={accum} does not divide the global batch {size} "
                     "(config.batch_size)")
  # (B, ...) -> (k, B/k, ...): micro-batch i = examples i, i + k, i + 2k, ...
  micros = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(size // accum, accum, *x.shape[1:]), 0, 1), batch)

  def accumulate(grad_sum, micro):
    # The step's key for every micro-batch: masks come from (key, global index), so they
    # equal the big batch's. Per-batch draws (classify: mixup lambda, drop path by
    # position) repeat across the micro-batches.
    (loss, (metrics, _)), grads = grad_fn(params, micro, key)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, (losses, metrics) = jax.lax.scan(accumulate, zeros, micros)
  return (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
          jax.tree.map(lambda g: g / accum, grad_sum))


def train_step(task, config, graphdef, tx, schedule, frozen, state, static, batch):
  """One optimizer step on the global `batch`; returns (new state, metrics).

  `config.accum_steps` = k > 1: the batch runs as k micro-batches (a `lax.scan`), their
  gradients averaged: the same step as the big batch (masks come from each example's global
  index), k times less activation memory. Micro-batch i holds examples i, i + k, ... so each
  stays spread over the batch-sharded devices. Tasks with BatchNorm statistics are refused.
  """
  key = jax.random.fold_in(static.key, state.step)
  accum = config.get("accum_steps", 1)

  def loss_fn(params, micro, micro_key):
    if frozen is not None:  # no backward pass through what does not train
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    # Fresh Variable objects of this trace: the task may update them (BatchNorm statistics).
    model_state = jax.tree.map(lambda x: x, state.model_state)
    model = nnx.merge(graphdef, params, model_state, static.rest)
    loss, metrics = task.loss(config, model, micro, micro_key)
    return loss, (metrics, nnx.state(model, task.model_state))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, (metrics, model_state)), grads = grad_fn(state.params, batch, key)
  else:
    if jax.tree.leaves(state.model_state):
      raise ValueError(f"config.accum_steps={accum}: task {task.name!r} keeps BatchNorm "
                       "statistics (linear probe), which micro-batches would change; use "
                       "accum_steps=1")
    loss, metrics, grads = _accumulated(grad_fn, state.params, batch, key, accum)
    model_state = state.model_state
  poison = config.get("debug_nonfinite_steps", ())
  if poison:  # test hook: non-finite gradients at these steps (before any roll-back)
    hit = jnp.isin(state.step, jnp.asarray(poison, jnp.int32)) & (static.attempt == 0)
    grads = jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)
  grad_norm = optax.global_norm(grads)
  # NaN / Inf guard: a non-finite loss or gradient leaves params, optimizer and BatchNorm
  # statistics as they were (the data still advances), so no checkpoint is ever non-finite.
  # A cond, not a per-leaf where: that kept old and new state alive, so XLA copied every
  # donated buffer.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(old):
    params, opt_state, _ = old
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state

  params, opt_state, model_state = jax.lax.cond(
      finite, apply, lambda old: old, (state.params, state.opt_state, state.model_state))
  metrics = {**metrics, "loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state), metrics


def eval_step(task, graphdef, state, static, batch):
  """The task's eval sums over one global eval batch (inference mode)."""
  model = nnx.merge(graphdef, state.params, state.model_state, static.rest)
  return task.eval_sums(model, batch)


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` returns: the task, optimizer, shardings and jitted functions of one run."""
  task: tasks.Task
  tx: optax.GradientTransformation
  frozen: Optional[Any]        # bool pytree of params that never train, or None
  graphdef: nnx.GraphDef
  abstract_state: state_lib.TrainState
  state_sh: state_lib.TrainState   # shardings, one per state leaf
  static_sh: state_lib.Static
  step_fn: Callable            # (state, static, batch) -> (state, metrics), state donated
  eval_fn: Optional[Callable]  # (state, static, batch) -> the task's eval sums, or None
  init_fn: Callable            # () -> (state, static) of a fresh run
  init_static: Callable        # (attempt=0) -> static
  init_opt: Callable           # (params) -> optimizer state
  init_model_state: Callable   # () -> fresh model_state (BatchNorm statistics)
  feature_fn: Callable         # (pool) -> jitted encoder features of a global eval batch


def build(config, mesh, total_steps, warmup_steps):
  """Everything to run sharded steps on `mesh`: optimizer, shardings and the jitted steps."""
  task = tasks.get(config)
  abstract_model = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))
  graphdef, abstract_params, _, _ = state_lib.split_model(task, abstract_model)
  tx, schedule = task.optimizer(config, total_steps, warmup_steps, abstract_params)
  frozen = task.frozen(config, abstract_params)
  abstract_state, abstract_static = jax.eval_shape(lambda: init_state(task, config, tx))
  rules = tuple(map(tuple, config.mesh.rules))
  shard = lambda tree: sharding.state_shardings(tree, mesh, rules)
  state_sh = state_lib.TrainState(step=sharding.replicated(mesh),
                                  params=shard(abstract_state.params),
                                  opt_state=shard(abstract_state.opt_state),
                                  model_state=shard(abstract_state.model_state))
  static_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_static)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, task, config, graphdef, tx, schedule, frozen),
      in_shardings=(state_sh, static_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  eval_fn = (jax.jit(functools.partial(eval_step, task, graphdef),
                     in_shardings=(state_sh, static_sh, batch_sh),
                     out_shardings=sharding.replicated(mesh))
             if task.eval_sums is not None else None)
  init_fn = jax.jit(lambda: init_state(task, config, tx), out_shardings=(state_sh, static_sh))
  # On restore only the small fixed part is built: no throw-away copy of params + moments.
  static_fn = jax.jit(lambda attempt: init_state(task, config, tx, attempt)[1], static_argnums=0,
                      out_shardings=static_sh)
  init_static = lambda attempt=0: static_fn(int(attempt))
  init_opt = jax.jit(tx.init, out_shardings=state_sh.opt_state)
  init_model_state = jax.jit(lambda: init_state(task, config, tx)[0].model_state,
                             out_shardings=state_sh.model_state)
  feature_fns = {}

  def feature_fn(pool):
    if pool not in feature_fns:
      feature_fns[pool] = jax.jit(
          functools.partial(context_lib.features_step, graphdef, pool),
          in_shardings=(state_sh.params, state_sh.model_state, static_sh, batch_sh),
          out_shardings=sharding.replicated(mesh))
    return feature_fns[pool]

  return Built(
      task=task, tx=tx, frozen=frozen, graphdef=graphdef, abstract_state=abstract_state,
      state_sh=state_sh, static_sh=static_sh, step_fn=step_fn, eval_fn=eval_fn, init_fn=init_fn,
      init_static=init_static, init_opt=init_opt, init_model_state=init_model_state,
      feature_fn=feature_fn)
