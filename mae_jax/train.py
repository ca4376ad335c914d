"""The one training loop: logs, evaluation, checkpoints, roll-back; and `evaluate`.

It knows no task: what differs between pre-training and classification (model, loss,
optimizer, data, evaluators, pictures) comes from `mae_jax.tasks`; the jitted, sharded steps
come from `mae_jax.steps`. Each process feeds its share of the global batch.
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from mae_jax import checkpointing, config_check, flops, initial_state, intervals, optim, sharding
from mae_jax import summaries, tasks
from mae_jax import steps as steps_lib
from mae_jax import evaluators as evaluators_lib
from mae_jax import guard as guard_lib
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
  built = steps_lib.build(config, mesh, 2, 1)
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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop needs besides the state it carries."""
  config: object
  workdir: str
  task: tasks.Task
  mesh: jax.sharding.Mesh
  built: steps_lib.Built
  total_steps: int
  warmup_steps: int


def _prepare(config, workdir, restore_from, allow_config_change):
  """Every check, then the built steps and the restored (or fresh) state:
  (run, state, static, data-iterator state or None, first step)."""
  config_check.check(config, restore=restore_from)  # every field, before any write or compile
  task = tasks.get(config)
  log.info("data: %s", task.check(config))  # clear errors before any compile
  total_steps, warmup_steps = schedule_steps(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  built = steps_lib.build(config, mesh, total_steps, warmup_steps)
  state, static, data_state, start_step = initial_state.restore_or_init(
      built, config, workdir, restore_from, allow_config_change)
  run = _Run(config, workdir, task, mesh, built, total_steps, warmup_steps)
  return run, state, static, data_state, start_step


def _open_data(run, start_step, data_state):
  """This process's batch iterator from `start_step` and the first global batch, checked."""
  config = run.config
  batches = run.task.train_batches(config, start_step)
  if data_state is not None:
    batches.restore(data_state)
  local = next(batches)
  # Every process says which examples it feeds: the quickest check of a multi-host launch.
  print(f"process {jax.process_index()}/{jax.process_count()} feeds {len(local['index'])} of "
        f"{config.batch_size} examples per step, first global ids "
        f"{np.asarray(local['index'][:4]).tolist()}", flush=True)
  batch = sharding.global_batch(local, run.mesh)
  image_shape = model_lib.model_config(config.model).image_shape
  if tuple(batch["images"].shape[1:]) != image_shape:
    raise ValueError(f"the input pipeline yields images of shape {batch['images'].shape[1:]} "
                     f"but config.model expects {image_shape}")
  return batches, batch


def _compile(run, state, static, batch, start_step):
  """Log what runs, compile the step (its memory logged before step 1); (compiled, Interval)."""
  config, built, mesh = run.config, run.built, run.mesh
  sizes = [x.size for x in jax.tree.leaves(built.abstract_state.params)]
  frozen = jax.tree.leaves(built.frozen) if built.frozen is not None else [False] * len(sizes)
  log.info("%s: mesh %s on %d devices, %d process(es); %.2fM parameters (%.2fM trainable); "
           "steps %d..%d (%d warm-up), global batch %d, peak lr %.3g, %s compute",
           run.task.name, dict(mesh.shape), mesh.size, jax.process_count(), sum(sizes) / 1e6,
           sum(n for n, f in zip(sizes, frozen) if not f) / 1e6, start_step, run.total_steps,
           run.warmup_steps, config.batch_size,
           optim.scaled_lr(config.base_lr, config.batch_size),
           model_lib.model_config(config.model).dtype)
  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, batch).compile()
  log.info("train step compiled in %.1fs", time.perf_counter() - start)
  _log_compiled(compiled, state)
  meter = flops.Meter(run.task.flops_per_image(config), config.batch_size, jax.devices(),
                      config.get("peak_tflops", 0) or None)
  return compiled, intervals.Interval(meter, start_step)


def _log_interval(interval, writer, history, step, total_steps):
  """Log and record the averages since the last log line; returns the interval's flags."""
  averaged, speed, flags = interval.close(step, total_steps)
  log.info("step %d/%d  loss %.4f  lr %.3e  grad_norm %.3f  %s", step, total_steps,
           averaged["loss"], averaged["lr"], averaged["grad_norm"],
           intervals.Interval.describe(speed))
  writer.scalars(step, {**averaged, **{k: v for k, v in speed.items() if k != "eta_s"}})
  writer.flush()
  history.append((step, averaged["loss"]))
  return flags


