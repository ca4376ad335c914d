"""Probes of the frozen encoder during pre-training: few-shot and k-NN accuracy.

Each entry `config.evals.NAME = dict(type=..., every_steps=..., ...)` becomes one evaluator
(big_vision style): an object with `name`, `every_steps` and `run(context)`, which yields
(name, value) pairs; the one loop (`train.run_evaluators`) builds the `Context` (state,
mesh, jitted sharded feature function) and logs what they yield every `every_steps` steps and
at the end. `every_steps`: N > 0 every N steps and at the end, -1 only at the end, 0 off.

- `fewshot` (`fewshot.py`): `NAME/<k>shot` for k in `shots`, big_vision's closed-form
  least-squares probe, mean over `seeds` draws of k examples per class.
- `knn` (`knn.py`): `NAME/top1`, DINO's weighted k-NN (k = 20, T = 0.07).
- `linear` (`logistic.py`): `NAME/top1`, a fast linear probe: multinomial logistic regression
  on the standardised features, full batch, L-BFGS (off by default: `every_steps=0`).

Both read `probe_sets.py`'s fixed labelled sets (features of no-masking, inference-mode
encoder outputs: the cls token or the mean of the patch tokens after the final norm); the
solves run on the host in numpy. On unlabelled training data (the bundled photos, a folder
without class folders) the probes are off with one log line, unless an entry names its own
`dataset`: then missing labels, or shots / k the data cannot serve, are errors.
"""

import logging

from mae_jax.evaluators import fewshot, knn, logistic, probe_sets
from mae_jax.evaluators.context import POOLS, Context, encoder_features  # noqa: F401

log = logging.getLogger(__name__)

TYPES = {"fewshot": fewshot.FewShot, "knn": knn.Knn, "linear": logistic.Linear}


def _entries(config):
  """[(name, entry)] of the evaluators config.evals turns on (every_steps != 0)."""
  evals = config.get("evals") or {}
  return [(name, evals[name]) for name in evals if evals[name].get("every_steps", 0) != 0]


def _resolve_all(config):
  """([(name, entry, Probe)], why they are off or None); errors for bad explicit settings."""
  probes, off = [], None
  for name, entry in _entries(config):
    if entry.type not in TYPES:  # config_check says so first; this guards direct callers
      raise ValueError(f"config.evals.{name}.type={entry.type!r}; expected one of "
                       f"{sorted(TYPES)}")
    try:
      probes.append((name, entry, probe_sets.resolve(config, name, entry)))
    except probe_sets.NoLabels as e:
      if entry.dataset:
        raise ValueError(f"{e}; the probes need labelled images (a TFDS dataset with labels, "
                         "or an image folder root/<class>/<image>)") from None
      off = str(e)
  return probes, off


def check(config):
  """Validate every probe against its data before anything compiles (ValueError / ...)."""
  _resolve_all(config)


def from_config(config):
  """The evaluators `config.evals` asks for, sharing their sets; logs what runs (or why not)."""
  probes, off = _resolve_all(config)
  if off:
    names = ", ".join(name for name, _ in _entries(config) if all(name != p[0] for p in probes))
    log.info("probes %s off: %s; set config.evals.<name>.dataset to a labelled dataset "
             "(or every_steps=0 to silence this)", names, off)
  shared = {}
  out = []
  for name, entry, probe in probes:
    if entry.type == "fewshot" and not probe.shots:
      log.info("probe %s off: %s", name, probe.dropped)
      continue
    # evaluators reading the same images share one set: decoded once, features once per step
    probe.train = shared.setdefault(probe.train.key(), probe.train)
    probe.evals = shared.setdefault(probe.evals.key(), probe.evals)
    out.append(TYPES[entry.type](name, entry, probe))
    every = (f"every {entry.every_steps} steps and at the end" if entry.every_steps > 0
             else "at the end")
    what = {"fewshot": lambda: f"{'/'.join(map(str, probe.shots))}-shot x {entry.seeds} seeds",
            "knn": lambda: f"k={probe.k}, T={entry.temperature}",
            "linear": lambda: f"L-BFGS x {entry.steps}, l2 {entry.l2_reg:g}"}[entry.type]()
    log.info("probe %s (%s, %s, %s features): train set %s, eval set %s, %d classes, %s%s",
             name, entry.type, what, probe.pool, probe.train.description,
             probe.evals.description, probe.num_classes, every,
             f"; {probe.dropped}" if probe.dropped else "")
  return out
