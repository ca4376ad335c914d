"""Every config field checked up front, before anything compiles or touches the workdir.

`check(config)` is what `mae_jax.main` runs first: the type, range or choices of each field
in `FIELDS` (pre-training and classification), then the checks that live beside what they
check (`tasks.get`, `model.model_config`, `classifier.classifier_config`, the mesh and the
batch split), the probes of `config.evals` (`EVAL_FIELDS`, by type), then that
`config.init_from` / `--restore` exist. The data themselves (an image folder's images, a TFDS
dataset and split, the crop mode, the probes' labels) are checked by the task's `check`, also
before any compile. Fields the table does not know (a later feature's) pass unchecked;
fields a config lacks are skipped.

`load_error` turns a bad flag or a `--config` file that does not load into one line.
"""

import numbers
import os
import traceback

from mae_jax import classifier, errors, evaluators, sharding, tasks
from mae_jax import model as model_lib

DTYPES = ("float32", "bfloat16", "float16", "auto")  # compute dtypes; parameters stay float32
WEIGHTS = "an mae_jax workdir / step directory, an official .pth or an HF weights file"


def _int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _pair(v, item=_number):
  return isinstance(v, (tuple, list)) and len(v) == 2 and all(map(item, v))


# (expected, test) of a value; the message is `config.<field> must be <expected>, got <value>`.
INT = ("an int", _int)
POSITIVE_INT = ("a positive int", lambda v: _int(v) and v > 0)
COUNT = ("an int >= 0", lambda v: _int(v) and v >= 0)
AUTO = ("an int >= -1", lambda v: _int(v) and v >= -1)  # -1: from epochs / all blocks
EVERY = ("a positive int or -1 (off)", lambda v: _int(v) and (v > 0 or v == -1))
NUMBER = ("a number", _number)
NON_NEGATIVE = ("a number >= 0", lambda v: _number(v) and v >= 0)
POSITIVE = ("a number > 0", lambda v: _number(v) and v > 0)
PROBABILITY = ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
BELOW_ONE = ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
FRACTION = ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1)
BOOL = ("True or False", lambda v: isinstance(v, bool))
STR = ("a string", lambda v: isinstance(v, str))
NAME = ("a non-empty string", lambda v: isinstance(v, str) and bool(v))
IMG_SIZE = ("a positive int or a pair (H, W) of them",
            lambda v: _int(v) and v > 0 or _pair(v, _int) and min(v) > 0)
SCALE = ("a pair (min, max) with 0 < min <= max <= 1", lambda v: _pair(v) and 0 < v[0] <= v[1] <= 1)
RATIO = ("a pair (min, max) with 0 < min <= max", lambda v: _pair(v) and 0 < v[0] <= v[1])
RULES = (f"pairs (logical axis, one of {sharding.MESH_AXES} or None)",
         lambda v: isinstance(v, (tuple, list)) and all(
             _pair(r, lambda x: x is None or isinstance(x, str)) and isinstance(r[0], str)
             and r[1] in (*sharding.MESH_AXES, None) for r in v))

