"""Orbax checkpoints: params, optimizer state, metadata and the config, one directory per step.

Layout of `<workdir>/checkpoints/<step>/`: `params/` and `opt_state/` (Orbax
pytrees), `meta/` (JSON: step, data iterator position) and `config/` (JSON: the
full training config, so `mae_jax.load` needs no config files).
"""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_root(workdir):
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def manager(workdir, max_to_keep=3):
  """A CheckpointManager over `workdir`/checkpoints."""
  return ocp.CheckpointManager(
      checkpoint_root(workdir),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(workdir, step, params, opt_state, meta, config):
  """Save one step and block until its commit is complete; returns the step directory.

  `opt_state` may be None (e.g. weights converted from PyTorch): then only the
  params can be restored, which is all `mae_jax.load` needs.
  """
  mgr = manager(workdir)
  items = dict(params=ocp.args.StandardSave(params),
               meta=ocp.args.JsonSave(dict(meta, step=int(step))),
               config=ocp.args.JsonSave(config.to_dict()))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  mgr.save(step, args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return os.path.join(checkpoint_root(workdir), str(step))


def latest_step(workdir):
  """The newest complete step in `workdir`, or None."""
  return manager(workdir).latest_step()


def _existing_step(mgr, workdir, step):
  steps = mgr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint under {mgr.directory} (workdir={workdir})")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {mgr.directory}; have {steps}")
  return step


def restore(workdir, step=None, **abstract_items):
  """Restore the JSON items and the pytree items named in `abstract_items` (shapes to fill).

  Returns (dict with 'config' (a ConfigDict), 'meta' and each requested item, step).
  """
  mgr = manager(workdir)
  step = _existing_step(mgr, workdir, step)
  args = {"config": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
  for name, abstract in abstract_items.items():
    args[name] = ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract))
  out = dict(mgr.restore(step, args=ocp.args.Composite(**args)))
  out["config"] = ml_collections.ConfigDict(out["config"])
  return out, step
