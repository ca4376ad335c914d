#!/usr/bin/env python3
r"""Cloud TPU pod slices for mae_jax: create, set up, train, watch and resume after preemption.

From zero to a resumed-after-preemption run, one command (spot capacity, queued):

  python3 launch/tpu.py run mae-h --accelerator-type=v5p-128 --spot \
      --project=my-project --zone=us-east5-a --bucket=gs://my-bucket \
      --config=configs/vit_h.py -- --config.model.dtype=bfloat16 --config.data.dataset=imagenet2012

Subcommands: create, setup, train, run, logs, ssh, stop, delete, and jobset (the same run as a
GKE JobSet); `--help` on each. Every one
takes --dry-run: print the exact commands, run nothing. --project, --zone and --bucket may come
from CLOUDSDK_CORE_PROJECT, CLOUDSDK_COMPUTE_ZONE (gcloud's own variables) and MAE_JAX_BUCKET.
Nothing here ever deletes the bucket or the workdir: `delete` removes the TPU VMs only.
Standard library only (a laptop with gcloud is enough).
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_commands as tc  # noqa: E402  pylint: disable=wrong-import-position
from tpu_watch import Failure, Gcloud, cmd_run  # noqa: E402  pylint: disable=wrong-import-position


class UserError(Exception):
  """A bad flag or environment: one `error:` line, exit 2, nothing run."""


# ---------------------------------------------------------------------------------- flags
def _env(name):
  return os.environ.get(name) or None


# What may follow `--` on the command line (argparse cannot mix it with the NAME positional).
_MAIN_FLAGS = ("[-- MAIN_FLAG ...]",
               "after --: more mae_jax.main flags, e.g. -- --config.mesh.fsdp=8")
TAIL = {"train": _MAIN_FLAGS, "run": _MAIN_FLAGS, "jobset": _MAIN_FLAGS,
        "ssh": ("[-- COMMAND ...]", "after --: a command to run instead of a shell")}


def build_parser():
  """The argparse tree: one subparser per subcommand, shared flags from parents."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU VM name (lower-case letters, digits, '-')")
  common.add_argument("--project", default=_env("CLOUDSDK_CORE_PROJECT"),
                      help="Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)")
  common.add_argument("--zone", default=_env("CLOUDSDK_COMPUTE_ZONE"),
                      help="zone, e.g. us-east5-a (default: $CLOUDSDK_COMPUTE_ZONE)")
  tier = common.add_mutually_exclusive_group()
  tier.add_argument("--spot", dest="tier", action="store_const", const="spot", default="",
                    help="spot capacity through a queued resource NAME-qr (preemptible)")
  tier.add_argument("--best-effort", dest="tier", action="store_const", const="best-effort",
                    help="best-effort queued resource (gcloud alpha; preemptible)")
  tier.add_argument("--queued", dest="tier", action="store_const", const="queued",
                    help="on-demand capacity through a queued resource (waits for capacity)")
  common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

  accel = argparse.ArgumentParser(add_help=False)
  accel.add_argument("--accelerator-type", required=True,
                     help="e.g. v4-64, v5p-128, v6e-256, v5litepod-16")
  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--runtime-version", help="TPU software version (default: the JAX "
                      "image of the generation: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for "
                      "v6e, v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4)")
  create.add_argument("--network", help="VPC network (default: gcloud's, 'default')")
  create.add_argument("--subnetwork", help="VPC subnetwork")
  setup = argparse.ArgumentParser(add_help=False)
  setup.add_argument("--repo-url", help="git URL the workers clone (default: this checkout's "
                     "origin)")
  setup.add_argument("--ref", help="commit, tag or branch (default: this checkout's HEAD "
                     "commit, which must be pushed)")
  remote = argparse.ArgumentParser(add_help=False)
  remote.add_argument("--remote-dir", default="mae_jax", help="checkout on each worker, "
                      "relative to the home directory (default: mae_jax)")
  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--config", required=True, help="config file of this repository, e.g. "
                     "configs/vit_h.py (the workers run the same checkout)")
  train.add_argument("--bucket", default=_env("MAE_JAX_BUCKET"),
                     help="gs://BUCKET; the workdir defaults to gs://BUCKET/NAME "
                     "(default: $MAE_JAX_BUCKET)")
  train.add_argument("--workdir", help="gs:// workdir shared by all workers (default: "
                     "BUCKET/NAME); the run resumes from its latest checkpoint")

  fmt = argparse.RawDescriptionHelpFormatter
  parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__, formatter_class=fmt)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, parents, text):
    epilog = TAIL.get(name)
    usage_tail = f" {epilog[0]}" if epilog else ""
    p = sub.add_parser(name, parents=parents, help=text, description=text, formatter_class=fmt,
                       epilog=epilog[1] if epilog else None)
    p.usage = p.format_usage().replace("usage: ", "").strip() + usage_tail
    return p

  add("create", [common, accel, create], "create the slice (a TPU VM now, or a queued "
      "resource with --spot / --best-effort / --queued)")
  add("setup", [common, setup, remote], "clone the repo at --ref and install the pinned "
      "requirements + jax[tpu] on every worker")
  add("train", [common, accel, train, remote], "start the same mae_jax.main command on every "
      "worker, detached, logging to ~/mae_jax_train.log")
  run = add("run", [common, accel, create, setup, train, remote], "create -> setup -> train -> "
            "watch: a preempted or deleted slice is made again, set up and resumed from the "
            "workdir")
  run.add_argument("--max-restarts", type=int, default=10, help="restarts before giving up "
                   "(default 10)")
  run.add_argument("--poll-seconds", type=float, default=60.0, help="seconds between state "
                   "checks (default 60)")
  logs = add("logs", [common], "stream a worker's training log")
  logs.add_argument("--worker", default="0", help="worker index (default 0)")
  logs.add_argument("--lines", type=int, default=100, help="lines of history first")
  ssh = add("ssh", [common], "a shell (or a command) on a worker")
  ssh.add_argument("--worker", default="0", help="worker index or 'all' (default 0)")
  add("stop", [common], "ask the trainer on every worker to checkpoint and exit (SIGUSR1); "
      "the slice stays")
  add("delete", [common], "delete the slice (and its queued resource); the bucket and "
      "workdir stay")
  gke = add("jobset", [common, accel, setup, train], "GKE instead of TPU VMs: a JobSet for a "
            "TPU slice node pool (printed with --dry-run, else `kubectl apply -f -`); NAME "
            "names the JobSet; kubectl's current context picks the cluster (--project and "
            "--zone are not used)")
  gke.add_argument("--topology", help="node pool topology (default: from the accelerator "
                   "type, e.g. 4x4x4 for v5p-128)")
  gke.add_argument("--image", default="python:3.11", help="container image with python3, "
                   "pip and git (default python:3.11)")
  gke.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts (preemptions "
                   "included) before it fails (default 10)")
  return parser


