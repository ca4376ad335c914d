"""launch/tpu.py against a fake gcloud on PATH that records its argv and plays a scenario."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.py")
sys.path.insert(0, os.path.join(ROOT, "launch"))
import tpu_commands as tc  # noqa: E402  pylint: disable=wrong-import-position

WHERE = ["--project=proj", "--zone=us-east5-a"]
SLICE = ["mae-h", *WHERE]
CODE = ["--repo-url=https://example.com/mae_jax.git", "--ref=0123abc"]
TRAIN = ["--accelerator-type=v5p-128", "--bucket=gs://my-bucket", "--config=configs/vit_h.py"]
MAIN = [".venv/bin/python", "-m", "mae_jax.main", "--config=configs/vit_h.py",
        "--workdir=gs://my-bucket/mae-h", "--multihost", "--config.model.dtype=bfloat16"]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")

# A stand-in for gcloud: appends its argv to calls.jsonl and keeps the slice's state in
# state.json (FAKE_NODE / FAKE_QR: the node's / queued resource's state at first; CREATING
# turns READY once described). FAKE_SCENARIO: "preempt-always" (each training start preempts
# the slice), "preempt-once" (only the first), "fail" (the trainer exits 1), else training
# finishes.
FAKE_GCLOUD = r'''#!{python}
import json, os, sys
log = os.environ["FAKE_LOG"]
argv = sys.argv[1:]
with open(os.path.join(log, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\n")
path = os.path.join(log, "state.json")
st = (json.load(open(path)) if os.path.exists(path) else
      {{"node": os.environ.get("FAKE_NODE") or None, "qr": os.environ.get("FAKE_QR") or None,
       "trains": 0}})
scenario = os.environ.get("FAKE_SCENARIO", "")
words = [w for w in argv if not w.startswith("--")]
words = words[1:] if words[0] == "alpha" else words
group, verb = words[2], words[3]
command = next((w[len("--command="):] for w in argv if w.startswith("--command=")), "")
status = 0

def not_found():
  sys.stderr.write("ERROR: (gcloud.compute.tpus.%s.%s) NOT_FOUND: Resource not found\n"
                   % (group, verb))
  return 1

if verb == "create":
  if group == "tpu-vm":
    st["node"] = "READY"
  else:
    st["qr"] = "WAITING_FOR_RESOURCES"
elif verb == "describe":
  if group == "tpu-vm":
    status = not_found() if st["node"] is None else print(st["node"]) or 0
    if st["node"] == "CREATING":
      st["node"] = "READY"
  elif st["qr"] is None:
    status = not_found()
  else:
    print(st["qr"])
    if st["qr"] == "WAITING_FOR_RESOURCES":
      st["qr"], st["node"] = "ACTIVE", "READY"
elif verb == "delete":
  if group == "tpu-vm":
    st["node"] = None
  else:
    st["qr"] = st["node"] = None
elif verb == "ssh":
  if scenario == "sshd-late" and not st.get("sshd"):  # the first ssh after READY is refused
    st["sshd"] = True
    sys.stderr.write("ssh: connect to host 10.0.0.2 port 22: Connection refused\n")
    status = 255
  elif st["node"] != "READY":
    sys.stderr.write("ssh: connect to host 10.0.0.2 port 22: Connection refused\n")
    status = 255
  elif "mae_jax.main" in command:
    st["trains"] += 1
    if scenario == "preempt-always" or (scenario == "preempt-once" and st["trains"] == 1):
      st["node"] = "PREEMPTED"
      if st["qr"]:
        st["qr"] = "SUSPENDED"
  elif "mae_jax_train.exit" in command and "kill -0" in command:  # the status query
    print("exit 1" if scenario == "fail" else "exit 0")
json.dump(st, open(path, "w"))
sys.exit(status)
'''


@pytest.fixture
def fake(tmp_path):
  """run(*args, scenario=..., node=...) -> (CompletedProcess, [argv of each gcloud call])."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (bin_dir / "gcloud").chmod(0o755)
  calls = tmp_path / "calls.jsonl"

  def run(*args, scenario="", node="READY", **env):
    for name in ("calls.jsonl", "state.json"):
      (tmp_path / name).unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE", "MAE_JAX_BUCKET")}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path),
                    FAKE_SCENARIO=scenario, FAKE_NODE=node or "")
    full_env.update(env)
    out = subprocess.run([sys.executable, TPU, *args], cwd=tmp_path, env=full_env,
                         capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    recorded = [json.loads(line) for line in lines]
    return out, recorded
  return run


def _command(argv):
  """The worker shell command of an ssh call."""
  return next(w[len("--command="):] for w in argv if w.startswith("--command="))


def _trainer_argv(command):
  """The argv the worker command starts in the background (inside its `bash -c '...'`)."""
  words = shlex.split(command)
  return shlex.split(words[words.index("-c") + 1].split(" & ")[0])


def _ssh(worker):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mae-h", *WHERE, f"--worker={worker}"]


def test_create_node_and_queued_resources(fake):
  out, calls = fake("create", *SLICE, "--accelerator-type=v4-64", "--network=my-net")
  assert out.returncode == 0, out.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "create", "mae-h", *WHERE,
                    "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base",
                    "--network=my-net"]]
  out, calls = fake("create", *SLICE, "--accelerator-type=v5p-128", "--spot")
  assert out.returncode == 0, out.stderr
  assert calls == [["compute", "tpus", "queued-resources", "create", "mae-h-qr", *WHERE,
                    "--node-id=mae-h", "--accelerator-type=v5p-128",
                    "--runtime-version=v2-alpha-tpuv5", "--spot"]]
  out, calls = fake("create", *SLICE, "--accelerator-type=v6e-256", "--best-effort",
                    "--runtime-version=v2-alpha-tpuv6e")
  assert calls == [["alpha", "compute", "tpus", "queued-resources", "create", "mae-h-qr", *WHERE,
                    "--node-id=mae-h", "--accelerator-type=v6e-256",
                    "--runtime-version=v2-alpha-tpuv6e", "--best-effort"]]


