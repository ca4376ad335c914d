"""The README's first command: a tiny MAE on the bundled photos that reconstructs them.

  python -m mae_jax.main --config=configs/demo.py --workdir=workdirs/demo

configs/tiny.py (64 px, 8 px patches, a 128 x 4 encoder, a 128 x 2 decoder, batch 32) with
what the demo's picture needs, chosen by the runs in benchmarks/RESULTS.md:
- centre crops (+ flips) of the 18 photos, the framing the picture shows. Random-resized
  crops (scale 0.2-1) mostly show zoomed-in parts; on them the masked-patch PSNR of the
  preview stays ~0.5 dB below the mean-colour oracle after 600 steps;
- lr 2e-3 (base 1.6e-2 at batch 32: 2x tiny.py's; 4x was worse), 800 steps, 40 warm-up.
The log prints the masked-patch PSNR against the oracle that fills each masked patch with its
true mean colour every 200 steps. The photos are the training set: the picture shows how well
the model learned to fill in these photos under new masks, not how it generalises.
"""

from configs import base, tiny


def get_config(arg=None):
  config = tiny.get_config()
  config.data.crop = "center"
  config.data.num_train_examples = 32 * 800
  config.total_steps = 800
  config.warmup_steps = 40
  config.base_lr = 1.6e-2  # lr = 1.6e-2 * 32 / 256 = 2e-3
  config.log_every = 50
  config.image_every = 200
  config.checkpoint.every_steps = 800
  return base.apply_args(config, arg)
