"""The exact gcloud command lines and worker shell commands `launch/tpu.py` runs (no I/O here).

Standard library only: this runs on a laptop that has gcloud but not mae_jax's dependencies.
"""

import dataclasses
import json
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# generation: (the accelerator-type number counts "cores" (2 per chip) or "chips",
#              runtime version for JAX, GKE accelerator label)
# Runtime versions: Cloud TPU's "TPU software versions" page (PyTorch / JAX table).
GENERATIONS = {
    "v2": ("cores", "tpu-ubuntu2204-base", None),
    "v3": ("cores", "tpu-ubuntu2204-base", None),
    "v4": ("cores", "tpu-ubuntu2204-base", "tpu-v4-podslice"),
    "v5p": ("cores", "v2-alpha-tpuv5", "tpu-v5p-slice"),
    "v5litepod": ("chips", "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice"),
    "v6e": ("chips", "v2-alpha-tpuv6e", "tpu-v6e-slice"),
}
CHIPS_PER_HOST = 4  # every multi-host slice above; v5e / v6e slices of <= 8 chips are one host
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

# Files on every worker, in the login user's home: the training log, its pid, its exit status
# and a marker left by `stop` (so `run` does not restart a run the user stopped).
STATE = '"$HOME"/mae_jax_train'
LOG, PID, EXIT, STOP = (f"{STATE}.{ext}" for ext in ("log", "pid", "exit", "stop"))


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A Cloud TPU accelerator type such as v5p-128 (= 64 chips on 16 hosts)."""
  name: str
  generation: str
  chips: int
  hosts: int
  runtime_version: str
  gke_label: str


def parse_accelerator(text):
  """'v5p-128' -> Accelerator; ValueError naming the known generations and sizes otherwise."""
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  match = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", text or "")
  if not match or match.group(1) not in GENERATIONS:
    raise ValueError(f"--accelerator-type={text}: unknown accelerator type; expected one of "
                     f"{known} (e.g. v4-64, v5p-128, v6e-256, v5litepod-16)")
  generation, count = match.group(1), int(match.group(2))
  unit, runtime, label = GENERATIONS[generation]
  if unit == "cores":
    ok, chips, sizes = count >= 8 and count % 8 == 0, count // 2, "a multiple of 8 TensorCores"
  else:
    ok, chips = count in (1, 4, 8) or count % 16 == 0, count
    sizes = "1, 4, 8 or a multiple of 16 chips"
  if not ok:
    raise ValueError(f"--accelerator-type={text}: unknown accelerator type; {generation} "
                     f"slices are {sizes} (e.g. {generation}-{8 if unit == 'cores' else 16})")
  hosts = 1 if unit == "chips" and chips <= 8 else chips // CHIPS_PER_HOST
  return Accelerator(text, generation, chips, max(hosts, 1), runtime, label)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A named TPU VM slice in a project and zone, held directly or through a queued resource."""
  name: str
  project: str
  zone: str
  tier: str = ""  # "" (a TPU VM created at once), "queued", "spot" or "best-effort"

  @property
  def queued(self):
    return bool(self.tier)

  @property
  def queued_resource(self):
    return f"{self.name}-qr"

  def _where(self):
    return [f"--project={self.project}", f"--zone={self.zone}"]

  def create(self, accelerator, runtime_version=None, network=None, subnetwork=None):
    """The command that creates the slice (queued: a request that becomes ACTIVE later)."""
    version = runtime_version or accelerator.runtime_version
    extra = ([f"--network={network}"] if network else []) + (
        [f"--subnetwork={subnetwork}"] if subnetwork else [])
    if not self.queued:
      return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where(),
              f"--accelerator-type={accelerator.name}", f"--version={version}", *extra]
    # --best-effort exists only in the alpha track of queued-resources create.
    track = ["alpha"] if self.tier == "best-effort" else []
    tier = {"queued": [], "spot": ["--spot"], "best-effort": ["--best-effort"]}[self.tier]
    return ["gcloud", *track, "compute", "tpus", "queued-resources", "create",
            self.queued_resource, *self._where(), f"--node-id={self.name}",
            f"--accelerator-type={accelerator.name}", f"--runtime-version={version}", *extra, *tier]

  def describe_node(self):
    """Prints the node's state (READY, PREEMPTED, ...); fails with NOT_FOUND once it is gone."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(),
            "--format=value(state)"]

  def describe_queued(self):
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.queued_resource,
            *self._where(), "--format=value(state.state)"]

  def delete(self):
    """Deletes the TPU VMs (and the queued resource); never the bucket or the workdir."""
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.queued_resource,
              *self._where(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(), "--quiet"]

  def ssh(self, worker, command=None):
    """`command` on one worker (0, 1, ...) or on all of them at once (worker='all')."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(),
            f"--worker={worker}", *([f"--command={command}"] if command else [])]


