"""Speed / memory features change nothing numerically: attention implementations, per-block
remat, gradient accumulation (`accum_steps`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mae_jax import config_check, sharding, tasks
from mae_jax import steps as steps_lib
from mae_jax import model as model_lib
from mae_jax import state as state_lib


def _loss_and_grads(model_cfg, images, noise):
  model = model_lib.MAE(model_cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return nnx.merge(graphdef, p, rest)(images, noise=noise)[0]

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def _inputs(mc, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  mc = model_lib.model_config(mc)
  images = rng.standard_normal((batch, *mc.image_shape)).astype(np.float32)
  return images, rng.random((batch, mc.num_patches)).astype(np.float32)


def _assert_trees_close(a, b, atol, rtol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(2, 17, 4, 8), (2, 197, 16, 32)])
def test_attention_implementations_agree_forward_and_backward(shape):
  q, k, v, w = (jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32)
                for i in range(4))
  impls = ["xla", "matmul"] + (["cudnn"] if jax.default_backend() == "gpu" else [])

  def run(impl):
    f = lambda q, k, v: jnp.sum(model_lib.attention_core(q, k, v, impl) * w)
    return model_lib.attention_core(q, k, v, impl), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  want = run("xla")
  for impl in impls[1:]:
    _assert_trees_close(run(impl), want, atol=1e-5)


def test_auto_attention_is_matmul_on_cpu_and_bad_names_are_refused(tiny_config):
  assert model_lib.resolve_attention("auto", jnp.float32, 32) == (
      "matmul" if jax.default_backend() == "cpu" else model_lib.resolve_attention(
          "auto", jnp.float32, 32))
  assert model_lib.resolve_attention("xla", jnp.float32, 32) == "xla"
  for field, bad in (("attention", "flash"), ("remat", "some")):
    tiny_config.model[field] = bad
    with pytest.raises(ValueError, match=f"config.model.{field}"):
      config_check.check_fields(tiny_config)
    with pytest.raises(ValueError, match=f"config.model.{field}"):
      model_lib.model_config(tiny_config.model)
    tiny_config.model[field] = model_lib.ModelConfig.__dataclass_fields__[field].default
  tiny_config.accum_steps = 0
  with pytest.raises(ValueError, match="config.accum_steps"):
    config_check.check_fields(tiny_config)


def test_mae_loss_and_grads_equal_across_attention_implementations(tiny_config):
  images, noise = _inputs(tiny_config.model)
  want = _loss_and_grads({**tiny_config.model.to_dict(), "attention": "xla"}, images, noise)
  got = _loss_and_grads({**tiny_config.model.to_dict(), "attention": "matmul"}, images, noise)
  _assert_trees_close(got, want, atol=1e-5)


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_remat_gives_the_plain_loss_and_grads(tiny_config, remat):
  images, noise = _inputs(tiny_config.model)
  want = _loss_and_grads(tiny_config.model.to_dict(), images, noise)
  got = _loss_and_grads({**tiny_config.model.to_dict(), "remat": remat}, images, noise)
  _assert_trees_close(got, want, atol=1e-6)


def _sgd_step(config, batch):
  """One train_step with SGD(lr 1) so the new params are params - grads (grads visible)."""
  task = tasks.get(config)
  tx = optax.sgd(1.0)
  abstract = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))
  graphdef = state_lib.split_model(task, abstract)[0]
  state, static = steps_lib.init_state(task, config, tx)  # pylint: disable=protected-access
  step = jax.jit(functools.partial(steps_lib.train_step, task, config, graphdef, tx,
                                   lambda s: 1.0, None))
  return step(state, static, batch)


@pytest.mark.parametrize("accum", [2, 4])
def test_accum_steps_equal_the_big_batch_step(tiny_config, accum):
  rng = np.random.default_rng(0)
  batch = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           "index": np.arange(100, 108, dtype=np.int32)}
  tiny_config.batch_size = 8
  want_state, want = _sgd_step(tiny_config, batch)
  tiny_config.accum_steps = accum
  got_state, got = _sgd_step(tiny_config, batch)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(got["grad_norm"]), float(want["grad_norm"]), rtol=1e-6)
  _assert_trees_close(got_state.params, want_state.params, atol=1e-6)


def test_accum_steps_on_a_sharded_mesh_with_adamw(tiny_config):
  """The jitted, sharded step of `steps_lib.build` (2 devices): same loss, norm and params.

  AdamW's first steps move every weight by ~lr x sign(grad), so a gradient that is zero up to
  rounding may step either way: params agree within 2 x lr, the loss and norm within 1e-6.
  """
  rng = np.random.default_rng(1)
  local = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           "index": np.arange(8, dtype=np.int32)}
  tiny_config.batch_size, tiny_config.mesh.data, tiny_config.base_lr = 8, 2, 1e-4
  results = []
  for accum in (1, 2):
    tiny_config.accum_steps = accum
    mesh = sharding.make_mesh(tiny_config.mesh)
    built = steps_lib.build(tiny_config, mesh, 10, 1)
    state, static = built.init_fn()
    batch = sharding.global_batch(local, mesh)
    for _ in range(2):  # step 1 has lr > 0
      state, metrics = built.step_fn(state, static, batch)
    results.append((sharding.to_host(state.params), jax.device_get(metrics)))
  (want_params, want), (got_params, got) = results
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-6)
  _assert_trees_close(got_params, want_params, atol=2 * 1e-4 * 8 / 256)


def test_accum_steps_refuses_a_batch_it_does_not_divide(tiny_config):
  batch = {"images": np.zeros((6, 32, 32, 3), np.uint8), "index": np.arange(6, dtype=np.int32)}
  tiny_config.accum_steps = 4
  with pytest.raises(ValueError, match="accum_steps=4 does not divide the global batch 6"):
    _sgd_step(tiny_config, batch)


def _scan_cfg(tiny_config, **extra):
  return {**tiny_config.model.to_dict(), "depth": 3, "decoder_depth": 2, **extra}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_over_blocks_gives_the_loop_loss_and_grads(tiny_config, remat):
  images, noise = _inputs(tiny_config.model)
  want = _loss_and_grads(_scan_cfg(tiny_config, remat=remat), images, noise)
  got = _loss_and_grads(_scan_cfg(tiny_config, remat=remat, scan=True), images, noise)
  _assert_trees_close(got, want, atol=1e-6, rtol=1e-5)
  # the scan is real: one `scan` of length depth (encoder), one of decoder_depth
  model = model_lib.MAE(_scan_cfg(tiny_config, scan=True), rngs=nnx.Rngs(0))
  jaxpr = jax.make_jaxpr(lambda x, n: model(x, noise=n)[0])(images, noise)
  lengths = sorted(e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
  assert lengths == [2, 3]


def test_scan_keeps_the_parameter_tree_and_round_trips_through_the_official_pth(tiny_config,
                                                                                tmp_path):
  from mae_jax import weights  # pylint: disable=import-outside-toplevel
  from mae_jax.weights import files  # pylint: disable=import-outside-toplevel
  looped = model_lib.MAE(_scan_cfg(tiny_config), rngs=nnx.Rngs(3))
  scanned = model_lib.MAE(_scan_cfg(tiny_config, scan=True), rngs=nnx.Rngs(3))
  a, b = nnx.state(looped, nnx.Param), nnx.state(scanned, nnx.Param)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  _assert_trees_close(a, b, atol=0)  # same init, same tree: checkpoints are interchangeable
  files.write_pth(weights.official_state_dict(scanned), str(tmp_path / "scan.pth"))
  back = weights.load_pytorch(str(tmp_path / "scan.pth"), _scan_cfg(tiny_config, scan=True))
  loop_back = weights.load_pytorch(str(tmp_path / "scan.pth"), _scan_cfg(tiny_config))
  _assert_trees_close(nnx.state(back, nnx.Param), b, atol=0)
  images, noise = _inputs(tiny_config.model, seed=4)
  np.testing.assert_allclose(float(back(images, noise=noise)[0]),
                             float(loop_back(images, noise=noise)[0]), rtol=1e-6)


def test_scan_in_the_classifier_with_drop_path_equals_the_loop(tiny_config):
  from mae_jax import classifier  # pylint: disable=import-outside-toplevel
  images, _ = _inputs(tiny_config.model, batch=4)
  key = jax.random.key(5)
  heads = {"num_classes": 3, "drop_path": 0.5}

  def features_and_grads(scan):
    model = classifier.Classifier(_scan_cfg(tiny_config, scan=scan), heads, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
      feats = nnx.merge(graphdef, p, rest).features(images, train=True, key=key)
      return jnp.sum(feats ** 2), feats

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  (loss, feats), grads = features_and_grads(True)
  (want_loss, want_feats), want_grads = features_and_grads(False)
  np.testing.assert_allclose(feats, want_feats, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  _assert_trees_close(grads, want_grads, atol=1e-5, rtol=1e-4)
  # drop path really acted: without it (eval mode) the features differ
  model = classifier.Classifier(_scan_cfg(tiny_config, scan=True), heads, rngs=nnx.Rngs(1))
  assert np.abs(np.asarray(model.features(images)) - np.asarray(feats)).max() > 1e-3
