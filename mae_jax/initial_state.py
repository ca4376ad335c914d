"""Where a run's state comes from: its own latest readable checkpoint (resume), another
run's checkpoint (`--restore`), weights of any source (`--restore` of a converted workdir or
a PyTorch file, `config.init_from`), or a fresh initialisation.

All of it runs before the run's Checkpointer exists, so a bad source leaves the workdir as
it was.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax import checkpointing, sharding
from mae_jax import state as state_lib
from mae_jax.weights import hf
from mae_jax.weights import workdir as workdir_lib

log = logging.getLogger(__name__)


def _wanted_items(built, workdir=None, step=None):
  """Abstract items to restore, on their target shardings; for a given step only those it has."""
  target = sharding.abstract_with_shardings(built.abstract_state, built.state_sh)
  wanted = dict(params=target.params)
  for name in ("opt_state", "model_state"):
    if jax.tree.leaves(getattr(target, name)) and (
        workdir is None or checkpointing.has_item(workdir, step, name)):
      wanted[name] = getattr(target, name)
  return wanted


def _data_position(meta):
  """This process's saved data-iterator position (older checkpoints: process 0's for all)."""
  positions = meta.get("data_per_process")
  if positions and len(positions) == jax.process_count():
    return positions[jax.process_index()]
  if positions:
    log.warning("the checkpoint holds the data positions of %d processes, this run has %d: "
                "process 0's position is used, other processes re-read their share from it",
                len(positions), jax.process_count())
  return meta.get("data")


def _state_from(built, restored, step, source, say_fresh=True):
  """A TrainState from restored items; without optimizer state a fresh optimizer starts."""
  params = restored["params"]
  if "opt_state" not in restored and say_fresh:
    log.info("%s (step %d) has no optimizer state: a fresh optimizer starts from its weights",
             source, step)
  opt_state = restored["opt_state"] if "opt_state" in restored else built.init_opt(params)
  model_state = (restored["model_state"] if "model_state" in restored
                 else built.init_model_state())
  return state_lib.TrainState(step=jax.device_put(jnp.int32(step), built.state_sh.step),
                              params=params, opt_state=opt_state, model_state=model_state)


def restore_items(built, source, with_optimizer=True):
  """(state, data position, step) from one of our checkpoints (another run's, `--restore`).

  `with_optimizer=False` (init_from: a new run) takes the weights and starts a fresh
  optimizer.
  """
  workdir, step = checkpointing.resolve_checkpoint(*source)
  step = checkpointing.latest_step(workdir) if step is None else step
  state, data_position = restore_step(built, workdir, step, with_optimizer=with_optimizer)
  return state, data_position, step


def restore_step(built, workdir, step, with_optimizer=True):
  """(state, this process's data position) from step `step` of `workdir`."""
  wanted = _wanted_items(built, workdir, step)
  if not with_optimizer:
    wanted.pop("opt_state", None)
  restored, _ = checkpointing.restore(workdir, step, **wanted)
  state = _state_from(built, restored, step, workdir, say_fresh=with_optimizer)
  return state, _data_position(restored["meta"])


def from_weights(built, config, source, whole_classifier=False):
  """A fresh state whose params come from `source` via the task (any weights file)."""
  task = built.task
  model = task.build_model(config, nnx.Rngs(config.seed))
  kwargs = dict(whole_classifier=True) if whole_classifier else {}
  log.info("%s", task.initial_weights(config, model, source, **kwargs))
  _, params, model_state, _ = state_lib.split_model(task, model)
  params = jax.device_put(params, built.state_sh.params)
  state = state_lib.TrainState(step=jax.device_put(jnp.int32(0), built.state_sh.step),
                               params=params, opt_state=built.init_opt(params),
                               model_state=jax.device_put(model_state,
                                                          built.state_sh.model_state))
  return state


# Config fields (dotted prefixes) whose change alters the run a checkpoint belongs to.
RUN_DEFINING = ("task", "model", "classifier", "finetune", "batch_size", "seed", "epochs",
                "warmup_epochs", "total_steps", "warmup_steps", "base_lr", "min_lr",
                "weight_decay", "b1", "b2", "init_from", "data.dataset", "data.folder",
                "data.arrays", "data.labels", "data.file_format",
                "data.split", "data.num_train_examples", "data.crop", "data.crop_scale",
                "data.crop_ratio", "data.hflip", "data.color_jitter", "data.rand_augment",
                "data.random_erasing")


def _flat(tree):
  """Dotted keys; values as the checkpoint's JSON holds them (tuples become lists)."""
  return workdir_lib.flatten(json.loads(json.dumps(tree)), leaf=lambda v: v)


def check_config_change(saved, config, allow=False):
  """Refuse to resume with a config that defines another run; log the harmless changes.

  Returns the changed fields as 'field: old -> new' strings.
  """
  old, new = _flat(saved.to_dict()), _flat(config.to_dict())
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  lines = [f"{k}: {old.get(k, '<absent>')} -> {new.get(k, '<absent>')}" for k in changed]
  defining = [line for k, line in zip(changed, lines) if k.startswith(RUN_DEFINING)]
  if defining and not allow:
    raise ValueError("the config differs from the one this workdir was trained with: "
                     + "; ".join(defining) + " (pass --allow_config_change to resume anyway, "
                     "or use another --workdir)")
  if lines:
    log.info("config changes since the checkpoint: %s", "; ".join(lines))
  return lines


def restore_or_init(built, config, workdir, restore_from=None, allow_config_change=False):
  """(state, static, data position, start step): resume, restore, init_from, or initialise.

  Runs before the workdir's Checkpointer exists, so a bad source leaves the workdir as it was.
  """
  init_from = config.get("init_from", "")
  # Resume this run; an unreadable newest step is moved aside and the previous one used.
  restored, step = checkpointing.restore_latest_readable(workdir, **_wanted_items(built))
  if restored is not None:
    check_config_change(restored["config"], config, allow_config_change)
    log.info("resuming from %s/%d", checkpointing.checkpoint_root(workdir), step)
    state = _state_from(built, restored, step, workdir)
    rollbacks = restored["meta"].get("rollbacks", 0)  # the masks of the last roll-back
    return state, built.init_static(rollbacks), _data_position(restored["meta"]), step
  source = restore_from or init_from
  if not source:
    state, static = built.init_fn()
    return state, static, None, 0
  if _is_checkpoint_dir(source) and same_task(config, source):
    if restore_from:
      state, data_state, step = restore_items(built, (source, None))
      log.info("restored %s (step %d)", source, step)
      return state, built.init_static(), data_state, step
    try:  # init_from: its weights, a fresh optimizer and step 0
      state, _, step = restore_items(built, (source, None), with_optimizer=False)
      log.info("initialised from the weights of %s (step %d); a fresh optimizer starts at "
               "step 0", source, step)
      return _at_step_0(built, state), built.init_static(), None, 0
    except checkpointing.CheckpointMismatchError as e:  # another head (probe -> fine-tune)
      log.info("%s has another model layout (%s): taking its encoder only", source,
               str(e).split(": ", 1)[-1])
  return from_weights(built, config, source), built.init_static(), None, 0


def _at_step_0(built, state):
  return state.replace(step=jax.device_put(jnp.int32(0), built.state_sh.step))


def _is_checkpoint_dir(source):
  """A folder that is not an HF model directory must be one of our checkpoints."""
  return workdir_lib.is_our_checkpoint(source) or (
      os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, name))
                                        for name in hf.HF_WEIGHTS))


def same_task(config, source):
  saved, _ = checkpointing.restore(*checkpointing.resolve_checkpoint(source))
  return saved["config"].get("task", "pretrain") == config.get("task", "pretrain")
