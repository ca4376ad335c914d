r"""Command line: `python -m mae_jax.main --config=configs/tiny.py --workdir=/tmp/mae`.

Flags: --config (a config file, optionally `:arg`, plus `--config.<field>=value`
overrides) and --workdir (checkpoints, TensorBoard events, pictures).
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vit_b.py or configs/vit_l.py:decoder_depth=1.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --help is instant

  from mae_jax import train
  log = logging.getLogger("mae_jax")
  log.info("JAX %s, %d process(es), devices: %s", jax.__version__, jax.process_count(),
               jax.devices())
  log.info("config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def setup_logging():
  """Our progress lines to stdout; library INFO chatter (Orbax, absl) silenced."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("mae_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def run():
  setup_logging()
  app.run(main)


if __name__ == "__main__":
  run()
