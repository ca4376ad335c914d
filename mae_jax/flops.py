"""Analytic model FLOPs of MAE training, peak FLOP/s per device kind, model-FLOP utilisation.

Counting convention (it reproduces SPEC §1: ViT-B 58.7, ViT-L 124.5, ViT-H 291.4 GFLOP per
224 px image at mask 0.75):
- matmuls and attention only: a multiply-add is 2 FLOPs; layer norms, GELU, softmax, biases,
  residuals, gathers and the loss are left out (they are < 1% at ViT-B size);
- the tokens each layer really computes on: patch embedding on all L patches (the image is
  embedded, then masked), the encoder on 1 + visible tokens (1 + L with mask tokens in the
  encoder), decoder_embed on the encoder's tokens, the decoder and decoder_pred on 1 + L
  (the cls output is computed, then dropped);
- per block on N tokens of width D, MLP hidden M: qkv 6ND^2, proj 2ND^2, MLP 4NDM,
  attention scores and weighted sum 4N^2 D (independent of the head count);
- training = 3 x forward (backward twice the forward), the usual MFU convention. The real
  backward is slightly cheaper: no gradient flows into the images through the patch embedding.
"""

import math
from mae_jax import model as model_lib

# Dense bf16 peak TFLOP/s of one JAX device, by `jax.Device.device_kind` (lower-cased,
# first match wins). TPU v2 / v3 devices are single TensorCores (half a chip); from v4 on
# a device is a chip.
PEAK_TFLOPS = (
    ("tpu v2", 22.5),
    ("tpu v3", 61.5),
    ("tpu v4 lite", None),  # v4i: not a training chip, peak not tabulated here
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),  # v5p ('TPU v5' or 'TPU v5p')
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0),
    ("a100", 312.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM: 'NVIDIA H100 80GB HBM3'
    ("h200", 989.0),  # 'NVIDIA H200', 'NVIDIA GH200 ...'
)


def block_flops(tokens, dim, mlp_hidden):
  """Forward FLOPs of one pre-norm ViT block on `tokens` tokens of width `dim`."""
  linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)  # qkv, proj, fc1 + fc2
  attention = 4 * tokens * tokens * dim  # q k^T and weights @ v, over all heads
  return linear + attention


def forward_flops(model_cfg):
  """Forward FLOPs of the MAE on one image, by part: {name: FLOPs}.

  `model_cfg`: `config.model` (ConfigDict / dict) or a ModelConfig.
  """
  mc = model_lib.model_config(model_cfg)
  length, patch_dim = mc.num_patches, mc.patch_size ** 2 * mc.in_chans
  d, d_dec = mc.embed_dim, mc.decoder_embed_dim
  encoder_tokens = 1 + (length if mc.mask_tokens_in_encoder else mc.len_keep)
  decoder_tokens = 1 + length
  return {
      "patch_embed": 2 * length * patch_dim * d,
      "encoder": mc.depth * block_flops(encoder_tokens, d, int(d * mc.mlp_ratio)),
      "decoder_embed": 2 * encoder_tokens * d * d_dec,
      "decoder": mc.decoder_depth * block_flops(decoder_tokens, d_dec,
                                                int(d_dec * mc.mlp_ratio)),
      "decoder_pred": 2 * decoder_tokens * d_dec * patch_dim,
  }


def train_flops_per_image(model_cfg):
  """Training FLOPs (forward + backward = 3 x forward) of the MAE per image."""
  return 3 * sum(forward_flops(model_cfg).values())


def peak_flops(device_kind, override_tflops=None):
  """Dense bf16 peak FLOP/s of one device of `device_kind`; None where unknown (CPU).

  `override_tflops` > 0 wins (another dtype, a clock-limited part, a CPU's measured peak).
  """
  if override_tflops:
    return float(override_tflops) * 1e12
  kind = (device_kind or "").lower()
  for name, tflops in PEAK_TFLOPS:
    if name in kind:
      return None if tflops is None else tflops * 1e12
  return None


def mfu(images_per_s, flops_per_image, num_chips, peak):
  """Model-FLOP utilisation: images/s x FLOPs/image / (devices x peak FLOP/s); None without a
  peak. `num_chips` counts JAX devices (the table's peaks are per device)."""
  if not peak or not flops_per_image:
    return None
  return images_per_s * flops_per_image / (num_chips * peak)


def sig3(x):
  """`x` with 3 significant digits and no exponent: 0.0123, 1.23, 123, 12345."""
  if x <= 0 or not math.isfinite(x):
    return f"{x:.3g}"
  return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


class Meter:
  """steps/s, img/s and (where the peak is known) MFU of one logging interval."""

  def __init__(self, flops_per_image, global_batch, devices, override_tflops=None):
    self.flops_per_image, self.global_batch = flops_per_image, global_batch
    self.num_devices = len(devices)
    self.peak = peak_flops(devices[0].device_kind, override_tflops)

  def __call__(self, steps, seconds):
    """{steps_per_s, img_per_s[, mfu]} of `steps` steps that took `seconds`."""
    steps_per_s = steps / seconds
    out = {"steps_per_s": steps_per_s, "img_per_s": steps_per_s * self.global_batch}
    utilisation = mfu(out["img_per_s"], self.flops_per_image, self.num_devices, self.peak)
    if utilisation is not None:
      out["mfu"] = utilisation
    return out

  @staticmethod
  def describe(speed):
    """'2.50 steps/s  80.0 img/s  MFU 41.3%' (MFU only where known)."""
    text = f"{sig3(speed['steps_per_s'])} steps/s  {sig3(speed['img_per_s'])} img/s"
    return text + (f"  MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")