def jax_pin(requirements=os.path.join(ROOT, "requirements.txt")):
  """The jax version requirements.txt pins ('0.10.2'): the workers get jax[tpu] of that version."""
  with open(requirements) as f:
    for line in f:
      match = re.match(r"\s*jax==([^\s#]+)", line)
      if match:
        return match.group(1)
  raise ValueError(f"{requirements}: no jax==VERSION pin")


# mae_jax needs Python >= 3.11; tpu-ubuntu2204-base is Ubuntu 22.04 with Python 3.10, whose
# archive has python3.11. The checkout gets its own virtual environment, as in the README.
VENV_PYTHON = ".venv/bin/python"


def setup_command(repo_url, ref, remote_dir):
  """Worker shell: the repo at `ref` in ~/remote_dir, Python 3.11, a .venv there with the
  pinned requirements and jax[tpu] of the same version."""
  d, q = shlex.quote(remote_dir), shlex.quote
  apt = "sudo apt-get -q -o DPkg::Lock::Timeout=600"  # first boot: unattended-upgrades holds it
  return " && ".join([
      f"{{ [ -d {d}/.git ] || git clone --quiet {q(repo_url)} {d}; }}",
      f"git -C {d} fetch --quiet origin {q(ref)}",
      f"git -C {d} checkout --quiet --detach FETCH_HEAD",
      f"{{ command -v python3.11 > /dev/null || {{ {apt} update > /dev/null && "
      f"{apt} install -y python3.11 python3.11-venv > /dev/null; }}; }}",
      f"{{ [ -x {d}/{VENV_PYTHON} ] || python3.11 -m venv {d}/.venv; }}",
      f"{d}/{VENV_PYTHON} -m pip install --quiet --upgrade pip",
      f"{d}/{VENV_PYTHON} -m pip install --quiet -r {d}/requirements.txt "
      f"{q(f'jax[tpu]=={jax_pin()}')}",
      f"{d}/{VENV_PYTHON} -m pip install --quiet --no-deps -e {d}",
      f"echo \"mae_jax: $(hostname) at $(git -C {d} rev-parse --short HEAD)\"",
  ])


def train_argv(config, workdir, multihost, extra=()):
  """The training command every worker runs in its checkout (it resumes from the workdir's
  latest checkpoint)."""
  return [VENV_PYTHON, "-m", "mae_jax.main", f"--config={config}", f"--workdir={workdir}",
          *(["--multihost"] if multihost else []), *extra]


def start_command(train, remote_dir):
  """Worker shell: start `train` (argv) detached, logging to ~/mae_jax_train.log, unless the
  trainer already runs there; its exit status lands in ~/mae_jax_train.exit."""
  inner = f"{shlex.join(train)} & echo $! > {PID}; wait $!; echo $? > {EXIT}"
  return (f"cd {shlex.quote(remote_dir)} && if [ -f {PID} ] && kill -0 \"$(cat {PID})\" "
          f"2>/dev/null; then echo \"mae_jax: already training on $(hostname)\"; else "
          f"rm -f {EXIT} {STOP}; setsid nohup bash -c {shlex.quote(inner)} >> {LOG} 2>&1 "
          f"< /dev/null & fi")


