"""`kill -9` at random moments of a tiny run, rerun each time: the result is the uninterrupted run's.

Ten kills drawn from a seeded RNG over the phases of a run (start-up and restore, compile,
between steps, an async save in flight, the final save and picture); after each, the same
command resumes from the latest complete checkpoint. The final params and optimizer state
and every scalar ever logged (all TensorBoard event files of all attempts) equal those of
the uninterrupted run bit for bit. The helpers here also drive the 2-process kill test in
test_multihost.py.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mae_jax import checkpointing, summaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ("img_size=32,embed_dim=32,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
             "decoder_num_heads=4,num_preview_images=2")
STEPS = 24
# Saves every 4 steps (a multiple of log_every, so the logged intervals line up across resumes).
FLAGS = (f"--config=configs/tiny.py:{TINY_ARGS}", "--config.mesh.data=1",
         "--config.warmup_steps=2", "--config.batch_size=16", "--config.image_every=-1",
         f"--config.total_steps={STEPS}", "--config.log_every=2",
         "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=True")
TAGS = ("loss", "lr", "grad_norm", "nonfinite")  # deterministic scalars (not img_per_s)
ITEMS = ("params", "opt_state", "meta", "config")


class Run:
  """A launched process; a thread collects its stdout lines, so waiting never blocks on a pipe.

  The subprocess inherits this process's environment: the persistent XLA cache of
  conftest.py, so reruns load the compiled step instead of rebuilding it.
  """

  def __init__(self, args, env=None):
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    self.started = time.time()
    self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines, self.times = [], []  # each line and its seconds since the start
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.times.append(time.time() - self.started)
      self.lines.append(line)

  def seen(self, text):
    return any(text in line for line in self.lines)

  def last_line(self):
    """The last line that is not part of the config dump."""
    lines = [l.strip() for l in self.lines if l[:1].isdigit() or l.startswith("process ")]
    return lines[-1] if lines else "<nothing yet>"

  def running(self):
    return self.proc.poll() is None

  def wait_until(self, predicate, timeout=180):
    """True once `predicate()` holds; False when the process ended first."""
    deadline = time.time() + timeout
    while not predicate():
      if not self.running():
        self._reader.join()
        return predicate()
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f"timed out after {timeout}s; output:\n{self.output()[-3000:]}")
      time.sleep(0.002)
    return True

  def output(self):
    return "".join(self.lines)

  def kill(self):
    """SIGKILL (again, harmlessly, if already sent), then wait for the process to be gone."""
    os.kill(self.proc.pid, signal.SIGKILL)
    self.proc.wait()
    self._reader.join()

  def finish(self, timeout=300):
    """(exit status, whole output) once the process ends by itself."""
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f"still running after {timeout}s:\n{self.output()[-3000:]}")
    self._reader.join()
    return self.proc.returncode, self.output()


def logged_scalars(workdir, tags=TAGS):
  """{(step, tag): [every value logged, in the order of the attempts]} over all event files."""
  root = os.path.join(workdir, "tensorboard")
  files = [os.path.join(root, name) for name in os.listdir(root)]
  out = {}
  opened = [events for events in map(summaries.read_events, files) if events]
  for events in sorted(opened, key=lambda events: events[0].wall_time):  # attempts in order
    for event in events:
      for value in event.summary.value:
        if value.tag in tags:
          out.setdefault((event.step, value.tag), []).append(value.simple_value)
  return out


def history(workdir, tags=TAGS):
  """{(step, tag): value}: the last value logged per step, as TensorBoard shows a resumed run."""
  return {key: values[-1] for key, values in logged_scalars(workdir, tags).items()}


def final_arrays(workdir, items=("params", "opt_state")):
  """The newest checkpoint's `items` as lists of numpy leaves."""
  return {name: jax.tree.leaves(checkpointing.restore_arrays(workdir, None, name))
          for name in items}


def assert_bitwise_equal(got, want):
  """Same leaves, same dtypes, same bits (NaN-safe)."""
  for name in want:
    assert len(got[name]) == len(want[name]), name
    for i, (a, b) in enumerate(zip(got[name], want[name])):
      assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
      bits = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)
      assert np.array_equal(bits(a), bits(b)), f"{name} leaf {i} differs"


def assert_same_logs(workdir, reference):
  """Every value ever logged in `workdir` (replays included) equals the reference's."""
  want = history(reference)
  logged = logged_scalars(workdir)
  assert set(logged) == set(want), sorted(set(logged) ^ set(want))
  for key, values in logged.items():
    assert all(v == want[key] for v in values), (key, values, want[key])


def check_consistent(workdir):
  """Each listed step is complete (every item, its own step in meta); returns (steps, tmp dirs)."""
  root = checkpointing.checkpoint_root(workdir)
  names = os.listdir(root) if os.path.isdir(root) else []
  tmp = sorted(n for n in names if not n.isdigit())
  mgr = checkpointing.manager(workdir, create=False)
  steps = sorted(mgr.all_steps())
  mgr.close()
  for step in steps:
    assert all(os.path.isdir(os.path.join(root, str(step), item)) for item in ITEMS), step
  if steps:
    meta = checkpointing.restore(workdir, steps[-1])[0]["meta"]
    assert meta["step"] == steps[-1], meta
  assert not os.path.exists(os.path.join(workdir, checkpointing.UNREADABLE_DIR))
  return steps, tmp