def test_setup_train_logs_ssh_stop_delete_command_lines(fake):
  out, calls = fake("setup", *SLICE, *CODE)
  assert out.returncode == 0, out.stderr
  (setup,) = calls
  assert setup[:-1] == _ssh("all")[1:]
  assert _command(setup) == (
      "{ [ -d mae_jax/.git ] || git clone --quiet https://example.com/mae_jax.git mae_jax; } && "
      "git -C mae_jax fetch --quiet origin 0123abc && "
      "git -C mae_jax checkout --quiet --detach FETCH_HEAD && "
      "{ command -v python3.11 > /dev/null || { sudo apt-get -q -o DPkg::Lock::Timeout=600 "
      "update > /dev/null && sudo apt-get -q -o DPkg::Lock::Timeout=600 install -y python3.11 "
      "python3.11-venv > /dev/null; }; } && "
      "{ [ -x mae_jax/.venv/bin/python ] || python3.11 -m venv mae_jax/.venv; } && "
      "mae_jax/.venv/bin/python -m pip install --quiet --upgrade pip && "
      "mae_jax/.venv/bin/python -m pip install --quiet -r mae_jax/requirements.txt "
      f"'jax[tpu]=={tc.jax_pin()}' && "
      "mae_jax/.venv/bin/python -m pip install --quiet --no-deps -e mae_jax && "
      'echo "mae_jax: $(hostname) at $(git -C mae_jax rev-parse --short HEAD)"')
  assert tc.jax_pin() == "0.10.2"  # requirements.txt's pin

  out, calls = fake("train", *SLICE, *TRAIN, "--", "--config.model.dtype=bfloat16")
  assert out.returncode == 0, out.stderr
  (train,) = calls
  assert train[:-1] == _ssh("all")[1:]  # one command, the same for every worker
  assert _trainer_argv(_command(train)) == MAIN
  # a single-host slice: no jax.distributed
  out, calls = fake("train", *SLICE, "--accelerator-type=v4-8", "--bucket=gs://my-bucket",
                    "--config=configs/vit_h.py")
  assert _trainer_argv(_command(calls[0])) == MAIN[:5]  # no --multihost on one host

  assert fake("logs", *SLICE)[1] == [
      _ssh(0)[1:] + ['--command=tail -n 100 -F "$HOME"/mae_jax_train.log']]
  assert fake("ssh", *SLICE, "--worker=3")[1] == [_ssh(3)[1:]]
  assert fake("ssh", *SLICE, "--worker=all", "--", "nproc", "&&", "df -h")[1] == [
      _ssh("all")[1:] + ["--command=nproc '&&' 'df -h'"]]
  (stop,) = fake("stop", *SLICE)[1]
  assert stop[:-1] == _ssh("all")[1:] and "kill -USR1" in _command(stop)
  assert fake("delete", *SLICE)[1] == [
      ["compute", "tpus", "tpu-vm", "delete", "mae-h", *WHERE, "--quiet"]]
  assert fake("delete", *SLICE, "--spot")[1] == [
      ["compute", "tpus", "queued-resources", "delete", "mae-h-qr", *WHERE, "--force", "--quiet"]]