def status_command():
  """Worker shell printing `running`, `gone` (no trainer, no exit status) or
  `exit N [stop] [signal]` (stopped by `stop`; checkpointed on a signal)."""
  return (f"if [ -f {EXIT} ]; then echo \"exit $(cat {EXIT})$([ -f {STOP} ] && echo ' stop')"
          f"$(tail -n 30 {LOG} | grep -q 'stopping at step .* (signal)' && echo ' signal')\"; "
          f"elif [ -f {PID} ] && kill -0 \"$(cat {PID})\" 2>/dev/null; then echo running; "
          f"else echo gone; fi")


def stop_command():
  """Worker shell: SIGUSR1 to the trainer, which checkpoints at the next step boundary."""
  return (f"touch {STOP}; if [ -f {PID} ] && kill -USR1 \"$(cat {PID})\" 2>/dev/null; then "
          f"echo \"mae_jax: $(hostname): the trainer checkpoints and stops\"; else "
          f"echo \"mae_jax: $(hostname): no trainer running\"; fi")


def logs_command(lines):
  """Worker shell streaming the training log."""
  return f"tail -n {int(lines)} -F {LOG}"


# Chips -> the slice shapes GKE node pools offer (3-D tori for v4 / v5p, 2-D for v5e / v6e).
TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                 256: "16x16"}


def topology(accelerator):
  """The GKE topology label of `accelerator` (v5p-128 -> 4x4x4); ValueError where unknown."""
  table = TOPOLOGIES_2D if accelerator.generation in ("v5litepod", "v6e") else TOPOLOGIES_3D
  if accelerator.gke_label is None or accelerator.chips not in table:
    raise ValueError(f"--accelerator-type={accelerator.name}: no GKE TPU topology known for "
                     f"{accelerator.chips} chips of {accelerator.generation}; pass "
                     "--topology=AxB[xC]")
  return table[accelerator.chips]


def jobset(name, accelerator, topo, image, script, spot, max_restarts):
  """A JobSet (jobset.x-k8s.io) running `script` on every host of one TPU slice node pool."""
  chips_per_host = accelerator.chips // accelerator.hosts
  selector = {"cloud.google.com/gke-tpu-accelerator": accelerator.gke_label,
              "cloud.google.com/gke-tpu-topology": topo}
  pod = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet", "restartPolicy": "Never",
         "nodeSelector": selector,
         "containers": [{"name": "mae-jax", "image": image, "command": ["bash", "-c", script],
                         "resources": {"limits": {"google.com/tpu": chips_per_host}}}]}
  if spot:
    selector["cloud.google.com/gke-spot"] = "true"
    pod["tolerations"] = [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                           "value": "true", "effect": "NoSchedule"}]
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
      "metadata": {"name": name, "annotations": {
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      # A preempted or failed host fails the JobSet, which restarts every pod: the same
      # command resumes from the workdir's latest checkpoint.
      "spec": {"failurePolicy": {"maxRestarts": max_restarts}, "replicatedJobs": [{
          "name": "slice", "replicas": 1, "template": {"spec": {
              "parallelism": accelerator.hosts, "completions": accelerator.hosts,
              "backoffLimit": 0, "template": {"spec": pod}}}}]}}


def to_yaml(value, indent=0):
  """Block-style YAML of dicts, lists, strings (JSON-quoted), numbers and booleans."""
  pad = " " * indent
  if isinstance(value, dict):
    lines = []
    for key, item in value.items():
      if isinstance(item, (dict, list)) and item:
        lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
      else:
        lines.append(f"{pad}{key}: {to_yaml(item)}")
    return "\n".join(lines)
  if isinstance(value, list):
    lines = []
    for item in value:
      text = to_yaml(item, indent + 2)
      lines.append(f"{pad}- {text.lstrip() if isinstance(item, (dict, list)) else text}")
    return "\n".join(lines)
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return str(value)
  return json.dumps(value)
