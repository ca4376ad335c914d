"""User mistakes on the command line: one `error:` line, exit 2, no traceback, workdir untouched.

Most cases run in-process through what `mae_jax.main` runs (absl's flag parsing of
`--config`, then `config_check.load_error` / `config_check.check`); a few run the real
`python -m mae_jax.main` end to end.
"""

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from mae_jax import cli, config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/tiny.py"
FINETUNE = "--config=configs/finetune_vit_b.py"


def _error(argv, restore=None):
  """The message main.py prints for `argv` (flags after the program name), or None if none."""
  argv = ["mae_jax.main", *argv]
  values = flags.FlagValues()  # not the global FLAGS: nothing of main.py's state changes
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  try:
    values(argv)
    config = values.config
    config.get("task")
  except Exception as e:  # pylint: disable=broad-except
    message = config_check.load_error(e, argv)
    if message is None:
      raise
    return message
  try:
    config_check.check(config, restore=restore)
  except cli.USER_ERRORS as e:
    return e.args[0] if isinstance(e, KeyError) else str(e)
  return None


@pytest.mark.parametrize("argv,message", [
    ((TINY, "--config.batch_size=0"), "config.batch_size must be a positive int, got 0"),
    ((TINY, "--config.batch_size=-8"), "config.batch_size must be a positive int, got -8"),
    ((TINY, "--config.batch_size=12"),
     r"config.batch_size=12 is not divisible by the 8 data shards"),
    ((TINY, "--config.log_every=0"), "config.log_every must be a positive int, got 0"),
    ((TINY, "--config.image_every=0"),
     r"config.image_every must be a positive int or -1 \(off\), got 0"),
    ((TINY, "--config.nan_patience=-1"), "config.nan_patience must be an int >= 0, got -1"),
    ((TINY, "--config.checkpoint.every_steps=0"),
     r"config.checkpoint.every_steps must be a positive int or -1 \(off\), got 0"),
    ((TINY, "--config.checkpoint.keep=0"), "config.checkpoint.keep must be a positive int, got 0"),
    ((TINY, "--config.base_lr=-1"), "config.base_lr must be a number >= 0, got -1.0"),
    ((TINY, "--config.weight_decay=-0.1"), "config.weight_decay must be a number >= 0, got -0.1"),
    ((TINY, "--config.b2=1"), r"config.b2 must be a number in \[0, 1\), got 1.0"),
    ((TINY, "--config.model.dtype=bf16"),
     r"config.model.dtype must be one of \('float32', 'bfloat16', 'float16', 'auto'\), got 'bf16'"),
    ((TINY, "--config.model.dtype=float64"), "config.model.dtype must be one of .* got 'float64'"),
    ((TINY, "--config.model.depth=0"), "config.model.depth must be a positive int, got 0"),
    ((TINY, "--config.model.mask_ratio=1.5"), r"mask_ratio must be in \(0, 1\), got 1.5"),
    ((TINY, "--config.model.mask_ratio=0"), r"mask_ratio must be in \(0, 1\), got 0.0"),
    ((TINY, "--config.model.mask_sampler=blocks"), "config.model.mask_sampler='blocks'; expected"),
    ((TINY, "--config.model.img_size=60"), "img_size=60 is not divisible by model.patch_size=8"),
    ((TINY, "--config.data.crop_scale=(1.0,0.2)"),
     (r"config.data.crop_scale must be a pair \(min, max\) with 0 < min <= max <= 1, got "
      r"\(1.0, 0.2\)")),
    ((TINY, "--config.data.crop_scale=(0,0.5)"), r"crop_scale must be .* got \(0, 0.5\)"),
    ((TINY, "--config.data.crop_ratio=(0.75,)"), r"crop_ratio must be a pair .* got \(0.75,\)"),
    ((TINY, "--config.data.eval_crop=1.2"), r"config.data.eval_crop must be a number in \(0, 1\]"),
    ((TINY, "--config.data.random_erasing=1.5"), r"random_erasing must be a number in \[0, 1\]"),
    ((TINY, "--config.data.color_jitter=-0.4"), r"color_jitter must be a number in \[0, 1\]"),
    ((TINY, "--config.data.num_parallel_calls=0"), "num_parallel_calls must be a positive int or"),
    ((TINY, "--config.mesh.fsdp=3"), r"8 devices cannot be split into groups of 3"),
    ((TINY, "--config.task=pretrian"),
     r"config.task='pretrian'; expected one of \['classify', 'pretrain'\]"),
    ((TINY, "--config.batch_size=abc"),
     r"^flag --config.batch_size=abc: invalid literal for int\(\) with base 10: 'abc'$"),
    ((TINY, "--config.data.hflip=maybe"), "^flag --config.data.hflip=maybe: .*Non-boolean"),
    ((TINY, "--config.init_from=w"), "^--config.init_from: configs/tiny.py has no field 'init_"),
    ((TINY, "--config.nope.deeper=1"), "^--config.nope.deeper: configs/tiny.py has no field"),
    (("--config=configs/tiny.py:batch_size=abc",),
     (r"^flag --config=configs/tiny.py:batch_size=abc: TypeError: Could not override field "
      "'batch_size'.*cannot be casted to type <class 'int'>")),
    (("--config=configs/tiny.py:nosuch=1",),
     r"^--config=configs/tiny.py: config argument 'nosuch': no field 'nosuch'"),
    (("--config=configs/nope.py",), r"^--config=configs/nope.py: no such file \(relative to "),
    (("--config=configs/nope.py", "--config.batch_size=8"), "^--config=configs/nope.py: no such"),
    ((FINETUNE, "--config.classifier.pool=max"), r"config.classifier.pool='max'; expected one of"),
    ((FINETUNE, "--config.classifier.num_classes=1"), "classifier.num_classes=1 must be >= 2"),
    ((FINETUNE, "--config.classifier.drop_path=1.0"), r"drop_path=1.0 must be in \[0, 1\)"),
    ((FINETUNE, "--config.finetune.label_smoothing=1.0"),
     r"label_smoothing must be a number in \[0, 1\), got 1.0"),
    ((FINETUNE, "--config.finetune.layer_decay=0"), r"layer_decay must be a number in \(0, 1\]"),
    ((FINETUNE, "--config.finetune.trainable_blocks=-2"), "trainable_blocks must be an int >= -1"),
    ((FINETUNE, "--config.init_from=/nonexistent/mae.pth"),
     "^config.init_from=/nonexistent/mae.pth does not exist; expected an mae_jax workdir"),
])
def test_bad_input_is_one_clear_error(argv, message):
  got = _error(argv)
  assert got is not None and re.search(message, got), got
  assert "\n" not in got