# Ranges that live with their owner are not repeated here: mask_ratio, the sampler and the
# width / head divisibility (model.model_config), classifier pool / head / drop_path
# (classifier.classifier_config), mesh sizes (sharding.mesh_shape), the crop mode, data
# source and finetune optimizer (the task's check).
FIELDS = {
    "task": NAME, "batch_size": POSITIVE_INT, "epochs": COUNT, "warmup_epochs": COUNT,
    "total_steps": EVERY, "warmup_steps": AUTO, "base_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE, "b1": BELOW_ONE, "b2": BELOW_ONE, "seed": INT,
    "stop_after_steps": EVERY, "nan_patience": COUNT, "max_rollbacks": COUNT,
    "peak_tflops": NON_NEGATIVE,
    "log_every": POSITIVE_INT, "image_every": EVERY, "eval_every": EVERY,
    "num_preview_images": POSITIVE_INT, "init_from": STR,
    # every_steps -1: only at the end and on preemption
    "checkpoint.every_steps": EVERY, "checkpoint.keep": POSITIVE_INT,
    "checkpoint.keep_period": EVERY, "checkpoint.async_save": BOOL,
    "mesh.data": INT, "mesh.fsdp": INT, "mesh.tensor": INT, "mesh.rules": RULES,
    "model.img_size": IMG_SIZE, "model.patch_size": POSITIVE_INT, "model.in_chans": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT, "model.depth": POSITIVE_INT, "model.num_heads": POSITIVE_INT,
    "model.decoder_embed_dim": POSITIVE_INT, "model.decoder_depth": COUNT,
    "model.decoder_num_heads": POSITIVE_INT, "model.mlp_ratio": POSITIVE,
    "model.norm_pix_loss": BOOL, "model.mask_ratio": NUMBER, "model.mask_sampler": STR,
    "model.mask_tokens_in_encoder": BOOL,
    "model.attention": (f"one of {model_lib.ATTENTION}", model_lib.ATTENTION.__contains__),
    "model.remat": (f"one of {tuple(model_lib.REMAT)}", model_lib.REMAT.__contains__),
    "model.scan": BOOL,
    "accum_steps": POSITIVE_INT, "model.dtype": (f"one of {DTYPES}", DTYPES.__contains__),
    "data.dataset": NAME, "data.num_train_examples": INT, "data.data_dir": STR,
    "data.manual_dir": STR, "data.file_format": STR, "data.folder": STR, "data.eval_folder": STR, "data.split": NAME,
    "data.arrays": STR, "data.labels": STR, "data.eval_arrays": STR, "data.eval_labels": STR,
    "data.per_class": COUNT,
    "data.eval_split": NAME, "data.crop": STR, "data.crop_scale": SCALE, "data.crop_ratio": RATIO,
    "data.eval_crop": FRACTION,
    "data.hflip": BOOL, "data.antialias": BOOL, "data.color_jitter": PROBABILITY,
    "data.rand_augment_ops": COUNT, "data.rand_augment_magnitude": NON_NEGATIVE,
    "data.rand_augment_std": NON_NEGATIVE, "data.random_erasing": PROBABILITY,
    "data.ship_uint8": BOOL, "data.shuffle_buffer": COUNT, "data.num_parallel_calls": EVERY,
    "classifier.num_classes": INT, "classifier.pool": STR, "classifier.head": STR,
    "classifier.drop_path": NUMBER, "classifier.head_init_std": NON_NEGATIVE,
    "finetune.optimizer": STR, "finetune.trainable_blocks": AUTO,
    "finetune.layer_decay": FRACTION,
    "finetune.train_final_norm": BOOL, "finetune.mixup": NON_NEGATIVE,
    "finetune.cutmix": NON_NEGATIVE, "finetune.mixup_switch_prob": PROBABILITY,
    "finetune.mixup_prob": PROBABILITY, "finetune.label_smoothing": BELOW_ONE,
}

# The fields of one probe `config.evals.<name>` (mae_jax/evaluators), by its type; an entry's
# unknown field is an error (a typo would otherwise silently keep the default).
_EVAL_COMMON = {
    "type": (f"one of {tuple(sorted(evaluators.TYPES))}", evaluators.TYPES.__contains__),
    "every_steps": ("an int >= -1 (N: every N steps, -1: only at the end, 0: off)",
                    lambda v: _int(v) and v >= -1),
    "dataset": STR, "folder": STR, "eval_folder": STR, "train_split": STR, "eval_split": STR,
    "train_examples": POSITIVE_INT, "eval_examples": POSITIVE_INT,
    "pool": (f"one of {evaluators.POOLS}", evaluators.POOLS.__contains__),
    "batch_size": ("a positive int or -1 (config.batch_size)",
                   lambda v: _int(v) and (v > 0 or v == -1)),
    "seed": INT,
}
EVAL_FIELDS = {
    "fewshot": {**_EVAL_COMMON, "shots": (
        "a non-empty tuple of positive ints", lambda v: isinstance(v, (tuple, list)) and bool(v)
        and all(_int(k) and k > 0 for k in v)), "seeds": POSITIVE_INT, "l2_reg": POSITIVE},
    "knn": {**_EVAL_COMMON, "k": POSITIVE_INT, "temperature": POSITIVE},
    "linear": {**_EVAL_COMMON, "l2_reg": NON_NEGATIVE, "steps": POSITIVE_INT},
}

_MISSING = object()


def _get(config, path):
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def check_fields(config, fields=None, prefix=""):
  """ValueError naming the first field of `fields` (default FIELDS) that is out of range."""
  for path, (expected, ok) in (fields or FIELDS).items():
    value = _get(config, path)
    if value is not _MISSING and not ok(value):
      raise ValueError(f"config.{prefix}{path} must be {expected}, got {value!r}")


