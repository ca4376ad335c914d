"""The one training loop: state, the pure jitted step, evaluation, logs, checkpoints.

It knows no task: what differs between pre-training and classification (model, loss,
optimizer, data, evaluators, pictures) comes from `mae_jax.tasks`. The step is one
`jax.jit` with explicit in/out shardings over the device mesh and a donated state (what
used to be pjit). Each process feeds its share of the global batch; every random draw of a
step comes from (seed, step) and, per example, its global index.
"""

import functools
import logging
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import checkpointing, config_check, flops, initial_state, intervals, optim, sharding
from mae_jax import summaries
from mae_jax import tasks
from mae_jax import evaluators as evaluators_lib
from mae_jax import guard as guard_lib
from mae_jax import state as state_lib
from mae_jax import model as model_lib
from mae_jax.weights import workdir as workdir_lib

log = logging.getLogger(__name__)

RANDOM_INIT = "<random init>"  # evaluate(): the freshly initialised state (a run's step 0)


def schedule_steps(config):
  """(total_steps, warmup_steps) from `total_steps` or epochs of `data.num_train_examples`."""
  steps_per_epoch = config.data.num_train_examples // config.batch_size
  total = config.total_steps if config.total_steps > 0 else config.epochs * steps_per_epoch
  warmup = (config.warmup_steps if config.warmup_steps >= 0
            else config.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ValueError(f"no training steps: total_steps={config.total_steps}, epochs="
                     f"{config.epochs}, {steps_per_epoch} steps per epoch (data.num_train_"
                     f"examples={config.data.num_train_examples}, batch_size={config.batch_size}"
                     "); set config.total_steps, or train on a dataset of at least batch_size "
                     "examples (config.data.dataset)")
  if warmup >= total:
    raise ValueError(f"warm-up ({warmup} steps) must be shorter than training ({total} steps)")
  return total, warmup


def _run_key(seed, attempt=0):
  """The run's random stream; a roll-back (`attempt` > 0) re-seeds the replayed steps."""
  key = jax.random.fold_in(jax.random.key(seed), 0x3A5C)
  return jax.random.fold_in(key, attempt) if attempt else key


def _init(task, config, tx, attempt=0):
  model = task.build_model(config, nnx.Rngs(config.seed))
  _, params, model_state, rest = state_lib.split_model(task, model)
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     model_state=model_state)
  return state, state_lib.Static(rest=rest, key=_run_key(config.seed, attempt),
                                 attempt=jnp.int32(attempt))


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
    size = jax.tree.leaves(batch)[0].shape[0]
    if jax.tree.leaves(state.model_state):
      raise ValueError(f"config.accum_steps={accum}: task {task.name!r} keeps BatchNorm "
                       "statistics (linear probe), which micro-batches would change; use "
                       "accum_steps=1")
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
      (loss, (metrics, _)), grads = grad_fn(state.params, micro, key)
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, (losses, metrics) = jax.lax.scan(accumulate, zeros, micros)
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    loss = jnp.mean(losses)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    model_state = state.model_state
  poison = config.get("debug_nonfinite_steps", ())
  if poison:  # test hook: non-finite gradients at these steps (before any roll-back)
    hit = jnp.isin(state.step, jnp.asarray(poison, jnp.int32)) & (static.attempt == 0)
    grads = jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)
  grad_norm = optax.global_norm(grads)
  # NaN / Inf guard: a non-finite loss or gradient leaves params, optimizer and BatchNorm
  # statistics as they were (the data still advances), so no checkpoint is ever non-finite.
  # A cond, not a per-leaf where: that kept old and new state alive, so XLA copied every
  # donated buffer (ViT-B CPU optimizer 504 vs 120 ms; benchmarks/RESULTS.md).
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