def test_bad_restore_path_is_a_clear_error():
  assert _error([TINY], restore="/nonexistent/run").startswith(
      "--restore=/nonexistent/run does not exist; expected an mae_jax workdir")


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n  pass\n", r"^--config=\S+bad.py: line 1: SyntaxError: invalid syntax$"),
    ("def get_config():\n  x = 1\n  return x / 0\n",
     r"^--config=\S+bad.py: line 3: ZeroDivisionError: division by zero$"),
    (("from configs import base\ndef get_config():\n  c = base.get_config()\n"
      "  c.batch_size = '32'\n  return c\n"),
     r"^flag --config=\S+bad.py: TypeError: Could not override field 'batch_size'"),
    ("def get_config():\n  raise ValueError('set data.folder')\n",
     r"^--config=\S+bad.py: line 2: set data.folder$"),
    ("def get_config():\n  return open('/nonexistent/fields.json')\n",
     r"^--config=\S+bad.py: line 2: \[Errno 2\] No such file or directory: '/nonexistent/"),
])
def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, source, message):
  (tmp_path / "bad.py").write_text(source)
  got = _error([f"--config={tmp_path / 'bad.py'}"])
  assert re.search(message, got), got


def test_a_bug_under_the_config_file_keeps_its_traceback(tmp_path):
  """An exception raised in code the config calls (not the file's own lines) is not hidden."""
  (tmp_path / "helper.py").write_text("def key():\n  return {}['oops']\n"
                                      "def attr():\n  return None.nope\n"
                                      "def typ():\n  return None + 1\n")
  # config_flags re-raises a TypeError as absl's flag error, with the original as its context
  for kind, error in (("key", KeyError), ("attr", AttributeError), ("typ", flags.Error)):
    (tmp_path / f"{kind}.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport helper\n"
        f"def get_config():\n  return helper.{kind}()\n")
    with pytest.raises(error):
      _error([f"--config={tmp_path / kind}.py"])