def check_evals(config):
  """Each `config.evals.<name>`: a known type, its fields in range, no unknown field."""
  evals = config.get("evals") or {}
  for name in evals:
    entry = evals[name]
    if not hasattr(entry, "keys"):
      raise ValueError(f"config.evals.{name} must be a dict(type=..., ...), got {entry!r}")
    kind = entry.get("type")
    if kind not in EVAL_FIELDS:
      raise ValueError(f"config.evals.{name}.type={kind!r}: unknown evaluator type; expected "
                       f"one of {tuple(sorted(EVAL_FIELDS))}")
    fields = EVAL_FIELDS[kind]
    unknown = sorted(set(entry) - set(fields))
    if unknown:
      raise ValueError(f"config.evals.{name} ({kind}) has no field {unknown[0]!r}; its fields: "
                       f"{', '.join(sorted(fields))}")
    check_fields(entry, fields, prefix=f"evals.{name}.")
    if entry.get("batch_size", -1) > 0:
      sharding.check_batch(entry.batch_size, sharding.make_mesh(config.mesh))


def _check_exists(name, path, expected):
  if path and "://" not in path and not os.path.exists(path):
    raise FileNotFoundError(f"{name}={path} does not exist; expected {expected}")


def check(config, *, restore=None):
  """Validate every known field of `config` (and the `--restore` path); errors name the field.

  Raises ValueError / FileNotFoundError before anything is compiled or written.
  """
  tasks.get(config)
  check_fields(config)
  model_lib.model_config(config.model)
  if "classifier" in config:
    values = config.classifier.to_dict()
    if values.get("num_classes", 2) <= 0:  # from the dataset: the task's check fills it in
      values["num_classes"] = 2
    classifier.classifier_config(values)
  sharding.check_batch(config.batch_size, sharding.make_mesh(config.mesh))
  check_evals(config)
  _check_exists("config.init_from", config.get("init_from", ""), WEIGHTS)
  _check_exists("--restore", restore, WEIGHTS)


def _cause(error):
  """The error under absl's and config_flags' wrappers (the one the config file raised)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  while (isinstance(error, flags.Error) or str(error).startswith("Error whilst parsing")
         or str(error).startswith("Configuration is not available")) and (
             error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  return error


def _in_configs(path):
  """True for a file of the `configs` package (its deliberate errors are user errors)."""
  import configs  # pylint: disable=import-outside-toplevel
  return os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(
      configs.__file__))


def config_file(argv):
  """The --config file named in `argv` (without its `:arg` string), else None."""
  file = None
  for i, arg in enumerate(argv):
    if arg.lstrip("-") == "config" and i + 1 < len(argv):
      file = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      file = arg.split("=", 1)[1]
  return file.split(":", 1)[0] if file else None


def load_error(error, argv):
  """The one-line message for `error` raised while parsing the command line `argv` or loading
  its --config file; None when it is a bug that should keep its traceback.

  User errors: absl's own (a bad flag value, a missing or unknown flag), a --config.<field>
  the config lacks, a --config file that does not exist, a syntax error in it, any exception
  raised by its own lines, a value of the wrong type (ml_collections' check), and the
  deliberate errors (KeyError, ValueError, ...) raised in `configs/` (a config string's
  unknown key: `configs/vit_b.py:batch=...`). Anything raised deeper, in code a config calls,
  keeps its traceback.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  cause, file = _cause(error), config_file(argv)
  if isinstance(error, OSError) and file and not os.path.isfile(file):
    return f"--config={file}: no such file (relative to {os.getcwd()})"
  own = lambda f: bool(file) and os.path.abspath(f) == os.path.abspath(file)
  frames = traceback.extract_tb(cause.__traceback__)
  where = frames[-1].filename if frames else ""  # where `cause` was raised
  text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
  text = text if isinstance(cause, errors.USER_ERRORS) else f"{type(cause).__name__}: {text}"
  if isinstance(cause, SyntaxError) and own(cause.filename or ""):
    return f"--config={file}: line {cause.lineno}: SyntaxError: {cause.msg}"
  if own(where):
    return f"--config={file}: line {frames[-1].lineno}: {text}"
  if isinstance(cause, (AttributeError, KeyError)) and any(f.filename.endswith(os.path.join(
      "config_flags", "config_path.py")) for f in frames):  # --config.<no such field>=...
    name = str(cause.args[0] if cause.args else cause).strip("\"'")
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    flag = next((a for a in given if name in a.split(".")), "--config.<field>")
    return f"{flag}: {file} has no field {name!r}"
  loading = not isinstance(error, flags.Error) or "Error whilst parsing config file" in str(error)
  if not loading:
    return str(error).splitlines()[0]
  if (_in_configs(where) and isinstance(cause, errors.USER_ERRORS)
      or f"{os.sep}ml_collections{os.sep}" in where):
    prefix = str(error).split(": ", 1)[0] if isinstance(error, flags.Error) else f"--config={file}"
    return f"{prefix}: {text}"
  return None
