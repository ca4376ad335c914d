"""What differs per task; the one loop in `mae_jax.train` calls these, they never call it.

A task is an object with:
- `check(config)`: validate the task's config and data before anything compiles; returns a
  one-line description of the data.
- `build_model(config, rngs)`: the NNX module (`nnx.Param`s train; `nnx.BatchStat`s are
  carried in the train state as `model_state`; everything else is rebuilt from the config).
- `optimizer(config, total_steps, warmup_steps, abstract_params)`: (optax tx, lr schedule).
- `loss(config, model, batch, key)`: (scalar loss, dict of scalar metrics), inside the jitted step;
  `key` is this step's key (same on every process, so draws do not depend on the layout).
- `train_batches(config, start_step)`: the resumable iterator (`state()` / `restore()`).
- `initial_weights(config, model, source)`: fill `model` from `config.init_from` (or from
  `--restore` weights without optimizer state); returns a one-line report.
- `evaluators(config)`: objects with `every_steps`, `name`, `run(context) -> [(name, value)]`
  (`mae_jax.evaluators.Context`: state, mesh, the jitted eval sums and feature function).
- `finish(config, model, writer, workdir, step)`: end-of-run outputs (pictures).
"""

from mae_jax.tasks import classify, pretrain

TASKS = {"pretrain": pretrain.TASK, "classify": classify.TASK}


def get(config):
  """The task object `config.task` names (default: pre-training)."""
  name = config.get("task", "pretrain")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]
