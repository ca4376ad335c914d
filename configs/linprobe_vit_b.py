"""Linear probe of ViT-B on ImageNet, official recipe (SPEC §3); --config.init_from=PRE-TRAINED."""

from configs import classify_base


def get_config(arg=None):
  return classify_base.linprobe_config("vit_b", arg)
