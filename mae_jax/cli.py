"""What every command-line tool shares: checkpoint / model flags and the user-error contract.

A user error (a missing file, a bad flag value, a checkpoint that does not match) is
printed as one `error: ...` line naming the flag or file, with exit status 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

import argparse
import logging
import sys

from mae_jax.errors import USER_ERRORS  # noqa: F401  (re-exported: cli.USER_ERRORS)

USER_ERROR_EXIT = 2  # as argparse and absl do for a bad command line
MODEL_FIELDS = ("img_size", "num_heads", "decoder_embed_dim", "decoder_depth",
                "decoder_num_heads", "norm_pix_loss")


def _img_size(text):
  """'224' -> 224, '224,320' -> (224, 320)."""
  values = tuple(int(v) for v in text.split(","))
  return values[0] if len(values) == 1 else values


def _bool(text):
  """An explicit true / false flag value."""
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_model_flags(parser):
  """Flags for what a PyTorch file does not store (or to override what it implies)."""
  group = parser.add_argument_group("model fields for official / HF files (inferred if unset)")
  group.add_argument("--img_size", type=_img_size, help="H or H,W (default: from pos_embed)")
  group.add_argument("--num_heads", type=int, help="encoder heads (default: paper size, else D/64)")
  group.add_argument("--decoder_embed_dim", type=int,
                     help="decoder width for files without one (default 512)")
  group.add_argument("--decoder_depth", type=int,
                     help="decoder depth for files without one (default 8)")
  group.add_argument("--decoder_num_heads", type=int,
                     help="decoder heads (default 16 at width 512, else width/32)")
  group.add_argument("--norm_pix_loss", type=_bool,
                     help="true|false: targets were per-patch normalised (default true; "
                          "false for the official mae_visualize_*.pth)")
  group.add_argument("--init_seed", type=int, default=0,
                     help="initialisation of weights the file lacks (e.g. a decoder)")


def add_checkpoint_flags(parser, what):
  """--checkpoint (`what` it may be), --step and the model flags, for tools that read a model."""
  parser.add_argument("--checkpoint", required=True,
                      help=f"an mae_jax workdir / step directory, or {what}")
  parser.add_argument("--step", type=int, help="checkpoint step (default latest)")
  add_model_flags(parser)


def load_from_flags(args, require_decoder=False):
  """The `Pretrained` that --checkpoint, --step and the model flags name."""
  from mae_jax import api  # pylint: disable=import-outside-toplevel  # keeps `--help` instant
  return api.load_any(args.checkpoint, step=args.step, require_decoder=require_decoder,
                      **model_overrides(args))


def model_overrides(args):
  """The model fields given on the command line (None where unset) and the init seed."""
  return dict({n: getattr(args, n) for n in MODEL_FIELDS}, seed=args.init_seed)


def setup_logging(is_chief=True):
  """Our progress lines to stdout (process 0 only); library INFO chatter silenced."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("mae_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO if is_chief else logging.WARNING)
  log.propagate = False
  return log


def parse_absl_flags(argv, values, config_required=True):
  """absl's parsing of `values` (a FlagValues with a `config` file flag); a bad flag or a
  --config file that fails to load is one `error:` line."""
  try:
    remaining = values(argv)
    if config_required or values.config is not None:
      values.config.get("task")  # a --config that failed to load raises here
    return remaining
  except Exception as e:  # pylint: disable=broad-except
    from mae_jax import config_check  # pylint: disable=import-outside-toplevel
    message = config_check.load_error(e, argv)
    if message is None:
      raise
    user_error(message)


def user_error(message):
  """Print the one-line user error and exit with `USER_ERROR_EXIT`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_EXIT)


def run_cli(main, argv):
  """Run `main(argv)`; user errors become one 'error: ...' line and a non-zero exit."""
  try:
    return main(argv)
  except USER_ERRORS as e:
    user_error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
