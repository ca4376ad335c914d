"""Pre-training: state creation, the pure train step and the training loop.

The step is one `jax.jit` with explicit in/out shardings over the device mesh and
a donated state (what used to be pjit). Each process feeds its share of the
global batch; masks depend only on (seed, step, global example index).
"""

import functools
import logging
import os
import time
import types

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import checkpointing, data, imaging, optim, patches, pictures, sharding, summaries
from mae_jax import model as model_lib

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State       # trainable nnx.Param values
  opt_state: optax.OptState


@flax.struct.dataclass
class Static:
  """What the step needs besides the state; not donated, not checkpointed."""
  rest: nnx.State         # fixed sin-cos tables and rng state, rebuilt from the config
  mask_key: jax.Array


def schedule_steps(config):
  """(total_steps, warmup_steps) from `total_steps` or epochs of `data.num_train_examples`."""
  steps_per_epoch = config.data.num_train_examples // config.batch_size
  total = config.total_steps if config.total_steps > 0 else config.epochs * steps_per_epoch
  warmup = (config.warmup_steps if config.warmup_steps >= 0
            else config.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ValueError(f"no training steps: total_steps={config.total_steps}, epochs="
                     f"{config.epochs}, {steps_per_epoch} steps per epoch (data.num_train_"
                     f"examples={config.data.num_train_examples}, batch_size={config.batch_size})")
  if warmup >= total:
    raise ValueError(f"warm-up ({warmup} steps) must be shorter than training ({total} steps)")
  return total, warmup


def make_optimizer(config, total_steps, warmup_steps):
  """(optax transformation, lr schedule) of the paper recipe."""
  peak = optim.scaled_lr(config.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(peak, warmup_steps, total_steps, config.min_lr)
  tx = optim.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  return tx, schedule


def _mask_key(seed):
  return jax.random.fold_in(jax.random.key(seed), 0x3A5C)  # the mask-noise stream


def _init(config, tx):
  model = model_lib.MAE(config.model, rngs=nnx.Rngs(config.seed))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  return state, Static(rest=rest, mask_key=_mask_key(config.seed))


def sharded_setup(config, tx, mesh):
  """(graphdef, abstract state, state shardings, static shardings) on `mesh`, nothing allocated."""
  model = nnx.eval_shape(lambda: model_lib.MAE(config.model, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(model)
  abstract_state, abstract_static = jax.eval_shape(lambda: _init(config, tx))
  rules = tuple(map(tuple, config.mesh.rules))
  state_sh = TrainState(step=sharding.replicated(mesh),
                        params=sharding.state_shardings(abstract_state.params, mesh, rules),
                        opt_state=sharding.state_shardings(abstract_state.opt_state, mesh, rules))
  static_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_static)
  return graphdef, abstract_state, state_sh, static_sh


def train_step(graphdef, tx, schedule, model_config, state, static, batch):
  """One AdamW step on `batch` = {images (B,H,W,C) uint8 or normalised, index (B,) global ids}."""
  step_key = jax.random.fold_in(static.mask_key, state.step)
  noise = patches.example_noise(model_config.mask_sampler, step_key, batch["index"],
                                model_config.grid, model_config.mask_ratio)
  images = batch["images"]
  if images.dtype == jnp.uint8:  # pipelines may ship uint8 and normalise here, on device
    images = imaging.normalize(images)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, static.rest)
    loss, _, _ = model(images, noise=noise)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _format_eta(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


def build(config, mesh, total_steps, warmup_steps):
  """Everything to run sharded steps on `mesh`: optimizer, shardings and the jitted step."""
  model_config = model_lib.model_config(config.model)
  tx, schedule = make_optimizer(config, total_steps, warmup_steps)
  graphdef, abstract_state, state_sh, static_sh = sharded_setup(config, tx, mesh)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef, tx, schedule, model_config),
      in_shardings=(state_sh, static_sh, sharding.batch_sharding(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  init_fn = jax.jit(lambda: _init(config, tx), out_shardings=(state_sh, static_sh))
  # On restore only the small fixed part is built: no throw-away copy of params + moments.
  init_static = jax.jit(lambda: _init(config, tx)[1], out_shardings=static_sh)
  return types.SimpleNamespace(tx=tx, graphdef=graphdef, abstract_state=abstract_state,
                               state_sh=state_sh, static_sh=static_sh, step_fn=step_fn,
                               init_fn=init_fn, init_static=init_static)


def _restore_or_init(built, workdir, ckpt, restore_from):
  """(state, static, data position, start step): resume, restore from a path, or initialise."""
  step = ckpt.latest_step()
  if step is not None:
    source = (workdir, step)
  elif restore_from:
    source = checkpointing.resolve_checkpoint(restore_from)
  else:
    state, static = built.init_fn()
    return state, static, None, 0
  target = sharding.abstract_with_shardings(built.abstract_state, built.state_sh)
  restored, step = checkpointing.restore(*source, params=target.params,
                                         opt_state=target.opt_state)
  log.info("resuming from %s/%d", checkpointing.checkpoint_root(source[0]), step)
  state = TrainState(step=jax.device_put(jnp.int32(step), built.state_sh.step),
                     params=restored["params"], opt_state=restored["opt_state"])
  return state, built.init_static(), restored["meta"].get("data"), step


def train_and_evaluate(config, workdir, restore_from=None):
  """Pre-train as `config` says (auto-resuming from `workdir`); returns (state, loss history)."""
  model_config = model_lib.model_config(config.model)  # validates before anything heavy
  total_steps, warmup_steps = schedule_steps(config)
  check_workdir(workdir)
  log.info("data: %s", data.check_data(config))  # clear errors before any compile
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  is_chief = jax.process_index() == 0

  built = build(config, mesh, total_steps, warmup_steps)
  graphdef = built.graphdef
  ckpt = checkpointing.Checkpointer(workdir, config)
  state, static, data_state, start_step = _restore_or_init(built, workdir, ckpt, restore_from)
  if start_step >= total_steps:
    log.info("%s already holds the final step %d; nothing to do", ckpt.directory, start_step)
    ckpt.close()
    return state, []

  batches = data.create_pretrain_iterator(config, start_step=start_step)
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
  log.info("mesh %s on %d devices, %d process(es); %.2fM trainable parameters; steps %d..%d "
           "(%d warm-up), global batch %d, peak lr %.3g",
           dict(mesh.shape), mesh.size, jax.process_count(),
           model_lib.count_params(built.abstract_state.params) / 1e6, start_step, total_steps,
           warmup_steps, config.batch_size, optim.scaled_lr(config.base_lr, config.batch_size))

  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, batch).compile()
  log.info("train step compiled in %.1fs", time.perf_counter() - start)
  _log_compiled(compiled, state)

  writer = summaries.SummaryWriter(os.path.join(workdir, "tensorboard"), enabled=is_chief)
  stop_after = config.stop_after_steps if config.stop_after_steps > 0 else None
  pending, history = [], []
  tick, tick_step = time.perf_counter(), start_step
  step = start_step
  while step < total_steps:
    if step > start_step:
      batch = sharding.global_batch(next(batches), mesh)
    state, metrics = compiled(state, static, batch)
    pending.append(metrics)
    step += 1
    stop = (ckpt.stop_requested(step, sync=step % config.log_every == 0)
            or (stop_after and step - start_step >= stop_after))
    if step % config.log_every == 0 or step == total_steps or stop:
      # One host sync per log interval, not per step.
      averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      now = time.perf_counter()
      img_per_s = (step - tick_step) * config.batch_size / (now - tick)
      eta = (total_steps - step) * config.batch_size / img_per_s
      log.info("step %d/%d  loss %.4f  lr %.3e  grad_norm %.3f  %.1f img/s  eta %s",
               step, total_steps, averaged["loss"], averaged["lr"], averaged["grad_norm"],
               img_per_s, _format_eta(eta))
      writer.scalars(step, {**averaged, "img_per_s": img_per_s})
      history.append((step, averaged["loss"]))
      pending, tick, tick_step = [], now, step
    if config.image_every > 0 and step % config.image_every == 0 and step < total_steps:
      _write_picture(config, graphdef, state, static, writer, step, None)
    if ckpt.should_save(step, total_steps) or stop:
      ckpt.save(step, state, {"data": batches.state(), "seed": config.seed})
    if stop:
      log.info("stopping at step %d (%s); rerun the same command to resume", step,
               "signal" if ckpt.preemption.requested else "stop_after_steps")
      break
  ckpt.close()
  log.info("checkpoint of step %d in %s", step, ckpt.directory)
  if step == total_steps:
    path = _write_picture(config, graphdef, state, static, writer, step,
                          os.path.join(workdir, "reconstructions.png"))
    log.info("wrote %s (original | masked | reconstruction | reconstruction + visible)", path)
  writer.close()
  return state, history


def _write_picture(config, graphdef, state, static, writer, step, path):
  """Reconstructions of the preview photos to TensorBoard (and `path` if given)."""
  model = nnx.merge(graphdef, sharding.to_host(state.params), sharding.to_host(static.rest))
  size = model.config.img_size
  picture = pictures.reconstruction_grid(
      model, data.preview_images(config.num_preview_images, size),
      key=jax.random.key(config.seed), scale=max(1, 224 // size))
  writer.image(step, "reconstructions", picture)
  if path and jax.process_index() == 0:
    pictures.save_png(picture, path)
  return path
