"""The labelled images a probe reads: a fixed train set and a fixed eval subset, and their
features at the current state, each example counted exactly once on any number of processes.

Where the examples come from (`config.evals.NAME`, "" = as `config.data`):
- an image folder `folder/<class>/<image>`: a seeded subset of `train_examples` of its
  images, and `eval_examples` of `eval_folder` (when set, same class folders) or, without
  one, held out of `folder` (disjoint from the train set, at most half of it);
- a TFDS dataset with labels: the first `train_examples` of `train_split` (TFDS splits are
  shuffled when prepared; for imagenet2012 the first 65,000 train examples hold >= 30 of
  every class) and the first `eval_examples` of `eval_split`, held out of the same split
  when both are equal. By default the plain names of `config.data.split` / `eval_split`
  ('train' for 'train[:10%]'); a sub-split an entry names itself is used whole.
"""

import copy
import dataclasses
import hashlib

import jax
import numpy as np

from mae_jax import data

CACHE_BYTES = 1 << 30  # decoded images of a set kept in host memory (per process) up to this


class NoLabels(ValueError):
  """The probe data have no class labels."""


@dataclasses.dataclass
class Probe:
  """What a probe evaluator reads: train / eval sets, classes, and the settings they allow."""
  train: "ProbeSet"
  evals: "ProbeSet"
  num_classes: int
  pool: str                 # cls | mean
  shots: tuple = ()         # few-shot: the shot counts the train set holds
  k: int = 0                # k-NN: neighbours (at most the train set's size)
  dropped: str = ""         # what the defaults left out for a small dataset (one log line)


class ProbeSet:
  """A fixed set of labelled images: `features(context, pool)` -> (N, D) float32, (N,) labels
  in a fixed order (the example's position in the set), whatever the process count."""

  def __init__(self, config, size, description, *, files=None, split=None, subset=None):
    self.config, self.size, self.description = config, size, description
    self.files, self.split, self.subset = files, split, subset
    self._cached = None
    side = config.model.img_size
    per_image = side * side * 3 * (1 if config.data.ship_uint8 else 4)
    self._cache = size * per_image <= CACHE_BYTES * jax.process_count()

  def key(self):
    """Equal for sets of the same images read the same way (shared by evaluators)."""
    d = self.config.data
    files = hashlib.sha1("\n".join(self.files[0]).encode()).hexdigest() if self.files else None
    if self.subset is not None:
      which, ids = self.subset
      files = (which, d.arrays, d.eval_arrays, hashlib.sha1(np.asarray(ids).tobytes()).hexdigest())
    return (d.dataset, d.data_dir, self.split, files, self.config.batch_size,
            self.config.model.img_size, d.ship_uint8, d.antialias)

  def _batches(self):
    if self._cached is not None:
      return self._cached
    batches = data.create_eval_iterator(self.config, split=self.split, files=self.files,
                                        subset=self.subset)
    if not self._cache:
      return batches
    self._cached = list(batches)  # the eval transform is deterministic: decode once
    return self._cached

  def features(self, context, pool):
    """(features, labels) of every readable example of the set, in set order."""
    key = (self.key(), pool)
    if key not in context.memo:
      feats, labels, index = [], [], []
      for local in self._batches():
        out = context.features(local, pool)
        valid = out["valid"].astype(bool)
        feats.append(out["features"][valid])
        labels.append(out["label"][valid])
        index.append(out["index"][valid])
      index = np.concatenate(index)
      if len(np.unique(index)) != len(index):
        raise RuntimeError(f"{self.description}: an example was counted twice")
      order = np.argsort(index)
      context.memo[key] = (np.concatenate(feats)[order], np.concatenate(labels)[order])
    return context.memo[key]


def _plain(split):
  """'train[:10%]' / 'train+validation' -> 'train': the probes take their own first examples."""
  return split.split("+")[0].split("[")[0].strip()


