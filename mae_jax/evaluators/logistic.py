"""Fast linear probe on frozen features: multinomial logistic regression, full batch, L-BFGS.

The quick counterpart of the official linear probe (BatchNorm + linear head trained with LARS
for 90 epochs, `configs/linprobe_*.py`): features are extracted once (`probe_sets`), then
standardised with the train set's mean / std and a softmax classifier is fitted to them
with the whole train set in every step, minimising mean cross-entropy + l2_reg / 2 |W|^2 (the
bias unpenalised) with optax's L-BFGS, in JAX on the host's device. Seconds for 60k x 768.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

STD_EPS = 1e-5


def objective(params, x, labels, l2_reg):
  """Mean softmax cross-entropy of `x` @ w + b, plus l2_reg / 2 |w|^2."""
  w, b = params
  logits = x @ w + b
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce + 0.5 * l2_reg * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, labels, l2_reg, *, num_classes, steps):
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))
  fun = functools.partial(objective, x=x, labels=labels, l2_reg=l2_reg)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))
  return params, fun(params)


def fit(x, labels, num_classes, l2_reg, steps=300):
  """(mean, std, (w, b), final objective): the probe fitted to train features `x` (N, D)."""
  x = np.asarray(x, np.float32)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + STD_EPS
  params, value = _fit(jnp.asarray((x - mean) / std), jnp.asarray(labels, jnp.int32),
                       jnp.float32(l2_reg), num_classes=num_classes, steps=steps)
  return mean, std, jax.device_get(params), float(value)


def predict(probe, x):
  """(N,) class ids of features `x` under `fit`'s probe."""
  mean, std, (w, b), _ = probe
  return np.argmax(((np.asarray(x, np.float32) - mean) / std) @ w + b, axis=1)


class Linear:
  """`NAME/top1`: accuracy of the fitted probe on the eval set; `NAME/train_loss` its objective."""

  def __init__(self, name, entry, probe):
    self.name, self.every_steps, self.probe = name, entry.every_steps, probe
    self.l2_reg, self.steps = entry.l2_reg, entry.steps

  def run(self, context):
    train_x, train_y = self.probe.train.features(context, self.probe.pool)
    test_x, test_y = self.probe.evals.features(context, self.probe.pool)
    probe = fit(train_x, train_y, self.probe.num_classes, self.l2_reg, self.steps)
    top1 = float(np.mean(predict(probe, test_x) == np.asarray(test_y)))
    return [(f"{self.name}/top1", top1), (f"{self.name}/train_loss", probe[3])]
