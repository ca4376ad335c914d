"""The train state the one loop carries, and how a model splits into it."""

import flax.struct
import jax
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State       # trainable nnx.Param values
  opt_state: optax.OptState
  model_state: nnx.State  # what training updates besides params (BatchNorm statistics)


@flax.struct.dataclass
class Static:
  """What the step needs besides the state; not donated, not checkpointed."""
  rest: nnx.State         # fixed sin-cos tables and rng state, rebuilt from the config
  key: jax.Array          # the run's stream: step keys are fold_in(key, step)
  attempt: jax.Array      # roll-backs so far (int32); each one re-seeds `key`


def split_model(task, model):
  """(graphdef, params, task.model_state variables, everything else) of `model`."""
  return nnx.split(model, nnx.Param, task.model_state, ...)