def test_fields_unknown_to_the_table_pass_and_new_ones_are_checked_when_present(tiny_config):
  tiny_config.some_later_feature = -5  # not in FIELDS: not checked
  config_check.check(tiny_config)
  tiny_config.max_rollbacks = -1  # in FIELDS, absent from configs/base.py today
  with pytest.raises(ValueError, match=r"config.max_rollbacks must be an int >= 0, got -1"):
    config_check.check(tiny_config)


def test_wrong_types_in_a_config_file_are_named(tiny_config):
  for path, value, message in [
      ("batch_size", 32.0, "config.batch_size must be a positive int, got 32.0"),
      ("log_every", True, "config.log_every must be a positive int, got True"),
      ("base_lr", "1e-3", "config.base_lr must be a number >= 0, got '1e-3'"),
      ("data.hflip", 1, "config.data.hflip must be True or False, got 1"),
      ("model.img_size", (64,), r"config.model.img_size must be a positive int or a pair"),
      ("mesh.rules", (("embed", "fsdpp"),), r"config.mesh.rules must be pairs \(logical axis")]:
    config = tiny_config.copy_and_resolve_references()
    config = type(config)(config.to_dict(), type_safe=False)
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
      config_check.check_fields(config)


CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs",
                                                                            "*.py")))


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if n not in ("__init__",
                                                                       "classify_base")])
def test_every_config_file_passes_the_check(name):
  config_check.check(importlib.import_module(f"configs.{name}").get_config())


# End to end: the real command, a fresh workdir that must not appear, or an existing run that
# must stay byte-for-byte as it was.
def _snapshot(root):
  """{path: (size, mtime)} of every file and folder under `root` (a new entry changes a
  folder's mtime)."""
  return {os.path.relpath(path, root): (s.st_size, s.st_mtime_ns)
          for d, dirs, files in os.walk(root) for path in [d] + [os.path.join(d, f) for f in files]
          for s in [os.stat(path)]}


@pytest.mark.parametrize("args,message", [
    (("--config=configs/nope.py",), r"--config=configs/nope.py: no such file"),
    ((TINY, "--config.batch_size=0"), "config.batch_size must be a positive int, got 0"),
    ((TINY, "--config.data.dataset=image_folder", "--config.data.folder={empty}"),
     r"config.data.folder=\S+empty holds no images \(0 class folders found\)"),
    ((TINY, "--config.data.dataset=arrays", "--config.data.arrays={empty}/images.npy"),
     r"config.data.arrays=\S+images.npy does not exist; expected uint8 images"),
    ((TINY, "--config.log_every=0", "--workdir={run}"),
     "config.log_every must be a positive int, got 0"),
    ((TINY, "--config.model.dtype=bf16", "--eval_only", "--restore={run}", "--workdir={run}"),
     r"config.model.dtype must be one of \('float32', 'bfloat16', 'float16', 'auto'\), got 'bf16'"),
])
def test_cli_bad_input_one_error_line_exit_2_workdir_untouched(tmp_path, args, message):
  empty, run = tmp_path / "empty", tmp_path / "run"
  empty.mkdir()
  (run / "checkpoints" / "6").mkdir(parents=True)  # what a run leaves, as far as files go
  for name, text in (("checkpoints/6/_CHECKPOINT_METADATA", "{}"), ("tensorboard/events", "x"),
                     ("reconstructions.png", "png")):
    os.makedirs(os.path.dirname(run / name), exist_ok=True)
    (run / name).write_text(text)
  before = _snapshot(run)
  args = [a.format(empty=empty, run=run) for a in args]
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp_path / 'new'}")
  result = subprocess.run([sys.executable, "-m", "mae_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), lines[-1]
  assert "Traceback" not in result.stderr + result.stdout
  assert "compiled" not in result.stdout
  assert not (tmp_path / "new").exists()
  assert _snapshot(run) == before
