"""Orbax checkpoints: async saves, keep-last-K + milestones, auto-resume, preemption.

Layout of `<workdir>/checkpoints/<step>/`: `params/` and `opt_state/` (Orbax
pytrees), `meta/` (JSON: step, data iterator position, seed), `config/`
(JSON: the full training config, so `mae_jax.load` needs no config files) and
any extra array items a caller adds (e.g. `extras/`: converted weights the MAE
has no place for).
Orbax writes each step into a temporary directory and renames it when complete,
so a save cut short (kill -9, preemption) is never mistaken for a checkpoint.
A complete step can still be damaged later (a disk or copy error):
`restore_latest_readable` moves such a step to `<workdir>/checkpoints_unreadable/`
and resumes from the newest one that reads.
Paths may be local or `gs://...` (tensorstore).
"""

import dataclasses
import logging
import os
import signal
import threading
from typing import Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
SUSPECT_DIR = "checkpoints_suspect"  # steps after the last good one, set aside by a roll-back

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A readable checkpoint saved for another model (shapes differ): not corruption."""


def checkpoint_root(workdir):
  """`<workdir>/checkpoints`, absolute for local paths."""
  workdir = os.fspath(workdir)
  if "://" in workdir:
    return workdir.rstrip("/") + "/" + CHECKPOINT_DIR
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


@dataclasses.dataclass
class KeepPolicy:
  """Which steps survive garbage collection: the last `keep`, every step divisible by
  `period` (milestones), and the newest step `is_good` says was saved while the loss was
  finite, so a roll-back always has a target however many suspect steps came after it."""
  keep: int
  period: int | None
  is_good: Callable[[int], bool]

  def should_preserve(self, checkpoints, *, context):
    del context
    n = len(checkpoints)
    kept = [i >= n - self.keep or bool(self.period and info.step % self.period == 0)
            for i, info in enumerate(checkpoints)]
    good = [i for i, info in enumerate(checkpoints) if self.is_good(info.step)]
    if good:
      kept[good[-1]] = True
    return kept


def manager(workdir, *, max_to_keep=3, keep_period=None, async_save=False, create=True,
            writer=False, policy=None):
  """A CheckpointManager over `workdir`/checkpoints.

  Only the training run (`writer=True`) deletes leftovers of interrupted saves;
  readers must never touch a save another process has in flight. `policy` (a
  `KeepPolicy`) replaces max_to_keep / keep_period.
  """
  keep = dict(max_to_keep=max_to_keep, keep_period=keep_period) if policy is None else dict(
      preservation_policy=policy)
  return ocp.CheckpointManager(
      checkpoint_root(workdir),
      options=ocp.CheckpointManagerOptions(
          create=create, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=writer, **keep))


def _save_args(params, opt_state, meta, config, extra_items=None):
  items = dict(params=ocp.args.StandardSave(params),
               meta=ocp.args.JsonSave(meta),
               config=ocp.args.JsonSave(config.to_dict()))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  for name, tree in (extra_items or {}).items():
    if name in items:
      raise ValueError(f"extra checkpoint item {name!r} clashes with a standard item")
    items[name] = ocp.args.StandardSave(tree)
  return ocp.args.Composite(**items)


def save(workdir, step, params, opt_state, meta, config, **extra_items):
  """Save one step and block until its commit is complete; returns the step directory.

  `opt_state` may be None (e.g. weights converted from PyTorch): then only the
  params can be restored, which is all `mae_jax.load` needs. Each of
  `extra_items` (a pytree of arrays) becomes an item of its own in the step
  directory; `restore_arrays` reads it back.
  """
  mgr = manager(workdir)
  mgr.save(step, args=_save_args(params, opt_state, dict(meta, step=int(step)), config,
                                 extra_items), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return os.path.join(checkpoint_root(workdir), str(step))


def latest_step(workdir):
  """The newest complete step in `workdir`, or None."""
  return manager(workdir, create=False).latest_step()


def has_item(workdir, step, name):
  """True when step `step` of `workdir` holds the item `name` (e.g. opt_state)."""
  path = os.path.join(checkpoint_root(workdir), str(step), name)
  if "://" in path:
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(path).exists()
  return os.path.isdir(path)


def _existing_step(mgr, workdir, step):
  steps = mgr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint under {mgr.directory} (workdir={workdir})")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {mgr.directory}; have {steps}")
  return step


def resolve_checkpoint(path_or_workdir, step=None):
  """(workdir, step) from a workdir, its checkpoints/ folder or one step's folder."""
  path = os.path.abspath(os.fspath(path_or_workdir))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return path, step
  parent, name = os.path.split(path)
  if os.path.basename(parent) == CHECKPOINT_DIR and name.isdigit():
    return os.path.dirname(parent), int(name) if step is None else step
  if os.path.basename(path) == CHECKPOINT_DIR:
    return parent, step
  raise FileNotFoundError(f"{path} is neither a workdir (with {CHECKPOINT_DIR}/) "
                          f"nor a checkpoint step directory")


