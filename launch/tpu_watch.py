"""Running gcloud and the `run` loop of launch/tpu.py: bring the slice up, train, watch, resume.

The trainer resumes by itself from the workdir's latest checkpoint, so every (re)start runs
the same training command. What a restart does depends on what went away:
- the slice (PREEMPTED / TERMINATED / NOT_FOUND; a queued resource SUSPENDED or FAILED): delete
  what is left of it (TPU VMs only), create it again, set it up, start training;
- only the trainer, on a READY slice (a host restart, a maintenance SIGTERM): start training.
A trainer that exits non-zero on a READY slice is a bug or a bad config: reported, not retried.
"""

import shlex
import subprocess
import time

import tpu_commands as tc

READY = "READY"
NODE_GONE = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
QUEUED_GONE = ("SUSPENDING", "SUSPENDED", "FAILED", "NOT_FOUND")
QUEUED_PENDING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")


class Failure(Exception):
  """Something failed while running (a gcloud command, the trainer): `error:` line, exit 1."""


def event(message):
  """One timestamped progress line."""
  print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


class Gcloud:
  """Runs commands, or with `dry_run` prints each one (shell-quoted) instead."""

  def __init__(self, dry_run):
    self.dry_run = dry_run

  def run(self, argv, check=True):
    """Run `argv`, output passed through; its exit status (Failure if non-zero and `check`)."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0
    status = subprocess.call(argv)
    if check and status:
      raise Failure(f"`{shlex.join(argv)}` failed with exit status {status}")
    return status

  def query(self, argv):
    """(exit status, last non-empty stdout line, stderr) of `argv`."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else "", done.stderr.strip()


