"""Few-shot linear probe on frozen features: closed-form L2-regularised least squares.

big_vision's protocol (`evaluators/fewshot_lsr.py`): k labelled examples per class, features
whitened with the mean / std of those examples, a constant feature of 100 appended (the
bias, whose penalty is then 1e4 times weaker: nearly unregularised), targets the one-hot
labels scaled to {-1, +1}, ridge penalty `l2_reg` (2^10), prediction = argmax. The same k
examples per class for every step (a seeded permutation per class, nested over k), averaged
over a few seeds.
"""

import logging

import numpy as np

log = logging.getLogger(__name__)

BIAS = 100.0
STD_EPS = 1e-5


def _design(x, mean, std):
  """Whitened features with the bias column: (N, D) -> (N, D + 1) float64."""
  z = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([z, np.full((len(z), 1), BIAS)], axis=1)


def targets(labels, num_classes):
  """(N,) int -> (N, C) float64 one-hot in {-1, +1}."""
  return 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0


def fit(x, labels, num_classes, l2_reg):
  """(mean, std, W) with W (D + 1, C) minimising |Z W - T|^2 + l2_reg |W|^2 (Z whitened)."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + STD_EPS
  z, t = _design(x, mean, std), targets(labels, num_classes)
  n, d = z.shape
  if n >= d:  # primal: (Z'Z + l2 I)^-1 Z'T
    w = np.linalg.solve(z.T @ z + l2_reg * np.eye(d), z.T @ t)
  else:  # dual, cheaper with fewer examples than features: Z'(ZZ' + l2 I)^-1 T
    w = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(n), t)
  return mean, std, w


def predict(probe, x):
  """(N,) class ids of features `x` under `fit`'s probe."""
  mean, std, w = probe
  return np.argmax(_design(x, mean, std) @ w, axis=1)


def select(labels, num_classes, shots, seed):
  """Indices of the first `shots` examples per class of a seeded permutation of each class."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                         for c in range(num_classes)])


def accuracies(train_x, train_y, test_x, test_y, *, num_classes, shots, seeds, l2_reg,
               seed=0):
  """{k: mean test accuracy over `seeds` draws of k examples per class} (numpy, host)."""
  counts = np.bincount(np.asarray(train_y), minlength=num_classes)
  out = {}
  for k in shots:
    if k > counts.min():
      continue
    accs = []
    for s in range(seeds):
      idx = select(train_y, num_classes, k, [seed, s])
      probe = fit(train_x[idx], train_y[idx], num_classes, l2_reg)
      accs.append(float(np.mean(predict(probe, test_x) == np.asarray(test_y))))
    out[k] = float(np.mean(accs))
  return out


class FewShot:
  """`NAME/<k>shot`: few-shot accuracy on the eval subset, mean over `seeds` draws."""

  def __init__(self, name, entry, probe):
    self.name, self.every_steps = name, entry.every_steps
    self.shots, self.seeds = tuple(probe.shots), entry.seeds
    self.l2_reg, self.seed, self.probe = entry.l2_reg, entry.seed, probe
    self._warned = set()

  def run(self, context):
    train_x, train_y = self.probe.train.features(context, self.probe.pool)
    test_x, test_y = self.probe.evals.features(context, self.probe.pool)
    counts = np.bincount(train_y, minlength=self.probe.num_classes)
    skipped = [k for k in self.shots if k > counts.min() and k not in self._warned]
    if skipped:  # only possible for TFDS pools, whose labels are read on the first pass
      self._warned.update(skipped)
      log.warning("%s: %s-shot left out: the smallest class of the pool has %d examples; "
                  "raise config.evals.%s.train_examples", self.name, skipped, counts.min(),
                  self.name)
    result = accuracies(train_x, train_y, test_x, test_y, num_classes=self.probe.num_classes,
                        shots=self.shots, seeds=self.seeds, l2_reg=self.l2_reg, seed=self.seed)
    return [(f"{self.name}/{k}shot", acc) for k, acc in result.items()]