def _shape_tree(tree):
  """{'a/b/c': shape} for every array-like leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                   for k in path)
    key = key.replace("/value", "")  # nnx Variable nodes add a `value` level
    if hasattr(leaf, "shape"):
      out[key] = tuple(leaf.shape)
  return out


def check_compatible(mgr, step, name, abstract):
  """Clear error naming the first parameter whose saved shape differs from the model's."""
  metadata = ocp.StandardCheckpointHandler().metadata(mgr.directory / str(step) / name)
  saved = _shape_tree(getattr(metadata, "item_metadata", metadata))
  wanted = _shape_tree(abstract)
  for key in sorted(set(saved) | set(wanted)):
    if saved.get(key) != wanted.get(key):
      raise CheckpointMismatchError(
          f"checkpoint {mgr.directory}/{step} does not match this model: {name} {key!r} has "
          f"shape {saved.get(key, 'missing')} in the checkpoint but {wanted.get(key, 'missing')} "
          "in the model (another model size or config?)")


def restore(workdir, step=None, **abstract_items):
  """Restore the JSON items and the pytree items named in `abstract_items`.

  Each abstract item is a tree of arrays or ShapeDtypeStructs; those carrying a
  `sharding` are restored straight onto it (any mesh, any device count).
  Returns (dict with 'config' (a ConfigDict), 'meta' and each requested item, step).
  """
  mgr = manager(workdir, create=False)
  try:
    step = _existing_step(mgr, workdir, step)
    args = {"config": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    for name, abstract in abstract_items.items():
      check_compatible(mgr, step, name, abstract)
      args[name] = ocp.args.StandardRestore(
          jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract))
    out = dict(mgr.restore(step, args=ocp.args.Composite(**args)))
  finally:
    mgr.close()
  out["config"] = ml_collections.ConfigDict(out["config"])
  return out, step


def _reason(error):
  """`Type: first line of the message`, without tensorstore's long spec dump."""
  lines = str(error).strip().splitlines()
  first = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
  if len(first) > 300:  # tensorstore puts the cause at the end of a long chain
    first = first[:120] + " ... " + first[-170:]
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def move_aside(workdir, step, folder=UNREADABLE_DIR):
  """Move step `step` to `<workdir>/<folder>/<step>[.N]`; returns the new path."""
  source = epath.Path(checkpoint_root(workdir)) / str(step)
  aside = epath.Path(os.path.dirname(checkpoint_root(workdir))) / folder
  aside.mkdir(parents=True, exist_ok=True)
  target, n = aside / str(step), 0
  while target.exists():  # an earlier run already put a step of this number aside
    n += 1
    target = aside / f"{step}.{n}"
  source.rename(target)
  return target