def _probe_config(config, entry):
  """A copy of `config` whose `data` and `batch_size` are the probe's."""
  probe = copy.deepcopy(config)
  with probe.unlocked():
    d, e = probe.data, entry
    d.dataset = e.dataset or d.dataset
    d.folder = e.folder or d.folder
    if "eval_folder" not in d:
      d.eval_folder = ""
    d.eval_folder = e.eval_folder or d.eval_folder
    d.split = e.train_split or _plain(d.split)
    d.eval_split = e.eval_split or _plain(d.eval_split)
    probe.batch_size = e.batch_size if e.batch_size > 0 else config.batch_size
  return probe


def _field(name, field):
  return f"config.evals.{name}.{field}"


def _folder_sets(config, name, entry, what):
  d = config.data
  paths, labels, classes = data.list_image_folder(d.folder)
  if len(classes) < 2:
    raise NoLabels(f"{what}: the image folder {d.folder} has {len(classes)} class folder(s), "
                   "no labels (expected root/<class>/<image> with at least 2 classes)")
  order = np.random.default_rng([entry.seed, 1]).permutation(len(paths))
  if d.eval_folder:
    eval_paths, eval_labels, eval_classes = data.list_image_folder(d.eval_folder)
    if eval_classes != classes:
      raise ValueError(f"{_field(name, 'eval_folder')} (or config.data.eval_folder)="
                       f"{d.eval_folder} has the classes {eval_classes[:5]}... but "
                       f"{d.folder} has {classes[:5]}...: they must be the same class folders")
    eval_order = np.random.default_rng([entry.seed, 2]).permutation(len(eval_paths))
    eval_pick, eval_root = np.sort(eval_order[:entry.eval_examples]), d.eval_folder
    train_pick = np.sort(order[:entry.train_examples])
  else:  # held out of the train folder
    held = min(entry.eval_examples, len(paths) // 2)
    eval_paths, eval_labels, eval_root = paths, labels, d.folder + " (held out)"
    eval_pick = np.sort(order[:held])
    train_pick = np.sort(order[held:held + entry.train_examples])
  pick = lambda p, l, i: ([p[j] for j in i], [l[j] for j in i], classes)
  train = ProbeSet(config, len(train_pick), f"{len(train_pick)} images of {d.folder}",
                   files=pick(paths, labels, train_pick))
  evals = ProbeSet(config, len(eval_pick), f"{len(eval_pick)} images of {eval_root}",
                   files=pick(eval_paths, eval_labels, eval_pick))
  counts = np.bincount(np.asarray(labels)[train_pick], minlength=len(classes))
  return train, evals, len(classes), counts, classes


def _array_sets(config, entry, what):
  """The folder rule for arrays: a seeded train subset; eval_arrays or held out."""
  d = config.data
  train_arrays = data.arrays.train_arrays(d)
  if train_arrays.labels is None:
    raise NoLabels(f"{what}: {train_arrays.description}")
  count = len(train_arrays)
  order = np.random.default_rng([entry.seed, 1]).permutation(count)
  if d.eval_arrays:
    eval_arrays = data.arrays.eval_arrays(d)
    if eval_arrays.labels is None:
      raise NoLabels(f"{what}: the evaluation images {eval_arrays.description}")
    eval_order = np.random.default_rng([entry.seed, 2]).permutation(len(eval_arrays))
    eval_pick, eval_which = np.sort(eval_order[:entry.eval_examples]), "eval"
    train_pick = np.sort(order[:entry.train_examples])
    eval_what = eval_arrays.description
  else:  # held out of the training arrays
    held = min(entry.eval_examples, count // 2)
    eval_pick, eval_which = np.sort(order[:held]), "train"
    train_pick = np.sort(order[held:held + entry.train_examples])
    eval_what = train_arrays.description + " (held out)"
  train = ProbeSet(config, len(train_pick), f"{len(train_pick)} of {train_arrays.description}",
                   subset=("train", train_pick))
  evals = ProbeSet(config, len(eval_pick), f"{len(eval_pick)} of {eval_what}",
                   subset=(eval_which, eval_pick))
  num_classes = train_arrays.num_classes
  counts = np.bincount(train_arrays.labels[train_pick], minlength=num_classes)
  return train, evals, num_classes, counts, [str(c) for c in range(num_classes)]


def _tfds_sets(config, entry, what):
  d = config.data
  builder = data.tfds_builder(d)
  _, num_classes = data.dataset_info(config, d.split)
  if num_classes is None:
    raise NoLabels(f"{what} has no class labels")
  data.dataset_info(config, d.eval_split)  # the split exists

  def sub(split, start, stop):  # TFDS slices must lie inside the split
    if "[" in split or "+" in split:
      return split
    size = builder.info.splits[split].num_examples
    return f"{split}[{min(start, size)}:{min(stop, size)}]"

  train_split = sub(d.split, 0, entry.train_examples)
  held = d.split == d.eval_split
  start = builder.info.splits[train_split].num_examples if held else 0
  eval_split = sub(d.eval_split, start, start + entry.eval_examples)
  sizes = [builder.info.splits[s].num_examples for s in (train_split, eval_split)]
  train = ProbeSet(config, sizes[0], f"{d.dataset} {train_split}", split=train_split)
  evals = ProbeSet(config, sizes[1], f"{d.dataset} {eval_split}", split=eval_split)
  return train, evals, num_classes, None, None


def resolve(config, name, entry, *, strict=None):
  """The `Probe` of evaluator `config.evals[name]`; NoLabels when its data have none.

  Strict (the entry names its dataset): settings the data cannot serve are errors. Else
  (probing the training data by default) shots above the smallest class and k above the train
  set's size are left out / lowered, said in `Probe.dropped`.
  """
  strict = bool(entry.dataset) if strict is None else strict
  what = (f"{_field(name, 'dataset')}={entry.dataset!r}" if entry.dataset
          else f"config.data.dataset={config.data.dataset!r}")
  config = _probe_config(config, entry)
  d = config.data
  if d.dataset == data.BUNDLED:
    raise NoLabels(f"{what} has no labels")
  if d.dataset == data.FOLDER:
    train, evals, num_classes, counts, classes = _folder_sets(config, name, entry, what)
  elif d.dataset == data.ARRAYS:
    train, evals, num_classes, counts, classes = _array_sets(config, entry, what)
  else:
    train, evals, num_classes, counts, classes = _tfds_sets(config, entry, what)
  for part, s in (("train", train), ("eval", evals)):
    if s.size == 0:
      raise ValueError(f"config.evals.{name}: the probe's {part} set ({s.description}) is "
                       f"empty; check {_field(name, part + '_examples')} and the data")
  probe = Probe(train, evals, num_classes, entry.pool)
  dropped = []
  if entry.type == "fewshot":
    # folders: the smallest class of the train set; TFDS (labels unknown before reading):
    # at least k examples per class must fit in it
    smallest = int(counts.min()) if counts is not None else train.size // num_classes
    too_many = [k for k in entry.shots if k > smallest]
    if too_many and strict:
      where = (f"the smallest class of the probe's train set ({train.description}), "
               f"{classes[int(np.argmin(counts))]!r}, has {smallest} examples"
               if counts is not None else
               f"the probe's train set ({train.description}) has {train.size} examples "
               f"for {num_classes} classes")
      raise ValueError(f"{_field(name, 'shots')}={tuple(entry.shots)} asks for {max(too_many)} "
                       f"examples per class but {where}; lower the shots or raise "
                       f"{_field(name, 'train_examples')}")
    probe.shots = tuple(k for k in entry.shots if k <= smallest)
    if too_many:
      dropped.append(f"{'/'.join(map(str, too_many))}-shot left out (the smallest class of "
                     f"{train.description} has {smallest} examples)")
  elif entry.type == "knn":
    if entry.k > train.size and strict:
      raise ValueError(f"{_field(name, 'k')}={entry.k} neighbours but the probe's train set "
                       f"({train.description}) has {train.size} examples")
    probe.k = min(entry.k, train.size)
    if probe.k < entry.k:
      dropped.append(f"k={probe.k} (the train set has {train.size} examples)")
  probe.dropped = "; ".join(dropped)
  return probe
