"""A tiny MAE on the bundled photos: seconds per step on a CPU, for demos and tests.

200 steps at batch 32 on 64 px crops (8x8 patches of 8 px); a higher learning
rate than the paper's batch scaling gives, so the loss falls visibly in minutes.
"""

from configs import base


def get_config(arg=None):
  config = base.sized_config("tiny")
  config.model.update(img_size=64, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
  config.data.num_train_examples = 32 * 200
  config.batch_size = 32
  config.total_steps = 200
  config.warmup_steps = 20
  config.base_lr = 8e-3  # lr = 8e-3 * 32 / 256 = 1e-3
  config.log_every = 20
  config.image_every = 100
  config.checkpoint.every_steps = 100
  return base.apply_args(config, arg)