def test_dry_run_prints_the_exact_commands_and_runs_nothing(fake):
  for args in (["create", *SLICE, "--accelerator-type=v5p-128", "--spot"],
               ["setup", *SLICE, *CODE], ["train", *SLICE, *TRAIN], ["stop", *SLICE],
               ["delete", *SLICE], ["logs", *SLICE], ["ssh", *SLICE]):
    dry, calls = fake(*args, "--dry-run")
    assert dry.returncode == 0 and not calls, dry.stderr
    real, calls = fake(*args)
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert printed == [["gcloud", *c] for c in calls]
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, "--spot", "--dry-run", "--",
                    "--config.model.dtype=bfloat16")
  assert out.returncode == 0 and not calls, out.stderr
  commands = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
  assert [c[:6] for c in commands] == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "mae-h-qr"],
      _ssh("all")[:6], _ssh("all")[:6],
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "mae-h"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "mae-h-qr"],
      _ssh(0)[:6], ["gcloud", "compute", "tpus", "queued-resources", "delete", "mae-h-qr"]]
  assert shlex.join(MAIN) in commands[2][-1]
  for sub in ("create", "setup", "train", "run", "logs", "ssh", "stop", "delete", "jobset"):
    help_out = subprocess.run([sys.executable, TPU, sub, "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "--dry-run" in help_out.stdout, sub


def _events(stdout):
  lines = [line for line in stdout.splitlines() if TIMESTAMP.match(line)]
  return [TIMESTAMP.sub("", line) for line in lines]


def _kinds(calls):
  """Each call as a short name: create / describe / delete / setup / train / status."""
  out = []
  for argv in calls:
    words = [w for w in argv if not w.startswith("--")]
    verb = words[4] if words[0] == "alpha" else words[3]
    if verb == "ssh":
      command = _command(argv)
      verb = ("train" if "mae_jax.main" in command else "setup" if "git clone" in command
              else "status")
    out.append(verb)
  return out


def test_preempted_spot_slice_is_recreated_set_up_and_resumed_until_max_restarts(fake):
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, "--spot", "--max-restarts=2",
                    "--poll-seconds=0", "--", "--config.model.dtype=bfloat16",
                    scenario="preempt-always", node=None)
  assert out.returncode == 1, out.stdout + out.stderr
  kinds = _kinds(calls)
  assert kinds.count("create") == kinds.count("setup") == kinds.count("train") == 3
  trains = [_command(c) for c, k in zip(calls, kinds) if k == "train"]
  assert len(set(trains)) == 1 and shlex.join(MAIN) in trains[0]  # the same command each time
  creates = [c for c, k in zip(calls, kinds) if k == "create"]
  assert all("--spot" in c and "--node-id=mae-h" in c for c in creates)
  # what is deleted: only the suspended queued resource (with its TPU VMs), never storage
  deletes = [c for c, k in zip(calls, kinds) if k == "delete"]
  assert deletes == [["compute", "tpus", "queued-resources", "delete", "mae-h-qr", *WHERE,
                      "--force", "--quiet"]] * 2
  assert not any("storage" in c or "gs://my-bucket" in " ".join(c) and k != "train"
                 for c, k in zip(calls, kinds))
  events = _events(out.stdout)
  assert sum("restart" in e for e in events) == 2
  assert any(e.startswith("mae-h: node PREEMPTED: restart 1 of 2") for e in events), events
  assert out.stderr.strip().splitlines()[-1] == (
      "error: mae-h: node PREEMPTED; --max-restarts=2 restarts used up, giving up. The "
      "checkpoints in gs://my-bucket/mae-h are kept: run the same command again to continue "
      "from the latest one")


def test_run_resumes_after_one_preemption_and_finishes(fake):
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, "--spot", "--poll-seconds=0",
                    scenario="preempt-once", node=None)
  assert out.returncode == 0, out.stdout + out.stderr
  kinds = _kinds(calls)
  assert kinds.count("train") == 2 and kinds.count("create") == 2 and kinds[-1] == "status"
  events = _events(out.stdout)
  assert "restart 1 of 10: making the slice again" in " ".join(events)
  assert events[-1].startswith("training finished (exit status 0); mae-h is still up")
  # ssh refused once right after READY: the same setup runs again
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, "--poll-seconds=0", scenario="sshd-late",
                    node=None)
  assert out.returncode == 0, out.stdout + out.stderr
  assert _kinds(calls).count("setup") == 2 and _kinds(calls).count("create") == 1
  assert "setup failed with exit status 255 on a live slice; trying again (2 of 3)" in out.stdout
  # an on-demand slice whose trainer fails is reported, not retried
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, "--poll-seconds=0", scenario="fail",
                    node=None)
  assert out.returncode == 1 and _kinds(calls).count("train") == 1
  assert "error: training failed with exit status 1 on worker 0" in out.stderr


