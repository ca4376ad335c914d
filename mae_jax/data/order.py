"""The global example order shared by every random-access source (folders, arrays).

One epoch's order is a permutation of the whole data set keyed by (seed, epoch), the same on
every process; global batch `step` holds positions [step * B, (step + 1) * B) of the epochs
laid end to end, and each process takes its contiguous slots of it. So what a global batch
holds does not depend on the process count, and a run resumes on another process count.
"""

import numpy as np


def local_batch(batch_size, process_count):
  """This process's share of the global batch; a clear error if it does not divide."""
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) is not divisible by the "
                     f"{process_count} processes")
  return batch_size // process_count


def int32_ids(ids):
  """Global example ids as int32 (the mask noise is keyed by them), wrapping past 2^31 - 1."""
  return (np.asarray(ids, np.int64) % np.iinfo(np.int32).max).astype(np.int32)


def epoch_seed(seed, process_index, epoch):
  """A 31-bit seed for one epoch (order, augmentation); process 0's for a global order."""
  return int(np.random.SeedSequence([seed, process_index, epoch]).generate_state(1)[0] >> 1)


def epoch_permutation(seed_of_epoch, total):
  """The epoch's order of the `total` examples (numpy's permutation of that seed)."""
  return np.random.default_rng(seed_of_epoch).permutation(total)


def step_positions(step, global_batch, process_index, process_count):
  """Positions (in the epochs laid end to end) of this process's slots of global batch `step`."""
  local = local_batch(global_batch, process_count)
  return step * global_batch + process_index * local + np.arange(local, dtype=np.int64)


def process_range(count, process_index, process_count):
  """[start, end) of `process_index`'s contiguous part of `count` items (`tfds.even_splits`)."""
  base, extra = divmod(count, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


class IndexedSource:
  """What a source with random access shares: the global epoch order, and this process's
  contiguous share (`start`, `num_examples`) for evaluation. Subclasses set `total_examples`
  (then call `_share`) and define `records_at(ids)`: a dataset of the examples `ids`."""

  global_order = True

  def _share(self, process_index, process_count):
    self.start, end = process_range(self.total_examples, process_index, process_count)
    self.num_examples = end - self.start

  def records(self, epoch_seed, shuffle=True):
    """This process's share, shuffled by `epoch_seed` or in order (evaluation; training reads
    `records_at` of the global order)."""
    ids = (np.random.default_rng(epoch_seed).permutation(self.num_examples) if shuffle
           else np.arange(self.num_examples))
    return self.records_at(self.start + ids)

  def epoch_order(self, epoch_seed):
    """One epoch's permutation of the whole data set (the same on every process)."""
    return epoch_permutation(epoch_seed, self.total_examples)
