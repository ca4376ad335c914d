"""What the training loop reports once per log interval: metrics, speed, step times, ETA.

One host sync per interval for the metrics; per step, the loop waits for the previous step
to finish before it queues the one after next (one step in flight, the next batch already
on its way), which times each step without stalling the device.
"""

import time

import jax
import numpy as np

from mae_jax import flops

PERCENTILES = (50, 90)


def format_eta(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Interval:
  """The steps since the last log line: their metrics and their wall times."""

  def __init__(self, meter, step):
    self.meter = meter
    self.restart(step)

  def restart(self, step):
    """Start counting at `step` (the run's start, or after a roll-back)."""
    self.tick, self.tick_step = time.perf_counter(), step
    self.pending, self.times = [], []
    self._done_at, self._in_flight = None, None

  def add(self, metrics):
    """A step was queued: wait for the one before it, record its completion time."""
    if self._in_flight is not None:
      jax.block_until_ready(self._in_flight)
      now = time.perf_counter()
      if self._done_at is not None:
        self.times.append(now - self._done_at)
      self._done_at = now
    self._in_flight = metrics["loss"]
    self.pending.append(metrics)

  def exclude(self, seconds):
    """Leave out time that was not training (evaluations) from speed and step times."""
    self.tick += seconds
    self._done_at = None

  def pending_flags(self):
    """The non-finite flags of the steps not yet logged (fetched from the device)."""
    return [bool(f) for f in jax.device_get([m["nonfinite"] for m in self.pending])]

  def close(self, step, total_steps):
    """(averaged metrics, speed, non-finite flags) of the interval ending at `step`.

    Metrics average the finite steps (all of them when none is); `nonfinite` counts the
    others. Speed: steps/s, img/s, MFU where the peak is known, step-time percentiles.
    """
    fetched = jax.device_get(self.pending)
    flags = [bool(m["nonfinite"]) for m in fetched]
    good = [m for m, bad in zip(fetched, flags) if not bad] or fetched
    averaged = {k: float(np.mean([m[k] for m in good])) for k in good[0]}
    averaged["nonfinite"] = float(sum(flags))
    now = time.perf_counter()
    speed = self.meter(step - self.tick_step, now - self.tick)
    if self.times:
      for p in PERCENTILES:
        speed[f"step_time_p{p}"] = float(np.percentile(self.times, p))
      speed["step_time_max"] = float(np.max(self.times))
    speed["eta_s"] = (total_steps - step) / speed["steps_per_s"]
    self.tick, self.tick_step, self.pending, self.times = now, step, [], []
    return averaged, speed, flags

  @staticmethod
  def describe(speed):
    """'2.50 steps/s  80.0 img/s  MFU 41.3%  step 0.398/0.412/0.503 s (p50/p90/max)  eta ...'."""
    text = flops.Meter.describe(speed)
    if "step_time_max" in speed:
      times = [speed[f"step_time_p{p}"] for p in PERCENTILES] + [speed["step_time_max"]]
      names = "/".join([f"p{p}" for p in PERCENTILES] + ["max"])
      text += f"  step {'/'.join(flops.sig3(t) for t in times)} s ({names})"
    return f"{text}  eta {format_eta(speed['eta_s'])}"
