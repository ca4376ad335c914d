r"""Command line: `python -m mae_jax.main --config=configs/tiny.py --workdir=/tmp/mae`.

Flags only and platform set-up; the work is in `mae_jax.train`. A run resumes
automatically from the latest complete checkpoint in --workdir.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from mae_jax import cli, preload
from mae_jax.cli import setup_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vit_b.py or configs/vit_l.py:decoder_depth=1; "
    "fields can be overridden with --config.<field>=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, TensorBoard "
                    "events and pictures; a run resumes from its latest checkpoint.")
flags.DEFINE_string("restore", None, "Initialise from this workdir or checkpoint step directory "
                    "(`.../checkpoints/<step>`), or from weights without optimizer state (a "
                    "converted workdir, an official / HF file: a fresh optimizer starts), when "
                    "--workdir has no checkpoint yet.")
flags.DEFINE_bool("allow_config_change", False, "Resume even though the config differs from "
                  "the checkpoint's in fields that define the run (batch, seed, model, data, "
                  "schedule); harmless changes (log intervals, ...) are always allowed.")
flags.DEFINE_bool("eval_only", False, "Evaluate and exit: the checkpoint --restore names, else "
                  "--config.init_from (ours, or an official fine-tuned / linear-probe .pth); "
                  "prints one line per metric. --workdir is not written.")
flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize(). Default: only when a "
                  "multi-process environment is detected (Cloud TPU pod, SLURM with >1 task, "
                  "JAX_COORDINATOR_ADDRESS set).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host only; "
                    "auto-detected on Cloud TPU and SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host only).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host only).")
flags.mark_flags_as_required(["config", "workdir"])


def multihost_detected(environ=os.environ):
  """True in environments that run one process per host."""
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --help is instant

  multihost = FLAGS.multihost if FLAGS.multihost is not None else multihost_detected()
  if multihost:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  log = setup_logging(jax.process_index() == 0)
  from mae_jax import config_check, train  # pylint: disable=import-outside-toplevel
  log.info("JAX %s, process %d of %d, %d local / %d global devices (%s)", jax.__version__,
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count(), jax.devices()[0].device_kind)
  log.info("%s", preload.allocator())
  log.info("config:\n%s", FLAGS.config)
  try:
    if FLAGS.eval_only:
      config_check.check(FLAGS.config, restore=FLAGS.restore)  # before any compile
      train.evaluate(FLAGS.config, FLAGS.restore)
      return
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, restore_from=FLAGS.restore,
                             allow_config_change=FLAGS.allow_config_change)
  except cli.USER_ERRORS as e:
    cli.user_error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))


def parse_flags(argv):
  """absl's flag parsing; a bad flag or a --config file that fails to load is one `error:` line."""
  return cli.parse_absl_flags(argv, FLAGS)


def run():
  setup_logging()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  preload.reexec_with_tcmalloc()  # same command, same pid, tcmalloc where installed
  run()