def build(config, mesh, total_steps, warmup_steps):
  """Everything to run sharded steps on `mesh`: optimizer, shardings and the jitted steps."""
  task = tasks.get(config)
  abstract_model = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))
  graphdef, abstract_params, _, _ = state_lib.split_model(task, abstract_model)
  tx, schedule = task.optimizer(config, total_steps, warmup_steps, abstract_params)
  frozen = task.frozen(config, abstract_params)
  abstract_state, abstract_static = jax.eval_shape(lambda: _init(task, config, tx))
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
  init_fn = jax.jit(lambda: _init(task, config, tx), out_shardings=(state_sh, static_sh))
  # On restore only the small fixed part is built: no throw-away copy of params + moments.
  static_fn = jax.jit(lambda attempt: _init(task, config, tx, attempt)[1], static_argnums=0,
                      out_shardings=static_sh)
  init_static = lambda attempt=0: static_fn(int(attempt))
  init_opt = jax.jit(tx.init, out_shardings=state_sh.opt_state)
  init_model_state = jax.jit(lambda: _init(task, config, tx)[0].model_state,
                             out_shardings=state_sh.model_state)
  return types.SimpleNamespace(
      task=task, tx=tx, frozen=frozen, graphdef=graphdef, abstract_state=abstract_state,
      state_sh=state_sh, static_sh=static_sh, step_fn=step_fn, eval_fn=eval_fn, init_fn=init_fn,
      init_static=init_static, init_opt=init_opt, init_model_state=init_model_state)


def check_workdir(workdir):
  """Create `workdir` and prove it is writable now, not after an hour of training."""
  if "://" in os.fspath(workdir):
    return  # object stores: Orbax / tensorstore report their own errors on first write
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable: {e}") from e


def _log_compiled(compiled, state):
  """Memory analysis of the compiled step and parameter bytes per device, before step 1."""
  log.info("parameters + optimizer state per device: %.1f MiB (params %.1f MiB)",
           sharding.per_device_bytes(state) / 2**20,
           sharding.per_device_bytes(state.params) / 2**20)
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    mem = None
  if mem is not None:
    log.info("compiled step memory per device: arguments %.1f MiB, outputs %.1f MiB, "
             "temporaries %.1f MiB, generated code %.1f MiB",
             *(getattr(mem, f, 0) / 2**20 for f in (
                 "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")))


def _host_model(built, state, static):
  return nnx.merge(built.graphdef, sharding.to_host(state.params),
                   sharding.to_host(state.model_state), sharding.to_host(static.rest))


def run_evaluators(built, evaluators, state, static, mesh):
  """[(name, value)] of every evaluator on the current state, and the seconds they took."""
  start = time.perf_counter()
  context = evaluators_lib.Context(built, state, static, mesh)
  pairs = [pair for ev in evaluators for pair in ev.run(context)]
  return pairs + ([("eval_seconds", time.perf_counter() - start)] if pairs else [])


def _log_evals(pairs, writer, step):
  if pairs:
    log.info("step %d  %s", step, "  ".join(
        f"{k} {v:.1f}s" if k == "eval_seconds" else f"{k} {v:.4f}" for k, v in pairs))
    writer.scalars(step, dict(pairs))
    writer.flush()


