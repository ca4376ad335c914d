"""The per-interval report: metric averages, speed, step-time percentiles, ETA."""

import time

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import flops, intervals


class _FakeMeter:
  def __call__(self, steps, seconds):
    return {"steps_per_s": steps / seconds, "img_per_s": 8 * steps / seconds}


def _metrics(loss, nonfinite=False):
  return {"loss": jnp.float32(loss), "lr": jnp.float32(0.1), "nonfinite": jnp.bool_(nonfinite)}


def test_step_times_are_the_gaps_between_completions_and_their_percentiles():
  interval = intervals.Interval(_FakeMeter(), step=0)
  sleeps = [0.01, 0.03, 0.02, 0.05, 0.01, 0.04]
  marks = []
  for i, pause in enumerate(sleeps):
    interval.add(_metrics(float(i)))
    marks.append(time.perf_counter())  # the step before this one is done (already computed)
    time.sleep(pause)
  # one step in flight: n adds give n - 2 gaps, each the sleep between two completions
  want = np.diff(marks)[1:]
  assert len(interval.times) == len(sleeps) - 2
  np.testing.assert_allclose(interval.times, want, atol=5e-3)
  averaged, speed, flags = interval.close(step=6, total_steps=12)
  assert averaged == pytest.approx({"loss": 2.5, "lr": 0.1, "nonfinite": 0.0})
  assert flags == [False] * 6
  assert speed["step_time_p50"] == pytest.approx(np.percentile(want, 50), abs=5e-3)
  assert speed["step_time_p90"] == pytest.approx(np.percentile(want, 90), abs=5e-3)
  assert speed["step_time_max"] == pytest.approx(max(want), abs=5e-3)
  assert speed["eta_s"] == pytest.approx(6 / speed["steps_per_s"])
  assert interval.pending == [] and interval.times == []


def test_nonfinite_steps_are_counted_not_averaged_and_excluded_time_is_not_a_step():
  interval = intervals.Interval(_FakeMeter(), step=10)
  for loss, bad in ((1.0, False), (float("nan"), True), (3.0, False)):
    interval.add(_metrics(loss, bad))
  assert interval.pending_flags() == [False, True, False]
  interval.exclude(0.0)  # an evaluation ran: the next gap is not a step time
  interval.add(_metrics(5.0))
  assert len(interval.times) == 1  # the gap before the evaluation only
  averaged, _, flags = interval.close(step=14, total_steps=14)
  assert averaged["loss"] == 3.0 and averaged["nonfinite"] == 1.0 and flags[1]


def test_describe_shows_three_significant_digits_and_eta():
  speed = {"steps_per_s": 2.0, "img_per_s": 16.0, "step_time_p50": 0.4981,
           "step_time_p90": 0.51234, "step_time_max": 1.5, "eta_s": 3725}
  assert intervals.Interval.describe(speed) == (
      "2.00 steps/s  16.0 img/s  step 0.498/0.512/1.50 s (p50/p90/max)  eta 1:02:05")
  assert intervals.Interval.describe({"steps_per_s": 2.0, "img_per_s": 16.0, "eta_s": 0}) == (
      flops.Meter.describe({"steps_per_s": 2.0, "img_per_s": 16.0}) + "  eta 0:00:00")
