"""What every command-line tool shares: checkpoint / model flags and the user-error contract.

A user error (a missing file, a bad flag value, a checkpoint that does not match) is
printed as one `error: ...` line naming the flag or file, with exit status 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

import argparse
import sys

from mae_jax import api

USER_ERRORS = (KeyError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
               ImportError, FloatingPointError)
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
  return api.load_any(args.checkpoint, step=args.step, require_decoder=require_decoder,
                      **model_overrides(args))


def model_overrides(args):
  """The model fields given on the command line (None where unset) and the init seed."""
  return dict({n: getattr(args, n) for n in MODEL_FIELDS}, seed=args.init_seed)


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