@pytest.mark.parametrize("args,env,message", [
    (["train", "mae-h", "--zone=z", *TRAIN], {}, "error: no project: pass --project=... or set "
     "CLOUDSDK_CORE_PROJECT"),
    (["train", "mae-h", "--project=p", *TRAIN], {}, "error: no zone: pass --zone=... or set "
     "CLOUDSDK_COMPUTE_ZONE"),
    (["run", *SLICE, *CODE, "--accelerator-type=v5p-128", "--config=configs/vit_h.py"], {},
     "error: no bucket: pass --bucket=gs://BUCKET (or set MAE_JAX_BUCKET) or "
     "--workdir=gs://BUCKET/PATH"),
    (["create", *SLICE, "--accelerator-type=v5x-64"], {}, "error: --accelerator-type=v5x-64: "
     "unknown accelerator type; expected one of v2-N, v3-N, v4-N, v5p-N, v5litepod-N, v6e-N "
     "(e.g. v4-64, v5p-128, v6e-256, v5litepod-16)"),
    (["create", *SLICE, "--accelerator-type=v5p-12"], {}, "error: --accelerator-type=v5p-12: "
     "unknown accelerator type; v5p slices are a multiple of 8 TensorCores (e.g. v5p-8)"),
    (["run", *SLICE, *CODE, *TRAIN, "--workdir=/data/runs/h"], {}, "error: --workdir=/data/runs/h: "
     "a pod slice needs a gs:// workdir that every worker reads and writes (a local path would "
     "hold one worker's checkpoints only), e.g. gs://my-bucket/mae_vit_h"),
    (["train", *SLICE, "--accelerator-type=v4-8", "--config=configs/vit_h.py",
      "--bucket=/tmp/b"], {}, "error: --bucket=/tmp/b: expected gs://BUCKET, a Cloud Storage "
     "bucket name of 3-63 lower-case letters, digits, '-', '_' and '.'"),
    (["train", *SLICE, "--accelerator-type=v4-8", "--config=configs/nope.py",
      "--bucket=gs://my-bucket"], {}, "error: --config=configs/nope.py: no file configs/nope.py"),
    (["create", "Mae_H", *WHERE, "--accelerator-type=v4-8"], {}, "error: NAME='Mae_H': a TPU "
     "name is 1-63 lower-case letters"),
    (["train", *SLICE, *TRAIN], {"PATH": "/nonexistent"}, "error: gcloud is not on PATH"),
])
def test_bad_input_is_one_error_line_exit_2_and_nothing_created(fake, args, env, message):
  out, calls = fake(*args, **env)
  assert out.returncode == 2, out.stdout + out.stderr
  assert calls == [] and out.stdout == ""
  assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(message), out.stderr


def test_environment_supplies_project_zone_and_bucket(fake):
  out, calls = fake("train", "mae-h", "--accelerator-type=v4-8", "--config=configs/vit_h.py",
                    CLOUDSDK_CORE_PROJECT="proj", CLOUDSDK_COMPUTE_ZONE="us-east5-a",
                    MAE_JAX_BUCKET="gs://my-bucket")
  assert out.returncode == 0, out.stderr
  assert calls[0][:8] == _ssh("all")[1:] and "--workdir=gs://my-bucket/mae-h" in _command(calls[0])