def _roll_back(run, ckpt, guard, batches, step):
  """Past nan_patience: newer checkpoints set aside, the last good one restored and its data
  position, a re-seeded stream; (state, static, good step). Raises when none is left to try."""
  good_step, give_up = guard.rollback_target(ckpt.good_steps(), step, ckpt.directory,
                                             "lower config.base_lr or use float32")
  moved = ckpt.set_aside_after(good_step) if good_step is not None else []
  if moved:
    log.info("moved the suspect checkpoint(s) %s to %s", moved,
             os.path.join(run.workdir, checkpointing.SUSPECT_DIR))
  if give_up:  # a rerun (lower lr, --allow_config_change) resumes from the good step
    raise give_up
  state, data_state = initial_state.restore_step(run.built, run.workdir, good_step)
  batches.restore(data_state)
  return state, run.built.init_static(guard.rollbacks), good_step


def _periodic(run, evaluators, interval, writer, state, static, step):
  """The evaluators and pictures due at `step` (before the last); eval time is not counted
  as training time."""
  due = [ev for ev in evaluators if ev.every_steps > 0 and step % ev.every_steps == 0]
  if due:
    started = time.perf_counter()
    _log_evals(run_evaluators(run.built, due, state, static, run.mesh), writer, step)
    interval.exclude(time.perf_counter() - started)
  every = run.config.get("image_every", -1)
  if every > 0 and step % every == 0:
    run.task.periodic(run.config, _host_model(run.built, state, static), writer, step)


def _save(run, ckpt, batches, interval, guard, state, step):
  """Checkpoint `step` with every process's own data position (shards may be uneven)."""
  positions = sharding.allgather_json(batches.state())
  ckpt.save(step, state, {"data": positions[0], "data_per_process": positions,
                          "seed": run.config.seed, "rollbacks": guard.rollbacks,
                          "good": guard.streak_after(interval.pending_flags()) == 0})


def _finish(run, writer, state, static, step):
  """The task's end-of-run outputs (pictures). A run killed after its final checkpoint but
  before these writes them when rerun."""
  report = run.task.finish(run.config, _host_model(run.built, state, static), writer,
                           run.workdir, step)
  if report:
    log.info("%s", report)


def train_and_evaluate(config, workdir, restore_from=None, allow_config_change=False):
  """Train as `config` says (auto-resuming from `workdir`); returns (state, loss history).

  Resuming with a config that defines another run (batch, seed, model, data, schedule) is an
  error unless `allow_config_change`.
  """
  run, state, static, data_state, step = _prepare(config, workdir, restore_from,
                                                  allow_config_change)
  start_step, total = step, run.total_steps
  ckpt = checkpointing.Checkpointer(workdir, config)
  writer = summaries.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                   enabled=jax.process_index() == 0)
  evaluators, history = run.task.evaluators(config), []
  guard = guard_lib.Guard(config, rollbacks=int(jax.device_get(static.attempt)))
  stop_after = config.stop_after_steps if config.stop_after_steps > 0 else None
  if step < total:
    batches, batch = _open_data(run, step, data_state)
    compiled, interval = _compile(run, state, static, batch, step)
  else:
    log.info("%s already holds the final step %d; nothing to train", ckpt.directory, step)
  try:
    while step < total:
      if batch is None:
        batch = sharding.global_batch(next(batches), run.mesh)
      state, metrics = compiled(state, static, batch)
      batch = None
      interval.add(metrics)
      step += 1
      stop = (ckpt.stop_requested(step, sync=step % config.log_every == 0)
              or (stop_after and step - start_step >= stop_after))
      if step % config.log_every == 0 or step == total or stop:
        flags = _log_interval(interval, writer, history, step, total)
        if guard.count(flags, step):  # past nan_patience: back to the last good checkpoint
          state, static, step = _roll_back(run, ckpt, guard, batches, step)
          history = [h for h in history if h[0] <= step]
          interval.restart(step)
          continue
      if step < total:
        _periodic(run, evaluators, interval, writer, state, static, step)
      if ckpt.should_save(step, total) or stop:
        _save(run, ckpt, batches, interval, guard, state, step)
      if stop:
        log.info("stopping at step %d (%s); rerun the same command to resume", step,
                 "signal" if ckpt.preemption.requested else "stop_after_steps")
        break
    if step == total:  # the final evaluation overlaps the final (async) save
      _log_evals(run_evaluators(run.built, evaluators, state, static, run.mesh), writer, step)
  finally:
    ckpt.close()
    writer.flush()
  log.info("checkpoint of step %d in %s", step, ckpt.directory)
  if step == total:
    _finish(run, writer, state, static, step)
  writer.close()
  return state, history
