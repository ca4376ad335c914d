"""Orbax checkpoints of the train state, with the config stored beside each step."""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(workdir, max_to_keep=3):
  """A CheckpointManager over `workdir`/checkpoints."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(workdir, step, state, config):
  """Save `state` (a pytree) and `config` at `step`; blocks until the commit is complete."""
  mgr = manager(workdir)
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict())), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return os.path.join(mgr.directory, str(step))


def latest_step(workdir):
  """The newest complete step in `workdir`, or None."""
  return manager(workdir).latest_step()


def restore_config(workdir, step=None):
  """The config saved with a checkpoint (no config files needed)."""
  mgr = manager(workdir)
  step = _existing_step(mgr, workdir, step)
  data = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return ml_collections.ConfigDict(data), step


def restore_state(workdir, abstract_state, step=None):
  """Restore the state saved at `step` (latest if None) into the shapes of `abstract_state`."""
  mgr = manager(workdir)
  step = _existing_step(mgr, workdir, step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
      "state"]


def _existing_step(mgr, workdir, step):
  steps = mgr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint under {mgr.directory} (workdir={workdir})")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {mgr.directory}; have {steps}")
  return step
