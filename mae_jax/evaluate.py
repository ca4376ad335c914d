r"""Run a config's evaluators on any checkpoint: one line per metric, and a JSON file.

  python -m mae_jax.evaluate --checkpoint=WORKDIR            # ours: its own config
  python -m mae_jax.evaluate --checkpoint=mae_pretrain_vit_base.pth \
      --config=configs/vit_b.py --config.data.dataset=imagenet2012 --config.data.data_dir=DIR
  python -m mae_jax.evaluate --random_init --config=configs/fmnist_pretrain.py  # a run's step 0

--checkpoint is anything `mae_jax.load` / `config.init_from` accepts: one of our workdirs or
step directories, an official `.pth` or an HF file. A pre-training config runs its probes
(`config.evals`: few-shot, k-NN), a classification config its accuracy; `--config.<field>=...`
overrides as for `mae_jax.main`, e.g. `--config.evals.knn.k=10`. Writes --out (JSON:
checkpoint, step, config, metrics) to compare checkpoints or runs side by side.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mae_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (with its `:arg` string; fields overridable with "
    "--config.<field>=value); default: the config saved in an mae_jax --checkpoint.",
    lock_config=True)
flags.DEFINE_string("checkpoint", None, "an mae_jax workdir / step directory, an official "
                    ".pth or an HF weights file / directory")
flags.DEFINE_integer("step", None, "checkpoint step of an mae_jax workdir (default latest)")
flags.DEFINE_bool("random_init", False, "evaluate the freshly initialised model of --config "
                  "(the state a run with its seed starts from) instead of a --checkpoint")
flags.DEFINE_string("out", "evals.json", "the JSON file written")


def _config_and_source():
  """(config, source, step) from the flags; user errors name the flag."""
  from mae_jax import checkpointing, train  # pylint: disable=import-outside-toplevel
  from mae_jax.weights import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if FLAGS.random_init == bool(FLAGS.checkpoint):
    raise ValueError("give one of --checkpoint=PATH or --random_init (with --config)")
  if FLAGS.random_init:
    if FLAGS.config is None:
      raise ValueError("--random_init needs --config")
    return FLAGS.config, train.RANDOM_INIT, 0
  source = FLAGS.checkpoint
  if not os.path.exists(source):
    raise FileNotFoundError(f"--checkpoint={source} does not exist")
  if not workdir_lib.is_our_checkpoint(source):
    if FLAGS.config is None:
      raise ValueError(f"--checkpoint={source} is not an mae_jax checkpoint, so it has no "
                       "config: give --config (its model section must match the file)")
    return FLAGS.config, source, None
  workdir, step = checkpointing.resolve_checkpoint(source, FLAGS.step)
  step = checkpointing.latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"--checkpoint={source} holds no complete checkpoint")
  config = FLAGS.config
  if config is None:
    config = checkpointing.restore(workdir, step)[0]["config"]
  return config, source, step


def main(argv):
  """Evaluate, print one line per metric, write --out."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log = cli.setup_logging()
  from mae_jax import atomic, config_check, train  # pylint: disable=import-outside-toplevel
  try:
    config, source, step = _config_and_source()
    restore = source if source != train.RANDOM_INIT else None
    config_check.check(config, restore=restore)  # before any compile
    pairs = train.evaluate(config, source, step)
  except cli.USER_ERRORS as e:
    cli.user_error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
  metrics = dict(pairs)
  given = [a for a in sys.argv[1:] if a.startswith("--config")]
  report = {"checkpoint": ("random init" if source == train.RANDOM_INIT
                           else os.path.abspath(source)),
            "step": step, "config": given or "saved with the checkpoint", "metrics": metrics}
  with atomic.AtomicOutput(FLAGS.out, overwrite=True, is_dir=False) as tmp:
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
  log.info("wrote %s", FLAGS.out)


def run():
  cli.setup_logging()
  app.run(main, flags_parser=lambda argv: cli.parse_absl_flags(argv, FLAGS,
                                                               config_required=False))


if __name__ == "__main__":
  run()
