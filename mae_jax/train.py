"""Pre-training: state creation, the pure train step and the training loop."""

import functools
import logging
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import checkpointing, imaging, input_pipeline, optim, patches, summaries, visualize
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
  if warmup > total:
    raise ValueError(f"warm-up ({warmup} steps) is longer than training ({total} steps)")
  return total, warmup


def make_optimizer(config, total_steps, warmup_steps):
  """(optax transformation, lr schedule) of the paper recipe."""
  peak = optim.scaled_lr(config.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(peak, warmup_steps, total_steps, config.min_lr)
  tx = optim.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  return tx, schedule


def create_train_state(config, tx):
  """(graphdef, static, state) for a freshly initialised model."""
  model = model_lib.MAE(config.model, rngs=nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  mask_key = jax.random.fold_in(jax.random.key(config.seed), 0x3A5C)  # mask stream
  return graphdef, Static(rest=rest, mask_key=mask_key), state


def train_step(graphdef, tx, schedule, model_config, state, static, batch):
  """One AdamW step on `batch` = {images (B,H,W,C) normalised, index (B,) global ids}."""
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
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable: {e}") from e


def train_and_evaluate(config, workdir):
  """Pre-train as `config` says, logging to stdout and TensorBoard; returns the final state."""
  model_config = model_lib.model_config(config.model)  # validates before anything heavy
  total_steps, warmup_steps = schedule_steps(config)
  check_workdir(workdir)
  batches = input_pipeline.create_pretrain_iterator(config)
  batch = next(batches)
  images = batch["images"]
  if tuple(images.shape[1:]) != model_config.image_shape:
    raise ValueError(f"the input pipeline yields images of shape {images.shape[1:]} but "
                     f"config.model expects {model_config.image_shape}")

  tx, schedule = make_optimizer(config, total_steps, warmup_steps)
  graphdef, static, state = create_train_state(config, tx)
  log.info("model: %.2fM trainable parameters; %d steps (%d warm-up), batch %d, peak lr %.3g",
               model_lib.count_params(state.params) / 1e6, total_steps, warmup_steps,
               config.batch_size, optim.scaled_lr(config.base_lr, config.batch_size))

  step_fn = jax.jit(functools.partial(train_step, graphdef, tx, schedule, model_config), donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, static, batch).compile()
  log.info("train step compiled in %.1fs", time.perf_counter() - start)

  writer = summaries.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                   enabled=jax.process_index() == 0)
  pending, history = [], []
  tick, tick_step = time.perf_counter(), 0
  for step in range(total_steps):
    if step > 0:
      batch = next(batches)
    state, metrics = compiled(state, static, batch)
    pending.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == total_steps:
      # One host sync per log interval, not per step.
      averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      now = time.perf_counter()
      img_per_s = (done - tick_step) * config.batch_size / (now - tick)
      eta = (total_steps - done) * config.batch_size / img_per_s
      log.info("step %d/%d  loss %.4f  lr %.3e  grad_norm %.3f  %.1f img/s  eta %s",
                   done, total_steps, averaged["loss"], averaged["lr"], averaged["grad_norm"],
                   img_per_s, _format_eta(eta))
      writer.scalars(done, {**averaged, "img_per_s": img_per_s})
      history.append((done, averaged["loss"]))
      pending, tick, tick_step = [], now, done

  path = checkpointing.save(workdir, total_steps, state.params, state.opt_state,
                            {"data": batches.state()}, config)
  log.info("saved checkpoint %s", path)
  model = nnx.merge(graphdef, state.params, static.rest)
  picture = visualize.reconstruction_grid(
      model, input_pipeline.preview_images(config.num_preview_images, model_config.img_size),
      key=jax.random.key(config.seed), scale=max(1, 224 // model_config.img_size))
  picture_path = os.path.join(workdir, "reconstructions.png")
  visualize.save_png(picture, picture_path)
  writer.image(total_steps, "reconstructions", picture)
  writer.close()
  log.info("wrote %s (original | masked | reconstruction | reconstruction + visible)",
               picture_path)
  return state, history
