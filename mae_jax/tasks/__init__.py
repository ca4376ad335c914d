"""What differs per task; the one loop in `mae_jax.train` calls these, they never call it.

`Task` lists every member the loop, `mae_jax.steps` and the evaluators use; `pretrain.TASK`
and `classify.TASK` implement it.
"""

from typing import Any, Callable, Iterator, Optional, Protocol

from mae_jax.tasks import classify, pretrain


class Task(Protocol):
  """One task (config.task). Methods take the run's whole config."""

  name: str
  # The nnx Variable type training updates besides params (BatchNorm statistics), carried in the
  # train state as `model_state`; everything else is rebuilt from the config.
  model_state: type
  # (model, global eval batch) -> dict of sums over valid examples, jitted by `steps.build`;
  # None for a task without a labelled eval step (pre-training: its probes extract features).
  eval_sums: Optional[Callable[[Any, dict], dict]]

  def check(self, config) -> str:
    """Validate the task's config and data before anything compiles; a one-line description
    of the data. Fills the epoch length from the dataset where the config leaves it to it."""

  def build_model(self, config, rngs) -> Any:
    """The NNX module (`nnx.Param`s train)."""

  def flops_per_image(self, config) -> Optional[float]:
    """Analytic training FLOPs per image (for MFU), or None where not counted."""

  def optimizer(self, config, total_steps, warmup_steps, abstract_params) -> tuple:
    """(optax transformation, lr schedule)."""

  def frozen(self, config, abstract_params) -> Optional[Any]:
    """Bool pytree over params: True where a param never trains; None when all train."""

  def loss(self, config, model, batch, key) -> tuple:
    """(scalar loss, dict of scalar metrics), inside the jitted step; `key` is the step's key
    (the same on every process, so draws do not depend on the layout)."""

  def train_batches(self, config, start_step) -> Iterator[dict]:
    """The resumable iterator of this process's batches (`state()` / `restore()`)."""

  def initial_weights(self, config, model, source) -> str:
    """Fill `model` from `config.init_from` (or `--restore` weights without optimizer state);
    a one-line report."""

  def evaluators(self, config) -> list:
    """Objects with `every_steps`, `name`, `run(context) -> [(name, value)]`
    (`mae_jax.evaluators.Context`: state, mesh, the jitted eval sums and features)."""

  def periodic(self, config, model, writer, step) -> None:
    """Mid-run outputs every `config.image_every` steps (a picture in TensorBoard)."""

  def finish(self, config, model, writer, workdir, step) -> Optional[str]:
    """End-of-run outputs (pictures); a one-line report or None."""


TASKS: dict[str, Task] = {"pretrain": pretrain.TASK, "classify": classify.TASK}


def get(config) -> Task:
  """The task object `config.task` names (default: pre-training)."""
  name = config.get("task", "pretrain")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]