def _git(*args):
  try:
    return subprocess.run(["git", "-C", tc.ROOT, *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def check_args(a):
  """Validate before anything runs; fill defaults that come from this checkout."""
  if not tc.NAME_PATTERN.match(a.name):
    raise UserError(f"NAME={a.name!r}: a TPU name is 1-63 lower-case letters, digits and '-', "
                    "starting with a letter")
  for flag, value, env in (("--project", a.project, "CLOUDSDK_CORE_PROJECT"),
                           ("--zone", a.zone, "CLOUDSDK_COMPUTE_ZONE")):
    if not value and a.command != "jobset":
      raise UserError(f"no {flag[2:]}: pass {flag}=... or set {env}")
  if a.command == "jobset" and a.tier not in ("", "spot"):
    raise UserError(f"--{a.tier}: queued resources are for TPU VMs; on GKE only --spot applies")
  if hasattr(a, "accelerator_type"):
    try:
      a.accelerator = tc.parse_accelerator(a.accelerator_type)
    except ValueError as e:
      raise UserError(str(e)) from None
  if hasattr(a, "repo_url"):
    a.repo_url = a.repo_url or _git("remote", "get-url", "origin")
    a.ref = a.ref or _git("rev-parse", "HEAD")
    if not a.repo_url or not a.ref:
      raise UserError("--repo-url / --ref: this checkout has no origin remote or commit; pass "
                      "--repo-url=URL --ref=COMMIT")
  if hasattr(a, "config"):
    _check_train_args(a)
  if getattr(a, "max_restarts", 0) < 0:
    raise UserError(f"--max-restarts={a.max_restarts}: expected 0 or more")


def _check_train_args(a):
  config_file = a.config.split(":", 1)[0]
  if not os.path.isfile(os.path.join(tc.ROOT, config_file)):
    raise UserError(f"--config={a.config}: no file {config_file} in {tc.ROOT} (the workers run "
                    "this repository's files, e.g. configs/vit_h.py)")
  if a.bucket and not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]/?", a.bucket):
    raise UserError(f"--bucket={a.bucket}: expected gs://BUCKET, a Cloud Storage bucket name of "
                    "3-63 lower-case letters, digits, '-', '_' and '.'")
  if not a.workdir:
    if not a.bucket:
      raise UserError("no bucket: pass --bucket=gs://BUCKET (or set MAE_JAX_BUCKET) or "
                      "--workdir=gs://BUCKET/PATH")
    a.workdir = f"{a.bucket.rstrip('/')}/{a.name}"
  if not a.workdir.startswith("gs://") or len(a.workdir) <= len("gs://"):
    raise UserError(f"--workdir={a.workdir}: a pod slice needs a gs:// workdir that every worker "
                    "reads and writes (a local path would hold one worker's checkpoints only), "
                    "e.g. gs://my-bucket/mae_vit_h")


# ----------------------------------------------------------------------------- subcommands
def make_slice(a):
  return tc.Slice(a.name, a.project, a.zone, a.tier)


def training_command(a):
  """The worker command of `train` and `run`: every worker gets exactly this string."""
  argv = tc.train_argv(a.config, a.workdir, a.accelerator.hosts > 1, a.extra)
  return tc.start_command(argv, a.remote_dir)


def cmd_create(a, g):
  s = make_slice(a)
  g.run(s.create(a.accelerator, a.runtime_version, a.network, a.subnetwork))
  if s.queued and not a.dry_run:
    print(f"queued; `{shlex.join(s.describe_queued())}` prints ACTIVE once the slice exists")


def cmd_setup(a, g):
  g.run(make_slice(a).ssh("all", tc.setup_command(a.repo_url, a.ref, a.remote_dir)))


def cmd_train(a, g):
  g.run(make_slice(a).ssh("all", training_command(a)))
  if not a.dry_run:
    print(f"started on {a.accelerator.hosts} worker(s); follow it with: python3 launch/tpu.py "
          f"logs {a.name} --project={a.project} --zone={a.zone}")


def cmd_logs(a, g):
  g.run(make_slice(a).ssh(a.worker, tc.logs_command(a.lines)), check=False)


def cmd_ssh(a, g):
  remote = shlex.join(a.remote) if a.remote else None  # noqa: the words after --
  return g.run(make_slice(a).ssh(a.worker, remote), check=False)


def cmd_stop(a, g):
  g.run(make_slice(a).ssh("all", tc.stop_command()))


def cmd_delete(a, g):
  g.run(make_slice(a).delete())
  if not a.dry_run:
    print("deleted the TPU VMs; the bucket and the workdir (checkpoints) are untouched")


def cmd_jobset(a, _):
  try:
    topo = a.topology or tc.topology(a.accelerator)
  except ValueError as e:
    raise UserError(str(e)) from None
  # On GKE the container starts empty: clone + install, then the same training command.
  remote_dir = "/mae_jax"
  script = (f"{tc.setup_command(a.repo_url, a.ref, remote_dir)} && cd {remote_dir} && exec "
            f"{shlex.join(tc.train_argv(a.config, a.workdir, a.accelerator.hosts > 1, a.extra))}")
  manifest = tc.to_yaml(tc.jobset(a.name, a.accelerator, topo, a.image, script,
                                  a.tier == "spot", a.max_restarts)) + "\n"
  if a.dry_run:
    print(manifest, end="")
    return 0
  if shutil.which("kubectl") is None:
    raise UserError("kubectl is not on PATH (gcloud components install kubectl), or pass "
                    "--dry-run to print the manifest")
  status = subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True,
                          check=False).returncode
  if status:
    raise Failure(f"kubectl apply failed with exit status {status}")
  return 0


