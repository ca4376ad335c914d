"""What an evaluator's `run(context)` gets from the loop: the built step functions (with the
jitted, sharded encoder features), the state and the mesh."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import imaging, sharding

POOLS = ("cls", "mean")


def pool_tokens(tokens, pool):
  """(B, 1+L, D) encoder output -> (B, D): the cls token or the mean of the patch tokens."""
  if pool == "cls":
    return tokens[:, 0]
  if pool == "mean":
    return tokens[:, 1:].mean(axis=1)
  raise ValueError(f"--pool={pool!r}; expected one of {POOLS}")


def encoder_features(model, images, pool):
  """(B, D) frozen features, no masking, inference mode: the MAE encoder's cls token or mean
  of its patch tokens after the final norm; a classifier's own pooled features."""
  if hasattr(model, "encode"):
    return pool_tokens(model.encode(images), pool)
  return model.features(images)


def features_step(graphdef, pool, params, model_state, static, batch):
  """Features, labels, valid and index of one global batch (jitted by `steps.build`)."""
  model = nnx.merge(graphdef, params, model_state, static.rest)
  images = batch["images"]
  if images.dtype == np.uint8:
    images = imaging.normalize(images)
  feats = encoder_features(model, images, pool).astype(jnp.float32)
  return {"features": feats, "label": batch["label"], "valid": batch["valid"],
          "index": batch["index"]}


class Context:
  """One evaluation of the current state; `memo` shares features between evaluators."""

  def __init__(self, built, state, static, mesh):
    self.built, self.state, self.static, self.mesh = built, state, static, mesh
    self.memo = {}

  def evaluate_batch(self, local_batch):
    """The task's eval sums (`built.eval_fn`) of this process's share of a global batch."""
    return self.built.eval_fn(self.state, self.static,
                              sharding.global_batch(local_batch, self.mesh))

  def features(self, local_batch, pool):
    """numpy `features` (B, D), `label`, `valid`, `index` of the whole global batch, on
    every process."""
    out = self.built.feature_fn(pool)(self.state.params, self.state.model_state, self.static,
             sharding.global_batch(local_batch, self.mesh))
    return {k: np.asarray(v) for k, v in sharding.to_host(out).items()}