def _any_process(flag):
  """True on every process when `flag` is True on any (a no-op with one process)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def restore_latest_readable(workdir, **abstract_items):
  """Like `restore(workdir, **abstract_items)` from the newest step that can be read.

  A step that fails to read (truncated or corrupt array file, broken or missing
  meta / config JSON, a missing item) is logged in one warning line, moved to
  `<workdir>/checkpoints_unreadable/<step>` by process 0 and the next older step
  is tried. A shape mismatch with the model (`CheckpointMismatchError`) is not
  corruption and propagates. Returns (items, step), or (None, None) when no step
  is readable. Call it before training starts: a directory moved while a save is
  in flight would break that save.
  """
  mgr = manager(workdir, create=False)
  steps = sorted(mgr.all_steps(), reverse=True)
  mgr.close()
  for step in steps:
    error = None
    try:
      result = restore(workdir, step, **abstract_items)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any read failure = unreadable
      error = e
    # All processes must agree on the step: one that read only its own intact shards
    # must not resume while another gives up on this step.
    if not _any_process(error is not None):
      return result
    path = f"{checkpoint_root(workdir)}/{step}"
    reason = _reason(error) if error is not None else "unreadable on another process"
    if jax.process_index() == 0:
      target = move_aside(workdir, step)
      log.warning("checkpoint %s is unreadable (%s); moved it to %s, trying the previous step",
                  path, reason, target)
    else:
      log.warning("checkpoint %s is unreadable (%s); trying the previous step", path, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mae_jax unreadable checkpoint {step}")
  return None, None


def restore_arrays(workdir, step, name):
  """The pytree item `name` of a step as numpy arrays in their saved dtypes; None if absent."""
  mgr = manager(workdir, create=False)
  step = _existing_step(mgr, workdir, step)
  path = mgr.directory / str(step) / name
  if not path.exists():
    mgr.close()
    return None
  metadata = ocp.StandardCheckpointHandler().metadata(path)
  tree = getattr(metadata, "tree", metadata)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  out = mgr.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(target)}))
  mgr.close()
  return out[name]


class Preemption:
  """Turns SIGTERM / SIGUSR1 into a request to checkpoint and stop at a step boundary.

  One process: our handler catches both. Several processes: JAX's preemption
  service owns SIGTERM (Cloud TPU maintenance) and makes all processes agree on
  the step (`reached_preemption`); SIGUSR1 (SLURM `--signal=B:USR1@120`, which
  launch/gpu_slurm.sbatch forwards to every task) is agreed on by an all-gather
  at the log interval.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    signals = (signal.SIGUSR1,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGUSR1)
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    log.info("received signal %d: will checkpoint and stop at the next step boundary", signum)
    self.requested = True

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Checkpointer:
  """Periodic async saves of the training state in `workdir`, keeping the last K + milestones."""

  def __init__(self, workdir, config):
    ck = config.checkpoint
    self.workdir, self.every, self.config = workdir, ck.every_steps, config
    self._good = {}  # step -> saved while the loss was finite (meta "good")
    policy = KeepPolicy(ck.keep, ck.keep_period if ck.keep_period > 0 else None, self.is_good)
    self.mgr = manager(workdir, async_save=ck.async_save, writer=True, policy=policy)
    self.preemption = Preemption()

  def is_good(self, step):
    """Whether `step` was saved while the loss was finite (steps of older runs: from meta)."""
    if step not in self._good:
      try:
        meta = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        self._good[step] = bool(meta["meta"].get("good", True))
      except Exception:  # pylint: disable=broad-except  # unreadable: no roll-back target
        self._good[step] = False
    return self._good[step]

  def good_steps(self):
    """Steps on disk saved while the loss was finite, oldest first."""
    return [step for step in self.mgr.all_steps() if self.is_good(step)]

  def set_aside_after(self, step):
    """Move every step newer than `step` to `<workdir>/checkpoints_suspect/`; returns them."""
    self.mgr.wait_until_finished()
    newer = [s for s in self.mgr.all_steps() if s > step]
    if newer and jax.process_index() == 0:
      for s in newer:
        move_aside(self.workdir, s, SUSPECT_DIR)
    if newer and jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mae_jax set aside after {step}")
    for s in newer:
      self._good.pop(s, None)
    self.mgr.reload()
    return newer

  @property
  def directory(self):
    return str(self.mgr.directory)

  def latest_step(self):
    """The newest complete step as this manager last listed it."""
    return self.mgr.latest_step()

  def reload(self):
    """Re-list the steps on disk (after `restore_latest_readable` moved some aside)."""
    self.mgr.reload()

  def should_save(self, step, last_step):
    return step == last_step or (self.every > 0 and step % self.every == 0)

  def stop_requested(self, step, sync=False):
    """True when this run must checkpoint now and exit (all processes agree on the step).

    `sync`: also all-gather the signal flags (a host sync; call it at log intervals).
    """
    if jax.process_count() == 1:
      return self.preemption.requested
    if self.mgr.reached_preemption(step):
      return True
    if sync:
      flags = multihost_utils.process_allgather(np.int32(self.preemption.requested))
      return bool(np.any(flags))
    return False

  def save(self, step, state, meta):
    """Start an async save of `state` (TrainState) at `step`; returns at once.

    Non-parameter model state (BatchNorm statistics), when the model has any, is the
    item `model_state`.
    """
    extra = {"model_state": state.model_state} if jax.tree.leaves(state.model_state) else {}
    self._good[int(step)] = bool(meta.get("good", True))
    self.mgr.save(step, args=_save_args(state.params, state.opt_state,
                                        dict(meta, step=int(step)), self.config, extra),
                  force=True)

  def close(self):
    self.mgr.wait_until_finished()
    self.mgr.close()
    self.preemption.restore_handlers()
