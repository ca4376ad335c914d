"""Few-shot and k-NN probes of the frozen encoder: the solves against independent numpy, every
example counted once on 2 processes, clear errors up front, and the probes in a real run."""

import json
import logging
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import tiny
from mae_jax import config_check, evaluators, imaging, summaries, train
from mae_jax import data as mae_data
from mae_jax import model as model_lib
from mae_jax.evaluators import fewshot, knn, probe_sets
from mae_jax.tasks import pretrain
from test_data_tf import imagenet  # noqa: F401  # pylint: disable=unused-import  # a fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=4)
TINY_ARG = ",".join(f"{k}={v}" for k, v in TINY.items())


# ---------------------------------------------------------------- the solves, on fixed features

def _reference_fewshot(x, y, num_classes, l2_reg):
  """Written from the protocol: whiten, append a constant 100, +-1 one-hot targets, then
  ridge regression as an ordinary least-squares problem on [Z; sqrt(l2) I] w = [T; 0]."""
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
  z = np.hstack([(x - mean) / std, 100.0 * np.ones((len(x), 1))])
  t = -np.ones((len(x), num_classes))
  t[np.arange(len(x)), y] = 1.0
  d = z.shape[1]
  w = np.linalg.lstsq(np.vstack([z, np.sqrt(l2_reg) * np.eye(d)]),
                      np.vstack([t, np.zeros((d, num_classes))]), rcond=None)[0]
  return (lambda q: np.argmax(np.hstack([(q - mean) / std, 100.0 * np.ones((len(q), 1))]) @ w,
                              axis=1)), w


@pytest.mark.parametrize("n_per_class,dim", [(10, 6), (2, 40)], ids=["primal", "dual"])
def test_fewshot_solve_equals_lstsq(n_per_class, dim):
  rng = np.random.default_rng(0)
  classes, l2 = 4, 2.0 ** 10
  centres = rng.normal(size=(classes, dim)) * 3
  y = np.repeat(np.arange(classes), n_per_class)
  x = centres[y] + rng.normal(size=(len(y), dim)) + 5.0  # off-centre: the bias matters
  test_y = rng.integers(0, classes, 200)
  test_x = centres[test_y] + rng.normal(size=(200, dim)) + 5.0
  for reg in (l2, 1.0):
    probe = fewshot.fit(x, y, classes, reg)
    reference, want_w = _reference_fewshot(x, y, classes, reg)
    np.testing.assert_allclose(probe[2], want_w, atol=1e-5, rtol=0)
    got = np.mean(fewshot.predict(probe, test_x) == test_y)
    want = np.mean(reference(test_x) == test_y)
    assert abs(got - want) <= 1e-4 and got > 1 / classes, (got, want)


def test_fewshot_draws_k_per_class_nested_and_seeded():
  labels = np.repeat(np.arange(3), [5, 7, 9])
  five = fewshot.select(labels, 3, 5, [0, 1])
  two = fewshot.select(labels, 3, 2, [0, 1])
  assert np.bincount(labels[five]).tolist() == [5, 5, 5]
  assert set(two) <= set(five)  # the same permutation per class: nested over k
  assert not np.array_equal(five, fewshot.select(labels, 3, 5, [0, 2]))


def _reference_knn(train_x, train_y, test_x, num_classes, k, temperature):
  """One query at a time: full sort of cosine similarities, exp(sim / T) votes of the top k."""
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  train_x, test_x = unit(train_x.astype(np.float64)), unit(test_x.astype(np.float64))
  out = []
  for q in test_x:
    sim = train_x @ q
    votes = np.zeros(num_classes)
    for j in np.argsort(-sim)[:k]:
      votes[train_y[j]] += np.exp(sim[j] / temperature)
    out.append(int(np.argmax(votes)))
  return np.array(out)