def evaluate(config, source=None, step=None):
  """Evaluate a checkpoint (ours), any weights `init_from` accepts, or (`source=RANDOM_INIT`) the
  state a run of `config` starts from, with the task's evaluators; returns [(name, value)]."""
  task = tasks.get(config)
  log.info("data: %s", task.check(config))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  built = build(config, mesh, 2, 1)
  source = source or config.get("init_from", "")
  if not source:
    raise ValueError("--eval_only needs a checkpoint: --restore=PATH or --config.init_from=PATH")
  evaluators = task.evaluators(config)
  if not evaluators:
    raise ValueError(f"config.task={task.name!r} with these data has nothing to evaluate "
                     "(see the log line above)")
  if source == RANDOM_INIT:
    state = built.init_fn()[0]
  elif workdir_lib.is_our_checkpoint(source):
    if not initial_state.same_task(config, source):
      if task.eval_sums is not None:
        raise ValueError(f"{source} is a pre-training checkpoint: it has no classifier head to "
                         "evaluate; fine-tune or linear-probe it first (--config.init_from)")
      raise ValueError(f"{source} is a checkpoint of another task than config.task="
                       f"{task.name!r}; evaluate it with its own config")
    state = initial_state.restore_items(built, (source, step))[0]
  else:  # a task with eval sums of its own evaluates the whole model, head included
    state = initial_state.from_weights(built, config, source,
                                       whole_classifier=task.eval_sums is not None)
  pairs = run_evaluators(built, evaluators, state, built.init_static(), mesh)
  seconds = dict(pairs).pop("eval_seconds", 0.0)
  pairs = [(name, value) for name, value in pairs if name != "eval_seconds"]
  log.info("evaluated in %.1fs", seconds)
  for name, value in pairs:
    print(f"{name} {value:.6g}", flush=True)
  return pairs


