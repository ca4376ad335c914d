"""Analytic training FLOPs against SPEC's figures, the model's own traced matmuls and XLA's cost
analysis; the peak-FLOP/s table and MFU."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import vit_b, vit_h, vit_l
from jaxprs import equations
from mae_jax import flops
from mae_jax import model as model_lib

SPEC_TRAIN_GFLOP = {vit_b: 58.7, vit_l: 124.5, vit_h: 291.4}  # SPEC §1, 224 px, mask 0.75

# Small enough to compile in seconds, wide enough that matmuls dominate XLA's count.
SMALL = dict(img_size=32, patch_size=8, embed_dim=512, depth=1, num_heads=4,
             decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=4)


def traced_matmul_flops(jaxpr):
  """2 x multiply-adds of every dot_general / convolution in `jaxpr` (nested ones included),
  read off the operand shapes: a count independent of mae_jax.flops."""
  total = 0
  for eqn, times in equations(jaxpr):
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += times * 2 * math.prod(lhs) * math.prod(free)
    elif eqn.primitive.name == "conv_general_dilated":
      assert eqn.params["feature_group_count"] == eqn.params["batch_group_count"] == 1
      rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += times * 2 * math.prod(out) * math.prod(rhs) // out_features
  return total


def _loss_fn(model):
  """(pure loss(params, rest, images, noise), params, rest) of an (abstract) MAE."""
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, images, noise):
    return nnx.merge(graph, params, rest)(images, noise=noise)[0]
  return loss, params, rest


def _inputs(mc, batch=1):
  return (jax.ShapeDtypeStruct((batch,) + mc.image_shape, jnp.float32),
          jax.ShapeDtypeStruct((batch, mc.num_patches), jnp.float32))


def _traced(model_cfg, train=False):
  """Matmul FLOPs per image of the model's forward (or loss + gradient), traced abstractly."""
  model = model_lib.abstract_model(model_cfg)
  loss, params, rest = _loss_fn(model)
  fn = jax.value_and_grad(loss) if train else loss
  return traced_matmul_flops(jax.make_jaxpr(fn)(params, rest, *_inputs(model.config)).jaxpr)


@pytest.mark.parametrize("module", list(SPEC_TRAIN_GFLOP), ids=lambda m: m.__name__)
def test_spec_training_gflop(module):
  got = flops.train_flops_per_image(module.get_config().model) / 1e9
  assert got == pytest.approx(SPEC_TRAIN_GFLOP[module], rel=1e-3)


@pytest.mark.parametrize("cfg", [
    vit_b.get_config().model,
    dict(SMALL, embed_dim=64, mask_tokens_in_encoder=True),
    dict(SMALL, embed_dim=64, img_size=(32, 48), mlp_ratio=3.0, mask_ratio=0.6, in_chans=1),
], ids=["vit_b", "mask_tokens_in_encoder", "non_square"])
def test_forward_equals_the_models_traced_matmuls(cfg):
  assert _traced(cfg) == sum(flops.forward_flops(cfg).values())


def test_train_step_is_3x_forward_less_the_image_gradient():
  """The backward computes no gradient of the images: 3 x forward overcounts the traced step
  by exactly the patch embedding (1.2% at ViT-B, 0.7% at ViT-L)."""
  parts = flops.forward_flops(SMALL)
  assert _traced(SMALL, train=True) == flops.train_flops_per_image(SMALL) - parts["patch_embed"]


def test_close_to_xla_cost_analysis():
  """XLA also counts layer norms, GELU, softmax, biases: a few % above the matmul count."""
  model = model_lib.abstract_model(SMALL)  # XLA compiles from shapes alone
  loss, params, rest = _loss_fn(model)
  batch = 2

  def xla_flops(fn):
    compiled = jax.jit(fn).lower(params, rest, *_inputs(model.config, batch)).compile()
    return compiled.cost_analysis()["flops"] / batch

  forward = sum(flops.forward_flops(SMALL).values())
  assert 1.0 < xla_flops(loss) / forward < 1.05
  train_ratio = xla_flops(jax.value_and_grad(loss)) / flops.train_flops_per_image(SMALL)
  assert 0.97 < train_ratio < 1.03


def test_mask_tokens_in_encoder_cost_for_vit_l():
  """SPEC / paper Table 1c: the encoder on all tokens costs ~3.3x the training FLOPs."""
  config = vit_l.get_config().model
  base = flops.train_flops_per_image(config)
  config.mask_tokens_in_encoder = True
  assert 3.2 < flops.train_flops_per_image(config) / base < 3.3
  config.decoder_depth = 1
  with_tokens = flops.train_flops_per_image(config)
  config.mask_tokens_in_encoder = False  # a lighter decoder makes the encoder's share larger
  assert with_tokens / flops.train_flops_per_image(config) > 3.3


@pytest.mark.parametrize("kind,tflops", [
    ("TPU v3", 61.5), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459),
    ("TPU v5p", 459), ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989)])
def test_peak_flops_table(kind, tflops):
  assert flops.peak_flops(kind) == pytest.approx(tflops * 1e12)


def test_peak_unknown_and_override():
  assert flops.peak_flops("cpu") is None and flops.peak_flops(jax.devices()[0].device_kind) is None
  assert flops.peak_flops("TPU v4 lite") is None and flops.peak_flops("NVIDIA L4") is None
  assert flops.peak_flops("cpu", override_tflops=0.3) == pytest.approx(3e11)
  assert flops.peak_flops("TPU v4", override_tflops=100) == pytest.approx(1e14)


def test_mfu_and_meter():
  # 8 v4 chips training ViT-L at 1000 img/s: 124.5e12 / 2.2e15 = 5.7%
  assert flops.mfu(1000, 124.5e9, 8, 275e12) == pytest.approx(124.5e12 / (8 * 275e12))
  assert flops.mfu(1000, 124.5e9, 8, None) is None

  class Device:
    device_kind = "TPU v4"
  meter = flops.Meter(124.5e9, 4096, [Device()] * 8)
  speed = meter(10, 20.0)
  assert speed == pytest.approx({"steps_per_s": 0.5, "img_per_s": 2048,
                                 "mfu": 2048 * 124.5e9 / (8 * 275e12)})
  assert flops.Meter.describe(speed) == "0.500 steps/s  2048 img/s  MFU 11.6%"
  assert flops.sig3(1.234) == "1.23" and flops.sig3(0.01234) == "0.0123" and flops.sig3(123.4) == "123"
  cpu = flops.Meter(1e9, 8, jax.devices()[:1])(3, 1.5)
  assert cpu == {"steps_per_s": 2.0, "img_per_s": 16.0}
  assert flops.Meter.describe(cpu) == "2.00 steps/s  16.0 img/s"


def test_pretrain_task_reports_its_flops():
  from mae_jax.tasks import pretrain  # pylint: disable=import-outside-toplevel
  config = vit_b.get_config()
  assert pretrain.TASK.flops_per_image(config) == flops.train_flops_per_image(config.model)