def test_knn_equals_numpy_reference():
  rng = np.random.default_rng(1)
  classes, dim = 5, 16
  centres = rng.normal(size=(classes, dim))
  train_y = rng.integers(0, classes, 300)
  train_x = (centres[train_y] + 0.9 * rng.normal(size=(300, dim))).astype(np.float32)
  test_y = rng.integers(0, classes, 150)
  test_x = (centres[test_y] + 0.9 * rng.normal(size=(150, dim))).astype(np.float32)
  for k, temperature in ((20, 0.07), (1, 0.07), (7, 1.0)):
    got = knn.predict(train_x, train_y, test_x, num_classes=classes, k=k,
                      temperature=temperature, chunk=64)
    want = _reference_knn(train_x, train_y, test_x, classes, k, temperature)
    np.testing.assert_array_equal(got, want)
  assert 0.5 < np.mean(got == test_y) < 1.0


# ---------------------------------------------------------------- data: a small labelled folder

def _write_folder(root, counts):
  photos = mae_data.bundled_photos()
  for label, count in enumerate(counts):
    os.makedirs(root / f"class{label}", exist_ok=True)
    for i in range(count):
      photo = photos[(label * 5 + i) % len(photos)]
      top = 6 * i
      Image.fromarray(photo[top:top + 96, top:top + 96]).save(
          root / f"class{label}" / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 classes of 10 photo crops each."""
  return _write_folder(tmp_path_factory.mktemp("probe_folder"), [10, 10, 10])


def _config(folder, **evals):
  config = tiny.get_config(TINY_ARG)
  config.data.update(dataset="image_folder", folder=folder)
  config.batch_size, config.total_steps, config.warmup_steps = 8, 4, 1
  config.log_every, config.num_preview_images, config.image_every = 2, 2, -1
  config.mesh.data = 1
  config.checkpoint.every_steps = 100
  for name in ("fewshot", "knn"):  # the linear probe stays off (its own test below)
    config.evals[name].update(every_steps=2, train_examples=13, eval_examples=11)
    config.evals[name].update(evals)
  config.evals.fewshot.update(shots=(1, 3))
  config.evals.knn.update(k=5)
  return config


def test_sets_are_fixed_disjoint_and_held_out(folder):
  config = _config(folder)
  probe = probe_sets.resolve(config, "knn", config.evals.knn)
  train_files, eval_files = probe.train.files[0], probe.evals.files[0]
  assert (len(train_files), len(eval_files)) == (13, 11)
  assert not set(train_files) & set(eval_files)
  again = probe_sets.resolve(config, "knn", config.evals.knn)
  assert again.train.files == probe.train.files  # the same images every time
  config.evals.knn.seed = 1
  other = probe_sets.resolve(config, "knn", config.evals.knn)
  assert other.train.files != probe.train.files and other.train.key() != probe.train.key()
  # evaluators on the same images share one set (decoded once); on other images they do not
  evs = pretrain.TASK.evaluators(config)
  assert evs[0].probe.evals is not evs[1].probe.evals
  config.evals.knn.seed = 0
  evs = pretrain.TASK.evaluators(config)
  assert evs[0].probe.train is evs[1].probe.train and evs[0].probe.evals is evs[1].probe.evals


def test_tfds_probe_sets_and_knn_against_one_numpy_pass(imagenet):
  """imagenet2012 prepared by the real builder (9 train / 4 validation images, 1000 classes):
  the first examples of train and validation; the defaults adapt, a named dataset is strict."""
  config = _config(imagenet[0])
  config.data.update(dataset="imagenet2012", manual_dir=imagenet[0], data_dir=imagenet[1],
                     folder="", shuffle_buffer=16)
  config.batch_size = 4
  mae_data.tfds_builder(config.data, prepare=True)
  probe = probe_sets.resolve(config, "knn", config.evals.knn)
  assert (probe.train.split, probe.evals.split) == ("train[0:9]", "validation[0:4]")
  assert (probe.train.size, probe.evals.size, probe.num_classes, probe.k) == (9, 4, 1000, 5)
  few = probe_sets.resolve(config, "fewshot", config.evals.fewshot)
  assert few.shots == () and "1/3-shot left out" in few.dropped  # 9 examples, 1000 classes
  evs = pretrain.TASK.evaluators(config)
  assert [type(e).__name__ for e in evs] == ["Knn"]
  config.evals.knn.update(dataset="imagenet2012", k=20)
  with pytest.raises(ValueError, match=r"config.evals.knn.k=20 neighbours but the probe's "
                     r"train set \(imagenet2012 train\[0:9\]\) has 9 examples"):
    pretrain.TASK.check(config)
  config.evals.knn.k = 5
  config.evals.fewshot.every_steps = 0
  pairs = dict(train.evaluate(config, train.RANDOM_INIT))
  one = config.copy_and_resolve_references()
  model = model_lib.MAE(config.model, rngs=nnx.Rngs(config.seed))
  feats = {}
  for split in ("train[0:9]", "validation[0:4]"):
    batches = list(mae_data.create_eval_iterator(one, split=split, process_index=0,
                                                 process_count=1))
    x = np.concatenate([np.asarray(evaluators.encoder_features(
        model, imaging.normalize(b["images"]), "cls"))[b["valid"]] for b in batches])
    feats[split] = x, np.concatenate([b["label"][b["valid"]] for b in batches])
  (train_x, train_y), (test_x, test_y) = feats.values()
  want = np.mean(knn.predict(train_x, train_y, test_x, num_classes=1000, k=5) == test_y)
  assert pairs["knn/top1"] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- every example counted once

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


SCRIPT = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
sys.path.insert(0, {tests!r})
import numpy as np
from mae_jax import evaluators, sharding, train
from mae_jax import steps as steps_lib
from mae_jax.tasks import pretrain
from test_data_tf import imagenet  # noqa: F401  # pylint: disable=unused-import  # a fixture
import test_probes
config = test_probes._config({folder!r})
config.mesh.data, config.mesh.fsdp = 4, 2  # 8 devices over 2 processes, the batch over all
pretrain.TASK.check(config)
mesh = sharding.make_mesh(config.mesh)
built = steps_lib.build(config, mesh, 4, 1)
state, static = built.init_fn()
evs = pretrain.TASK.evaluators(config)
context = evaluators.Context(built, state, static, mesh)
pairs = [pair for ev in evs for pair in ev.run(context)]
sets = {{}}
for name, probe in (("train", evs[0].probe.train), ("eval", evs[0].probe.evals)):
  feats, labels = probe.features(context, "cls")  # from the context's memo: not recomputed
  sets[name] = dict(count=len(feats), labels=labels.tolist(), abs=float(np.abs(feats).sum()))
print("RESULT " + json.dumps(dict(pairs=dict(pairs), sets=sets)), flush=True)
"""


def _single_pass(config, files):
  """Features of `files` one image at a time with the host model (no mesh, no padding)."""
  model = model_lib.MAE(config.model, rngs=nnx.Rngs(config.seed))
  one = config.copy_and_resolve_references()
  one.batch_size = 1
  feats, labels = [], []
  for batch in mae_data.create_eval_iterator(one, files=files, process_index=0,
                                             process_count=1):
    feats.append(np.asarray(evaluators.encoder_features(
        model, imaging.normalize(batch["images"]), "cls")))
    labels.append(batch["label"])
  return np.concatenate(feats), np.concatenate(labels)


def test_two_processes_count_each_example_once(folder):
  """2 processes x 4 fake devices, local eval batches of 4 (13 and 11 examples: the last
  batches partial) give the accuracies of one numpy pass over the same images."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  code = SCRIPT.format(tests=os.path.join(ROOT, "tests"), folder=folder)
  procs = [subprocess.Popen([sys.executable, "-c", code, f"localhost:{port}", str(i)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  results = []
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    results.append(json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1)))
  assert results[0] == results[1]  # every process holds the same gathered features
  got = results[0]
  # the reference: one numpy pass over the same fixed sets, in the same order
  config = _config(folder)
  probe = probe_sets.resolve(config, "fewshot", config.evals.fewshot)
  train_x, train_y = _single_pass(config, probe.train.files)
  test_x, test_y = _single_pass(config, probe.evals.files)
  assert got["sets"]["train"]["count"] == len(train_y) == 13
  assert got["sets"]["eval"]["count"] == len(test_y) == 11
  assert got["sets"]["train"]["labels"] == train_y.tolist()
  assert got["sets"]["eval"]["labels"] == test_y.tolist()
  np.testing.assert_allclose(got["sets"]["train"]["abs"], np.abs(train_x).sum(), rtol=1e-4)
  np.testing.assert_allclose(got["sets"]["eval"]["abs"], np.abs(test_x).sum(), rtol=1e-4)
  want = fewshot.accuracies(train_x, train_y, test_x, test_y, num_classes=3, shots=(1, 3),
                            seeds=3, l2_reg=2.0 ** 10)
  want_knn = np.mean(knn.predict(train_x, train_y, test_x, num_classes=3, k=5) == test_y)
  assert got["pairs"]["fewshot/1shot"] == pytest.approx(want[1], abs=1e-6)
  assert got["pairs"]["fewshot/3shot"] == pytest.approx(want[3], abs=1e-6)
  assert got["pairs"]["knn/top1"] == pytest.approx(want_knn, abs=1e-6)


# ---------------------------------------------------------------- bad input, before any compile

def test_bad_inputs_are_clear_errors_before_compile(folder, tmp_path):
  one_class = tmp_path / "one"
  _write_folder(one_class, [4])
  cases = [
      (dict(dataset="bundled_photos"), "fewshot",
       r"config.evals.fewshot.dataset='bundled_photos' has no labels; the probes need labelled"),
      (dict(dataset="image_folder", folder=str(one_class)), "fewshot",
       r"config.evals.fewshot.dataset='image_folder': the image folder .* has 1 class folder"),
      (dict(dataset="image_folder", shots=(1, 6)), "fewshot",
       r"config.evals.fewshot.shots=\(1, 6\) asks for 6 examples per class but the smallest "
       r"class of the probe's train set \(13 images of .*\), 'class\d', has [345] examples"),
      (dict(dataset="image_folder", k=30), "knn",
       r"config.evals.knn.k=30 neighbours but the probe's train set .* has 13 examples"),
      (dict(eval_folder=str(one_class)), "knn", r"eval_folder.* must be the same class folders"),
  ]
  for fields, name, message in cases:
    config = _config(folder)
    config.evals[name].update(fields)
    config_check.check(config)  # the fields themselves are fine ...
    with pytest.raises(ValueError, match=message):  # ... the data cannot serve them
      pretrain.TASK.check(config)
  field_cases = [
      (("fewshot", "type", "svm"), r"config.evals.fewshot.type='svm': unknown evaluator "
       r"type; expected one of \('fewshot', 'knn', 'linear'\)"),
      (("fewshot", "shots", ()), r"config.evals.fewshot.shots must be a non-empty tuple"),
      (("knn", "pool", "max"), r"config.evals.knn.pool must be one of \('cls', 'mean'\)"),
      (("knn", "every_steps", -2), r"config.evals.knn.every_steps must be an int >= -1"),
      (("knn", "batch_size", 12), r"config.batch_size=12 is not divisible by the 8 data"),
  ]
  for (name, field, value), message in field_cases:
    config = _config(folder)
    config.mesh.data = 8
    with config.unlocked():
      config.evals[name][field] = value
    with pytest.raises(ValueError, match=message):
      config_check.check(config)
  config = _config(folder)
  with config.unlocked():
    config.evals.knn.shots = (1,)  # a few-shot field on a k-NN entry: a typo, not ignored
  with pytest.raises(ValueError, match=r"config.evals.knn \(knn\) has no field 'shots'"):
    config_check.check(config)


def test_cli_bad_probe_is_one_error_line_and_exit_2(folder, tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", f"--config=configs/tiny.py:{TINY_ARG}",
       f"--workdir={workdir}", "--config.data.dataset=image_folder",
       f"--config.data.folder={folder}", "--config.batch_size=8", "--config.mesh.data=1",
       "--config.evals.fewshot.dataset=image_folder", "--config.evals.fewshot.shots=(25,)"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert "config.evals.fewshot.shots=(25,) asks for 25 examples per class" in line, line
  assert "compiled" not in result.stdout and not workdir.exists()


def test_unlabelled_data_turn_the_probes_off_with_one_log_line(caplog):
  config = tiny.get_config(TINY_ARG)  # the bundled photos
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    pretrain.TASK.check(config)
    assert pretrain.TASK.evaluators(config) == []
  lines = [r.getMessage() for r in caplog.records if "probes" in r.getMessage()]
  assert lines == ["probes fewshot, knn off: config.data.dataset='bundled_photos' has no labels; "
                   "set config.evals.<name>.dataset to a labelled dataset (or every_steps=0 to "
                   "silence this)"]
  config.evals.fewshot.every_steps = config.evals.knn.every_steps = 0
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    assert pretrain.TASK.evaluators(config) == []
  assert not [r for r in caplog.records if "probes" in r.getMessage()]


# ---------------------------------------------------------------- in a real run, and afterwards

def _logged(workdir):
  (event_file,) = os.listdir(os.path.join(workdir, "tensorboard"))
  events = summaries.read_events(os.path.join(workdir, "tensorboard", event_file))
  return {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}


@pytest.fixture(scope="module")
def probed_run(folder, tmp_path_factory):
  """(workdir, config, log text) of a 4-step pre-training with the probes every 2 steps."""
  workdir = str(tmp_path_factory.mktemp("probed"))
  config = _config(folder)
  config.mesh.data = 2  # the feature passes run sharded over 2 devices
  log = logging.getLogger("mae_jax")
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  log.addHandler(handler)
  level, log.level = log.level, logging.INFO
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    log.removeHandler(handler)
    log.setLevel(level)
  return workdir, config, "\n".join(records)


def test_pretraining_logs_probes_in_the_log_and_tensorboard(probed_run):
  workdir, _, text = probed_run
  assert re.search(r"probe fewshot \(fewshot, 1/3-shot x 3 seeds, cls features\): train set 13 "
                   r"images of .*, eval set 11 images of .* \(held out\), 3 classes", text), text
  for step in (2, 4):
    assert re.search(rf"step {step}  fewshot/1shot [0-9.]+  fewshot/3shot [0-9.]+  knn/top1 "
                     rf"[0-9.]+  eval_seconds [0-9.]+s", text), text
  logged = _logged(workdir)
  for step in (2, 4):
    for tag in ("fewshot/1shot", "fewshot/3shot", "knn/top1"):
      assert 0.0 <= logged[(step, tag)] <= 1.0
    assert logged[(step, "eval_seconds")] > 0


def test_the_folder_is_listed_once_per_process(probed_run, folder):
  """Training, the epoch length, the checks and both probes' sets share one listing."""
  assert mae_data.sources.LISTINGS[folder] == 1


def _evaluate_cli(*args):
  return subprocess.run([sys.executable, "-m", "mae_jax.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _metrics(stdout):
  return {m.group(1): float(m.group(2))
          for m in re.finditer(r"^((?:fewshot|knn)/\w+) ([0-9.e-]+)$", stdout, re.M)}


def test_evaluate_cli_on_ours_official_and_hf_checkpoints(probed_run, tmp_path):
  """The same numbers as the run's last step, from our workdir, an official .pth and an HF
  directory of the same weights; one line per metric and a JSON file."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  from conftest import write_pth  # pylint: disable=import-outside-toplevel
  from mae_jax import api  # pylint: disable=import-outside-toplevel
  from mae_jax.weights import hf, keys  # pylint: disable=import-outside-toplevel
  workdir, config, _ = probed_run
  logged = _logged(workdir)
  want = {tag: logged[(4, tag)] for tag in ("fewshot/1shot", "fewshot/3shot", "knn/top1")}
  ours = _evaluate_cli(f"--checkpoint={workdir}", f"--out={tmp_path / 'ours.json'}")
  assert ours.returncode == 0, ours.stderr[-3000:]
  assert _metrics(ours.stdout) == pytest.approx(want, abs=1e-6)
  report = json.loads((tmp_path / "ours.json").read_text())
  assert report["step"] == 4 and report["metrics"] == pytest.approx(want, abs=1e-6)
  # the same weights as an official .pth and as an HF model directory
  state_dict = keys.official_state_dict(api.load(workdir).model)
  pth = write_pth(tmp_path / "mae.pth", state_dict)
  os.makedirs(tmp_path / "hf")
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in
                               hf.official_to_hf(state_dict).items()},
                              str(tmp_path / "hf" / "model.safetensors"))
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf.hf_config(
      model_lib.model_config(config.model))))
  for source in (pth, str(tmp_path / "hf")):  # in-process: what the CLI runs after parsing
    pairs = train.evaluate(_config(config.data.folder), source)
    assert dict(pairs) == pytest.approx(want, abs=1e-6), source
  # a bad probe through this CLI: one error line, exit 2
  bad = _evaluate_cli(f"--checkpoint={pth}", f"--config=configs/tiny.py:{TINY_ARG}",
                      "--config.evals.knn.type=svm")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: config.evals.knn.type='svm': unknown evaluator type")




def _reference_logistic(x, y, num_classes, l2_reg):
  """Written from the formula in float64: standardise with the train mean / std, then
  minimise mean softmax cross-entropy + l2 / 2 |W|^2 (bias free) with scipy's L-BFGS-B."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
  z = (x - mean) / std
  n, d = z.shape
  onehot = np.eye(num_classes)[y]

  def loss_and_grad(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = z @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(n), y])) + 0.5 * l2_reg * np.sum(w * w)
    g = (p - onehot) / n
    return loss, np.concatenate([(z.T @ g + l2_reg * w).ravel(), g.sum(axis=0)])

  res = optimize.minimize(loss_and_grad, np.zeros(d * num_classes + num_classes), jac=True,
                          method="L-BFGS-B", options=dict(maxiter=5000, gtol=1e-10, ftol=1e-15))
  w, b = res.x[:d * num_classes].reshape(d, num_classes), res.x[d * num_classes:]
  return res.fun, (lambda q: np.argmax(((q - mean) / std) @ w + b, axis=1))


def test_fast_linear_probe_equals_a_scipy_reference():
  from mae_jax.evaluators import logistic  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  classes, dim = 5, 12
  centres = rng.normal(size=(classes, dim)) * 1.5
  y = rng.integers(0, classes, 400)
  x = centres[y] + rng.normal(size=(400, dim)) * 2.0 + 3.0
  test_y = rng.integers(0, classes, 300)
  test_x = centres[test_y] + rng.normal(size=(300, dim)) * 2.0 + 3.0
  for l2 in (1e-2, 1e-4):
    want_loss, reference = _reference_logistic(x, y, classes, l2)
    probe = logistic.fit(x, y, classes, l2, steps=300)
    assert abs(probe[3] - want_loss) < 1e-4 * max(1.0, want_loss), (probe[3], want_loss)
    got = logistic.predict(probe, test_x)
    assert np.mean(got != reference(test_x)) <= 1 / 300  # at most one tie-level disagreement
    assert 1 / classes < np.mean(got == test_y) < 1.0
