"""The host side of the non-finite guard: count skipped steps, roll back, give up.

The compiled step already skips a step whose loss or gradient norm is not finite (params,
optimizer state and BatchNorm statistics stay as they were; the data moves on), so no
checkpoint ever holds a NaN. This counts those steps at each log interval. After more than
`config.nan_patience` of them in a row the run rolls back to the newest *good* checkpoint
(one saved while the loss was finite; `checkpointing.KeepPolicy` never deletes it), with
the masks re-seeded so the replayed steps are not the same draw; the newer, suspect steps
move to `<workdir>/checkpoints_suspect/`. After `config.max_rollbacks` roll-backs it gives
up with an error that names the last good checkpoint.
"""

import logging

log = logging.getLogger(__name__)


class Guard:
  """Non-finite step counts of one run; `rollbacks` carries over a resume (checkpoint meta)."""

  def __init__(self, config, rollbacks=0):
    self.patience = config.get("nan_patience", 20)
    self.max_rollbacks = config.get("max_rollbacks", 3)
    self.rollbacks = rollbacks
    self.skipped = 0  # in this job
    self.streak = 0   # in a row, up to the last counted step

  def streak_after(self, flags):
    """The streak once per-step non-finite `flags` (oldest first) follow what was counted."""
    streak = self.streak
    for bad in flags:
      streak = streak + 1 if bad else 0
    return streak

  def count(self, flags, step):
    """Fold in one log interval's flags; True when the streak is past the patience."""
    self.skipped += sum(flags)
    self.streak = self.streak_after(flags)
    if any(flags):
      log.warning("step %d: %d of the last %d steps had a non-finite loss or gradient and were "
                  "skipped (%d in this job, %d in a row)", step, sum(flags), len(flags),
                  self.skipped, self.streak)
    return self.streak > self.patience

  def rollback_target(self, good_steps, step, directory, hint):
    """(good step, error): where to roll back to, and the error to stop with, if any.

    Counts the roll-back when there is one. The error (a FloatingPointError, to raise once
    the steps after the good one are set aside) comes when no checkpoint is good or after
    `max_rollbacks`; the good step is then the one a rerun resumes from (or None).
    """
    good = [s for s in good_steps if s < step]
    what = (f"{self.streak} steps in a row up to step {step} had a non-finite loss or gradient "
            f"(config.nan_patience={self.patience})")
    if not good or self.rollbacks >= self.max_rollbacks:
      where = (f"the last good checkpoint is step {good[-1]} in {directory} (newer, "
               "suspect steps are in checkpoints_suspect/)" if good else
               f"no checkpoint saved with a finite loss in {directory} to roll back to")
      tried = (f" after {self.rollbacks} roll-back(s) (config.max_rollbacks="
               f"{self.max_rollbacks})" if good else "")
      return (good[-1] if good else None), FloatingPointError(f"{what}{tried}; {where}; {hint}")
    self.rollbacks += 1
    self.streak = 0
    log.warning("%s: rolling back to checkpoint %d (the last saved with a finite loss), masks "
                "re-seeded (roll-back %d of config.max_rollbacks=%d)", what, good[-1],
                self.rollbacks, self.max_rollbacks)
    return good[-1], None