def main(argv=None):
  parser = build_parser()
  parser.error = lambda message: _die(f"{message} (see launch/tpu.py --help)", 2)
  argv = sys.argv[1:] if argv is None else list(argv)
  tail = argv[argv.index("--") + 1:] if "--" in argv else []
  a = parser.parse_args(argv[:len(argv) - len(tail) - bool(tail or "--" in argv)])
  if tail and a.command not in TAIL:
    parser.error(f"{a.command} takes nothing after --, got {shlex.join(tail)}")
  a.extra = a.remote = tail
  try:
    check_args(a)
    if not a.dry_run and a.command != "jobset" and shutil.which("gcloud") is None:
      raise UserError("gcloud is not on PATH: install the Google Cloud CLI "
                      "(https://cloud.google.com/sdk/docs/install), or pass --dry-run")
    gcloud = Gcloud(a.dry_run)
    if a.command == "run":
      return cmd_run(a, gcloud, make_slice(a), training_command(a))
    return globals()[f"cmd_{a.command}"](a, gcloud) or 0
  except UserError as e:
    _die(str(e), 2)
  except Failure as e:
    _die(str(e), 1)
  except KeyboardInterrupt:
    _die("interrupted; the slice and the training on it are left as they are", 130)


def _die(message, status):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


if __name__ == "__main__":
  sys.exit(main())