def train_and_evaluate(config, workdir, restore_from=None, allow_config_change=False):
  """Train as `config` says (auto-resuming from `workdir`); returns (state, loss history).

  Resuming with a config that defines another run (batch, seed, model, data, schedule) is an
  error unless `allow_config_change`.
  """
  config_check.check(config, restore=restore_from)  # every field, before any write or compile
  task = tasks.get(config)
  model_config = model_lib.model_config(config.model)
  log.info("data: %s", task.check(config))  # clear errors before any compile
  total_steps, warmup_steps = schedule_steps(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  is_chief = jax.process_index() == 0

  built = build(config, mesh, total_steps, warmup_steps)
  state, static, data_state, start_step = initial_state.restore_or_init(
      built, config, workdir, restore_from, allow_config_change)
  ckpt = checkpointing.Checkpointer(workdir, config)
  if start_step >= total_steps:
    log.info("%s already holds the final step %d; nothing to train", ckpt.directory, start_step)
    ckpt.close()
    # A run killed after its final checkpoint but before its final evaluation and outputs
    # (pictures) would otherwise never write them: the rerun does.
    with summaries.SummaryWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief) as writer:
      _log_evals(run_evaluators(built, task.evaluators(config), state, static, mesh), writer,
                 start_step)
      report = task.finish(config, _host_model(built, state, static), writer, workdir,
                           start_step)
    if report:
      log.info("%s", report)
    return state, []

  batches = task.train_batches(config, start_step)
  if data_state is not None:
    batches.restore(data_state)
  local = next(batches)
  # Every process says which examples it feeds: the quickest check of a multi-host launch.
  print(f"process {jax.process_index()}/{jax.process_count()} feeds {len(local['index'])} of "
        f"{config.batch_size} examples per step, first global ids "
        f"{np.asarray(local['index'][:4]).tolist()}", flush=True)
  batch = sharding.global_batch(local, mesh)
  images = batch["images"]
  if tuple(images.shape[1:]) != model_config.image_shape:
    raise ValueError(f"the input pipeline yields images of shape {images.shape[1:]} but "
                     f"config.model expects {model_config.image_shape}")
  sizes = [x.size for x in jax.tree.leaves(built.abstract_state.params)]
  frozen = jax.tree.leaves(built.frozen) if built.frozen is not None else [False] * len(sizes)
  log.info("%s: mesh %s on %d devices, %d process(es); %.2fM parameters (%.2fM trainable); "
           "steps %d..%d (%d warm-up), global batch %d, peak lr %.3g, %s compute", task.name,
           dict(mesh.shape), mesh.size, jax.process_count(), sum(sizes) / 1e6,
           sum(n for n, f in zip(sizes, frozen) if not f) / 1e6, start_step, total_steps,
           warmup_steps, config.batch_size, optim.scaled_lr(config.base_lr, config.batch_size),
           model_config.dtype)

  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, batch).compile()
  log.info("train step compiled in %.1fs", time.perf_counter() - start)
  _log_compiled(compiled, state)
  flops_fn = getattr(task, "flops_per_image", lambda _: None)
  meter = flops.Meter(flops_fn(config), config.batch_size, jax.devices(),
                      config.get("peak_tflops", 0) or None)

  writer = summaries.SummaryWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief)
  evaluators = task.evaluators(config)
  stop_after = config.stop_after_steps if config.stop_after_steps > 0 else None
  guard = guard_lib.Guard(config, rollbacks=int(jax.device_get(static.attempt)))
  history, interval = [], intervals.Interval(meter, start_step)
  step = start_step
  try:
    while step < total_steps:
      if batch is None:
        batch = sharding.global_batch(next(batches), mesh)
      state, metrics = compiled(state, static, batch)
      batch = None
      interval.add(metrics)
      step += 1
      stop = (ckpt.stop_requested(step, sync=step % config.log_every == 0)
              or (stop_after and step - start_step >= stop_after))
      if step % config.log_every == 0 or step == total_steps or stop:
        averaged, speed, flags = interval.close(step, total_steps)
        log.info("step %d/%d  loss %.4f  lr %.3e  grad_norm %.3f  %s", step, total_steps,
                 averaged["loss"], averaged["lr"], averaged["grad_norm"],
                 intervals.Interval.describe(speed))
        writer.scalars(step, {**averaged, **{k: v for k, v in speed.items() if k != "eta_s"}})
        writer.flush()
        history.append((step, averaged["loss"]))
        if guard.count(flags, step):  # past nan_patience: back to the last good checkpoint
          good_step, give_up = guard.rollback_target(ckpt.good_steps(), step, ckpt.directory,
                                                     "lower config.base_lr or use float32")
          moved = ckpt.set_aside_after(good_step) if good_step is not None else []
          if moved:
            log.info("moved the suspect checkpoint(s) %s to %s", moved,
                     os.path.join(workdir, checkpointing.SUSPECT_DIR))
          if give_up:  # a rerun (lower lr, --allow_config_change) resumes from the good step
            raise give_up
          state, data_state = initial_state.restore_step(built, workdir, good_step)
          static = built.init_static(guard.rollbacks)
          batches.restore(data_state)
          step, history = good_step, [h for h in history if h[0] <= good_step]
          interval.restart(step)
          continue
      due = [ev for ev in evaluators if ev.every_steps > 0 and step % ev.every_steps == 0]
      if due and step < total_steps:
        started = time.perf_counter()
        _log_evals(run_evaluators(built, due, state, static, mesh), writer, step)
        interval.exclude(time.perf_counter() - started)  # speed counts training time only
      every = config.get("image_every", -1)
      if every > 0 and step % every == 0 and step < total_steps:
        task.periodic(config, _host_model(built, state, static), writer, step)
      if ckpt.should_save(step, total_steps) or stop:
        # Every process's own iterator position: shards may be uneven across processes.
        positions = sharding.allgather_json(batches.state())
        flags = interval.pending_flags()
        ckpt.save(step, state, {"data": positions[0], "data_per_process": positions,
                                "seed": config.seed, "rollbacks": guard.rollbacks,
                                "good": guard.streak_after(flags) == 0})
      if stop:
        log.info("stopping at step %d (%s); rerun the same command to resume", step,
                 "signal" if ckpt.preemption.requested else "stop_after_steps")
        break
    if step == total_steps:
      _log_evals(run_evaluators(built, evaluators, state, static, mesh), writer, step)
  finally:
    ckpt.close()
    writer.flush()
  log.info("checkpoint of step %d in %s", step, ckpt.directory)
  if step == total_steps:
    report = task.finish(config, _host_model(built, state, static), writer, workdir, step)
    if report:
      log.info("%s", report)
  writer.close()
  return state, history
