"""MAE pre-training of ViT-L/16, paper recipe: batch 4096, 800 epochs, 40 warm-up, mask 0.75."""

from configs import base


def get_config(arg=None):
  config = base.sized_config("vit_l")
  config.model.dtype = "auto"  # bfloat16 on GPU / TPU, float32 on CPU
  return base.apply_args(config, arg)
