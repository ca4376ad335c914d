"""Weighted k-nearest-neighbour classification on frozen features (DINO's k-NN protocol).

Features L2-normalised; each eval example takes its k (20) most cosine-similar pool
examples, each voting for its class with weight exp(similarity / T), T = 0.07; the class
with the largest total wins (DINO `eval_knn.py`: top-1 of the summed weights).
"""

import numpy as np


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def predict(train_x, train_y, test_x, *, num_classes, k=20, temperature=0.07, chunk=1024):
  """(M,) predicted class of each row of `test_x` (M, D) from the pool (N, D), labels (N,)."""
  train, test = _unit(train_x), _unit(test_x)
  train_y = np.asarray(train_y)
  k = min(k, len(train))
  out = []
  for start in range(0, len(test), chunk):
    sim = test[start:start + chunk] @ train.T  # (b, N)
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (b, k), unordered
    weights = np.exp(np.take_along_axis(sim, top, axis=1).astype(np.float64) / temperature)
    votes = np.zeros((len(sim), num_classes))
    np.add.at(votes, (np.arange(len(sim))[:, None], train_y[top]), weights)
    out.append(np.argmax(votes, axis=1))
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


class Knn:
  """`NAME/top1`: k-NN accuracy of the eval subset against the pool's features."""

  def __init__(self, name, entry, probe):
    self.name, self.every_steps = name, entry.every_steps
    self.k, self.temperature, self.probe = probe.k, entry.temperature, probe

  def run(self, context):
    train_x, train_y = self.probe.train.features(context, self.probe.pool)
    test_x, test_y = self.probe.evals.features(context, self.probe.pool)
    pred = predict(train_x, train_y, test_x, num_classes=self.probe.num_classes, k=self.k,
                   temperature=self.temperature)
    return [(f"{self.name}/top1", float(np.mean(pred == test_y)))]