class Watcher:
  """The `run` loop for one slice; `train` is the worker command every (re)start uses."""

  def __init__(self, gcloud, tpu, args, train):
    self.g, self.tpu, self.a = gcloud, tpu, args
    self.create = tpu.create(args.accelerator, args.runtime_version, args.network,
                             args.subnetwork)
    self.setup = tpu.ssh("all", tc.setup_command(args.repo_url, args.ref, args.remote_dir))
    self.train = tpu.ssh("all", train)
    self.status = tpu.ssh(0, tc.status_command())

  def _state(self, argv):
    """The state a describe command prints, NOT_FOUND, or None when gcloud failed otherwise."""
    status, out, err = self.g.query(argv)
    if status == 0 and out:
      return out
    if "NOT_FOUND" in err or "not found" in err.lower():
      return "NOT_FOUND"
    event(f"could not read the state ({shlex.join(argv[:6])} ...: exit {status}: "
          f"{err.splitlines()[-1] if err else 'no output'}); asking again")
    return None

  def gone(self):
    """Why the slice is gone ('node PREEMPTED', ...), None while it exists, '' if unknown."""
    node = self._state(self.tpu.describe_node())
    if node is None:
      return ""
    if node in NODE_GONE:
      return f"node {node}"
    if self.tpu.queued and node != READY:
      queued = self._state(self.tpu.describe_queued())
      if queued in QUEUED_GONE:
        return f"queued resource {queued}"
    return None if node == READY else ""

  def _sleep(self):
    time.sleep(self.a.poll_seconds)

  def _known_state(self, argv, tries=5):
    """`_state`, asked again (one poll apart) while gcloud cannot say; Failure after `tries`."""
    for _ in range(tries):
      state = self._state(argv)
      if state is not None:
        return state
      self._sleep()
    raise Failure(f"cannot read the state of {argv[5]} (`{shlex.join(argv)}` failed {tries} "
                  "times): nothing was created or deleted")

  def wait_ready(self):
    """Poll until the slice is READY; the reason if it failed instead, else None."""
    last = None
    while True:
      name, state = self.tpu.name, None
      if self.tpu.queued:
        queued = self._state(self.tpu.describe_queued())
        if queued in QUEUED_GONE:
          return f"queued resource {queued} before the slice was ready"
        if queued != "ACTIVE":
          name, state = self.tpu.queued_resource, queued
      if name == self.tpu.name:
        state = self._state(self.tpu.describe_node())
        if state in NODE_GONE:
          return f"node {state} before the slice was ready"
      if state == READY:
        event(f"{name}: READY ({self.a.accelerator.hosts} worker(s))")
        return None
      if state and (name, state) != last:
        event(f"{name}: {state}, waiting")
        last = name, state
      self._sleep()

  def bring_up(self):
    """Use the slice if it is alive (first start), else create it after deleting what a
    preemption left of it (TPU VMs only); the reason if it died before it was READY."""
    node = self._known_state(self.tpu.describe_node())
    queued = self._known_state(self.tpu.describe_queued()) if self.tpu.queued else "NOT_FOUND"
    dead_queue = queued in QUEUED_GONE[:-1] or (queued == "ACTIVE" and node == "NOT_FOUND")
    if node not in NODE_GONE and not dead_queue:  # READY, CREATING, REPAIRING, ...: live
      event(f"{self.tpu.name} exists ({node}): using it")
      return self.wait_ready()
    if queued in QUEUED_PENDING:
      event(f"{self.tpu.queued_resource} exists ({queued}): waiting for it")
      return self.wait_ready()
    if node != "NOT_FOUND" or queued != "NOT_FOUND":
      event(f"deleting what is left of {self.tpu.name} (node {node}"
            f"{', queued resource ' + queued if self.tpu.queued else ''}; TPU VMs only, the "
            "workdir stays)")
      self.g.run(self.tpu.delete())
    event(f"creating {self.tpu.name}: {self.a.accelerator.name}"
          f"{', ' + self.tpu.tier if self.tpu.tier else ''}")
    self.g.run(self.create)
    return self.wait_ready()

  def _run_or_gone(self, argv, what, tries=3):
    """Run a (repeatable) worker command, again while the slice lives but ssh fails (sshd
    starts after READY); the reason if the slice went away meanwhile, Failure after `tries`."""
    for attempt in range(1, tries + 1):
      status = self.g.run(argv, check=False)
      if status == 0:
        return None
      why = self.gone()
      if why:
        return f"{why} during {what}"
      if attempt < tries:
        event(f"{what} failed with exit status {status} on a live slice; trying again "
              f"({attempt + 1} of {tries})")
        self._sleep()
    raise Failure(f"{what} failed {tries} times (exit status {status}) on a live slice: "
                  f"`{shlex.join(argv)}`")

  def start(self, action):
    """'start' / 'recreate': bring up, set up, train; 'retrain': train. Reason if gone."""
    if action != "retrain":
      why = self.bring_up()
      if why:
        return why
      event(f"setting up {self.a.accelerator.hosts} worker(s): {self.a.repo_url} at {self.a.ref}")
      why = self._run_or_gone(self.setup, "setup")
      if why:
        return why
    a = self.a
    event(f"training on every worker (resumes from {a.workdir}): "
          f"{shlex.join(tc.train_argv(a.config, a.workdir, a.accelerator.hosts > 1, a.extra))}")
    return self._run_or_gone(self.train, "the training start")

  def watch(self):
    """Poll until training ends or the slice goes: ('done' | 'recreate' | 'retrain', why)."""
    while True:
      self._sleep()
      why = self.gone()
      if why:
        return "recreate", f"{self.tpu.name}: {why}"
      if why is not None:
        continue  # a transient state (REPAIRING, RESTARTING, ...) or a failed describe
      status, out, _ = self.g.query(self.status)
      if status != 0 or not out or out == "running":
        continue
      if out == "gone":
        return "retrain", "no trainer and no exit status on worker 0 (the host restarted?)"
      words = out.split()  # exit N [stop] [signal]
      code = int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else -1
      if code != 0 or "signal" in words:
        self._sleep()  # a preemption may end the trainer before the slice shows it
        why = self.gone()
        if why:
          return "recreate", f"{self.tpu.name}: {why}"
      if "stop" in words:
        return "done", f"training stopped by `launch/tpu.py stop` (exit status {code})"
      if code == 0 and "signal" not in words:
        return "done", "training finished (exit status 0)"
      if code == 0:
        return "retrain", "the trainer checkpointed on a signal while the slice stayed READY"
      raise Failure(f"training failed with exit status {code} on worker 0 of a READY slice: see "
                    f"`python3 launch/tpu.py logs {self.tpu.name} --project={self.tpu.project} "
                    f"--zone={self.tpu.zone}`; the slice is left up")

  def print_plan(self):
    """--dry-run: every command `run` may issue, in order, with comments on when."""
    a = self.a
    every = f"every {a.poll_seconds:g} s"
    print("# create the slice, set it up, start training:")
    for argv in (self.create, self.setup, self.train):
      print(shlex.join(argv))
    print(f"# then {every}: the slice's state, and on READY the trainer's status on worker 0:")
    print(shlex.join(self.tpu.describe_node()))
    if self.tpu.queued:
      print(shlex.join(self.tpu.describe_queued()))
    print(shlex.join(self.status))
    print(f"# preempted or deleted ({', '.join(NODE_GONE)}"
          f"{'; queued: ' + ', '.join(QUEUED_GONE[:3]) if self.tpu.queued else ''}), up to "
          f"--max-restarts={a.max_restarts} times: delete what is left (TPU VMs only), then the "
          "create, setup and training commands above again:")
    print(shlex.join(self.tpu.delete()))


def cmd_run(args, gcloud, tpu, train):
  """create -> setup -> train -> watch, restarting up to --max-restarts times."""
  watcher = Watcher(gcloud, tpu, args, train)
  if gcloud.dry_run:
    watcher.print_plan()
    return 0
  restarts, action = 0, "start"
  while True:
    why = watcher.start(action)
    kind, why = ("recreate", why) if why else watcher.watch()
    if kind == "done":
      event(f"{why}; {tpu.name} is still up (and billed): delete it with `python3 launch/tpu.py "
            f"delete {tpu.name} --project={tpu.project} --zone={tpu.zone}"
            f"{' --' + tpu.tier if tpu.tier else ''}`")
      return 0
    if restarts >= args.max_restarts:
      raise Failure(f"{why}; --max-restarts={args.max_restarts} restarts used up, giving up. "
                    f"The checkpoints in {args.workdir} are kept: run the same command again "
                    "to continue from the latest one")
    restarts += 1
    event(f"{why}: restart {restarts} of {args.max_restarts}: "
          f"{'making the slice again' if kind == 'recreate' else 'starting the training again'}")
    action = kind