def test_worker_commands_start_once_report_status_and_stop(tmp_path):
  """The worker shell snippets, run by bash here with a fake trainer as the checkout's
  .venv/bin/python; the setup snippet is only syntax-checked (it needs the network)."""
  for command in (tc.setup_command("https://x/y.git", "abc", "mae_jax"), tc.status_command(),
                  tc.stop_command(), tc.logs_command(10)):
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
  home, venv_bin = tmp_path / "home", tmp_path / "home" / "mae_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(
      "#!/usr/bin/env bash\necho \"trainer $*\"\n"
      "trap 'echo \"stopping at step 5 (signal); rerun\"; exit 0' USR1\n"
      "for _ in $(seq 300); do sleep 0.1; done\nexit 3\n")
  (venv_bin / "python").chmod(0o755)
  env = dict(os.environ, HOME=str(home))

  def sh(command):
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=30).stdout.strip()

  argv = tc.train_argv("configs/tiny.py", "gs://b/x", True, ["--a=1 2"])
  start = tc.start_command(argv, "mae_jax")
  assert sh(tc.status_command()) == "gone"
  sh(start)
  deadline = time.time() + 10
  while sh(tc.status_command()) != "running" and time.time() < deadline:
    time.sleep(0.05)
  assert sh(tc.status_command()) == "running"
  assert sh(start).startswith("mae_jax: already training on")  # never a second trainer
  assert "the trainer checkpoints and stops" in sh(tc.stop_command())
  while not sh(tc.status_command()).startswith("exit") and time.time() < deadline:
    time.sleep(0.05)
  assert sh(tc.status_command()) == "exit 0 stop signal"
  log = (home / "mae_jax_train.log").read_text()
  assert f"trainer {' '.join(argv[1:])}" in log


def test_jobset_manifest_for_a_gke_tpu_node_pool(fake):
  yaml = pytest.importorskip("yaml")
  out, calls = fake("jobset", "mae-h", *TRAIN, *CODE, "--spot", "--max-restarts=4", "--dry-run",
                    "--", "--config.model.dtype=bfloat16")
  assert out.returncode == 0 and not calls, out.stderr
  manifest = yaml.safe_load(out.stdout)
  assert manifest["kind"] == "JobSet" and manifest["spec"]["failurePolicy"] == {"maxRestarts": 4}
  (job,) = manifest["spec"]["replicatedJobs"]
  spec = job["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == 16 and spec["backoffLimit"] == 0
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x4",
                                 "cloud.google.com/gke-spot": "true"}
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["command"][:2] == ["bash", "-c"]
  assert container["command"][2].endswith(f"&& cd /mae_jax && exec {shlex.join(MAIN)}")
  out, _ = fake("jobset", "mae-h", "--accelerator-type=v4-24", "--bucket=gs://my-bucket",
                "--config=configs/vit_h.py", *CODE, "--dry-run")
  assert out.returncode == 2 and "pass --topology=AxB[xC]" in out.stderr
  out, _ = fake("jobset", "mae-h", *TRAIN, *CODE, "--best-effort", "--dry-run")
  assert out.returncode == 2 and "on GKE only --spot applies" in out.stderr


@pytest.mark.parametrize("accelerator,chips,hosts,runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-64", 32, 8, "tpu-ubuntu2204-base"),
    ("v5p-128", 64, 16, "v2-alpha-tpuv5"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v6e-256", 256, 64, "v2-alpha-tpuv6e"), ("v3-32", 16, 4, "tpu-ubuntu2204-base")])
def test_accelerator_types(accelerator, chips, hosts, runtime):
  a = tc.parse_accelerator(accelerator)
  assert (a.chips, a.hosts, a.runtime_version) == (chips, hosts, runtime)


@pytest.mark.parametrize("node,queued,expected", [
    ("READY", None, ["describe", "describe", "setup", "train", "describe", "status"]),
    ("CREATING", None, ["describe", "describe", "setup", "train", "describe", "status"]),
    ("PREEMPTED", None, ["describe", "delete", "create", "describe", "setup", "train", "describe",
                         "status"]),
    (None, "WAITING_FOR_RESOURCES", ["describe", "describe", "describe", "describe", "setup",
                                     "train", "describe", "status"]),
    (None, "SUSPENDED", ["describe", "describe", "delete", "create", "describe", "describe",
                         "describe", "setup", "train", "describe", "status"]),
])
def test_run_uses_a_live_slice_waits_for_a_pending_one_and_clears_a_dead_one(fake, node, queued,
                                                                             expected):
  tier = ["--spot"] if queued else []
  out, calls = fake("run", *SLICE, *TRAIN, *CODE, *tier, "--poll-seconds=0", node=node,
                    FAKE_QR=queued or "")
  assert out.returncode == 0, out.stdout + out.stderr
  assert _kinds(calls) == expected
