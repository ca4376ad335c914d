"""Command line: official / HF PyTorch MAE weights <-> mae_jax Orbax checkpoints.

  python -m mae_jax.convert --input=mae_pretrain_vit_base.pth --output=workdirs/vit_b_official
  python -m mae_jax.convert --input=workdirs/demo --output=demo_official.pth
  python -m mae_jax.convert --input=workdirs/demo --output=demo_hf --format=hf

Imports take official `.pth` files (pre-trained with or without the decoder,
fine-tuned with `head` / `fc_norm`) and HF `ViTMAEForPreTraining` weights
(`.safetensors`, `.bin` or a directory with `config.json`) and write an Orbax
checkpoint directory that `mae_jax.load` opens; exports go the other way. All
flags: README "Converting checkpoints". The work is done in `mae_jax.weights`;
the names below are re-exported so that `mae_jax.convert.load_pytorch`,
`load_pytorch_classifier` & co. work from here.
"""

import argparse

from mae_jax import cli
from mae_jax.api import load_any
from mae_jax.atomic import AtomicOutput
from mae_jax.cli import add_checkpoint_flags, add_model_flags, load_from_flags, run_cli
from mae_jax.weights import (CLASSIFIER_PREFIXES, DECODER_PREFIXES, KINDS, Imported,
                             export_checkpoint, export_state_dict, full_config, hf_to_official,
                             import_checkpoint, infer_model_config, is_our_checkpoint,
                             load_pytorch, official_state_dict, official_to_hf, read_state_dict,
                             save_imported, summarise_keys)
from mae_jax.weights.classifier import load_pytorch_classifier
from mae_jax.weights.hf import HF_WEIGHTS, hf_config
from mae_jax.weights.workdir import EXTRAS_ITEM


__all__ = [
    "AtomicOutput", "CLASSIFIER_PREFIXES", "DECODER_PREFIXES", "EXTRAS_ITEM",
    "HF_WEIGHTS", "Imported", "KINDS", "add_checkpoint_flags", "add_model_flags",
    "export_checkpoint", "export_state_dict", "full_config", "hf_config", "hf_to_official",
    "import_checkpoint", "infer_model_config", "is_our_checkpoint", "load_any",
    "load_from_flags", "load_pytorch", "load_pytorch_classifier", "main", "official_state_dict",
    "official_to_hf", "read_state_dict", "run_cli", "save_imported", "summarise_keys"]


def main(argv=None):
  """Import (file -> workdir) or export (workdir -> file), whichever --input is."""
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.convert",
      description="Official / HF PyTorch MAE weights <-> mae_jax Orbax checkpoints.")
  parser.add_argument("--input", required=True,
                      help="an official .pth, an HF .safetensors/.bin or HF model directory "
                           "(import), or an mae_jax workdir / step directory (export)")
  parser.add_argument("--output", required=True,
                      help="import: the workdir to create; export: the .pth file "
                           "(--format=official) or HF model directory (--format=hf)")
  parser.add_argument("--format", choices=("official", "hf"), default="official",
                      help="export format (imports detect it)")
  parser.add_argument("--step", type=int, help="export: the checkpoint step (default latest)")
  parser.add_argument("--include_fresh", action="store_true",
                      help="export: also write weights a conversion left freshly initialised")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  add_model_flags(parser)
  args = parser.parse_args(argv)
  if is_our_checkpoint(args.input):
    out = export_checkpoint(args.input, args.output, fmt=args.format, step=args.step,
                            include_fresh=args.include_fresh, overwrite=args.overwrite)
    print(f"wrote {out} ({args.format} format)")
    return out
  overrides = cli.model_overrides(args)
  imported = import_checkpoint(args.input, **overrides)
  out = save_imported(imported, args.output, seed=overrides["seed"], overwrite=args.overwrite)
  mc = imported.model.config
  print(f"read {imported.source}: {imported.format} format, {KINDS[imported.kind]}; "
        f"ViT D={mc.embed_dim} depth={mc.depth} patch={mc.patch_size} img={mc.img_size}, "
        f"decoder {mc.decoder_embed_dim}x{mc.decoder_depth}")
  if imported.assumed:
    print("not stored in the file, assumed (override with flags): "
          + ", ".join(f"{k}={v}" for k, v in imported.assumed.items()))
  if imported.extras:
    print(f"kept for export only (checkpoint item {EXTRAS_ITEM!r}): "
          f"{summarise_keys(imported.extras)}")
  print(f"wrote {out} (open with mae_jax.load({out!r}))")
  return out


if __name__ == "__main__":
  run_cli(main, None)