def _command(workdir, data_flags=()):
  return [sys.executable, "-m", "mae_jax.main", f"--workdir={workdir}", *FLAGS, *data_flags]


def save_in_flight(workdir, step):
  """A predicate: an Orbax temporary directory of `step` or later exists (a save is running).

  Call it once the run is past its start: a new run deletes the leftovers of killed saves.
  """
  root = checkpointing.checkpoint_root(workdir)

  def predicate():
    try:
      names = os.listdir(root)
    except FileNotFoundError:
      return False
    return any("tmp" in n and n.split(".")[0].isdigit() and int(n.split(".")[0]) >= step
               for n in names)
  return predicate


def _kill_at(run, kind, start, rng, workdir, data_line="data: 18 bundled photos"):
  """Kill `run` at a moment of phase `kind`; returns a description, or None if it ended first."""
  if kind == "restore":  # imports done; building, restoring, initialising
    ready = run.wait_until(lambda: run.seen(data_line))
    delay = rng.uniform(0, 1.0)
  elif kind == "compile":  # logged right before lowering and compiling the step
    ready = run.wait_until(lambda: run.seen("M trainable); steps"))
    delay = rng.uniform(0, 0.6)
  elif kind == "steps":  # after any logged step still to come
    target = int(rng.choice(np.arange(start + 2, STEPS + 1, 2)))
    ready = run.wait_until(lambda: run.seen(f"step {target}/{STEPS} "))
    delay = rng.uniform(0, 0.2)
  elif kind == "save":  # while the async save of a step still to come is being written
    target = int(rng.choice(np.arange(start + 4, STEPS + 1, 4)))
    # Logged before that save starts, after the leftovers of older kills are cleaned up.
    ready = run.wait_until(lambda: run.seen(f"step {target}/{STEPS} ")) and run.wait_until(
        save_in_flight(workdir, target))
    delay = 0.0
  else:  # "final": the last checkpoint is committed; the picture and exit remain
    ready = run.wait_until(lambda: run.seen(f"checkpoint of step {STEPS} in"))
    delay = rng.uniform(0, 0.5)
  if not ready:
    return None
  time.sleep(delay)
  if not run.running():
    return None
  seconds = time.time() - run.started
  run.kill()
  compiled = "compiled" if run.seen("train step compiled") else "not compiled"
  return f"{seconds:5.1f}s in, {compiled}, last line: {run.last_line()[:100]!r}"


@pytest.mark.parametrize("source", ["bundled_photos", "array_record"])
def test_kill9_at_ten_random_moments_then_resume_is_bit_exact(tmp_path, source):
  data_flags, data_line = (), "data: 18 bundled photos"
  if source == "array_record":  # a TFDS split read by index (the global order)
    from test_data_order import prepare_tiny_photos  # pylint: disable=import-outside-toplevel
    prepare_tiny_photos(tmp_path / "tfds")
    data_flags = ("--config.data.dataset=mae_tiny_photos",
                  f"--config.data.data_dir={tmp_path / 'tfds'}",
                  "--config.data.file_format=array_record")
    data_line = "data: mae_tiny_photos train: 19 examples (ArrayRecord"
  reference = tmp_path / "reference"
  code, out = Run(_command(reference, data_flags)).finish()
  assert code == 0, out[-3000:]
  workdir = tmp_path / "killed"
  rng = np.random.default_rng(20261201)
  # Nine kills anywhere in the run, in a random order; the last one after the final save.
  kinds = list(rng.permutation(["restore", "compile", "compile", "steps", "steps", "steps",
                                "save", "save", "save"])) + ["final"]
  report = []
  for kind in kinds:
    start = (checkpointing.latest_step(workdir) if os.path.isdir(workdir) else None) or 0
    run = Run(_command(workdir, data_flags))
    where = _kill_at(run, kind, start, rng, workdir, data_line)
    assert where is not None, f"the run ended before the {kind!r} kill:\n{run.output()[-3000:]}"
    steps, tmp = check_consistent(workdir)
    report.append((kind, run.seen("train step compiled"), tmp))
    print(f"kill {len(report):2d} ({kind:7s}) from step {start:2d}: {where}; "
          f"checkpoints {steps}, partial saves {tmp}")
  # the kills hit every phase: before the step was compiled, mid-save, after the final save
  assert sum(not compiled for _, compiled, _ in report) >= 3
  assert all(tmp for kind, _, tmp in report if kind == "save")
  assert checkpointing.latest_step(workdir) == STEPS  # the last kill came after the final save
  code, out = Run(_command(workdir, data_flags)).finish()
  assert code == 0, out[-3000:]
  steps, tmp = check_consistent(workdir)
  assert steps == [STEPS - 8, STEPS - 4, STEPS] and not tmp  # partial saves cleaned up
  assert_bitwise_equal(final_arrays(workdir), final_arrays(reference))
  assert_same_logs(workdir, reference)
  # the run's final outputs exist even when a kill came after its final checkpoint
  assert os.path.isfile(workdir / "reconstructions.png")
