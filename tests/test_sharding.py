import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mae_jax import sharding, train
from mae_jax import steps as steps_lib
from mae_jax import data as mae_data


def test_mesh_shape_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="cannot be split into groups of 3"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
    sharding.mesh_shape({"data": 2, "fsdp": 8, "tensor": 1}, 8)
  assert sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}).devices.size == 2
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 128), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("mlp", "embed"), (128, 32), mesh) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("embed", "mlp"), (33, 128), mesh) == P(None, "tensor")
  assert sharding.logical_to_spec((None, "embed"), (3, 32), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(None, (3,), mesh) == P()


def test_batch_not_divisible_clear_error(tiny_config):
  tiny_config.mesh.data, tiny_config.batch_size = 8, 12
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 data shards"):
    train.train_and_evaluate(tiny_config, "/tmp/never-used-mae-workdir")


def _run_steps(config, mesh, steps=2):
  built = steps_lib.build(config, mesh, total_steps=10, warmup_steps=2)
  state, static = built.init_fn()
  batches = mae_data.create_pretrain_iterator(config)
  losses = []
  for _ in range(steps):
    state, metrics = built.step_fn(state, static, sharding.global_batch(next(batches), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_one_device(tiny_config, shape):
  config = tiny_config
  config.batch_size = 16
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  ref_state, ref_losses = _run_steps(config, one)
  state, losses = _run_steps(config, mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  # Adam turns rounding noise in exactly-zero gradients (the key bias: softmax ignores it)
  # into updates of up to lr ~ 1e-4; everything else agrees to float precision.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # the parameters really are sharded as the rules say
  qkv = state.params["blocks"][0]["attn"]["qkv"]["kernel"][...]
  assert qkv.sharding.spec == P("fsdp", "tensor")
  assert qkv.addressable_shards[0].data.shape == (32 // shape[1], 96 // shape[2])


def test_masks_do_not_depend_on_device_count(tiny_config):
  """Noise is a function of (seed, step, global example index) only."""
  from mae_jax import patches
  key = jax.random.key(0)
  ids = np.arange(16, dtype=np.int32)
  one = patches.example_noise("random", key, ids, (8, 8), 0.75)
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh))
  many = jax.jit(lambda i: patches.example_noise("random", key, i, (8, 8), 0.75))(sharded_ids)
  np.testing.assert_array_equal(np.asarray(many), np.asarray(one))
  masks = np.asarray(patches.masking_from_noise(one, 16).mask)
  assert len({m.tobytes() for m in masks}) == 16  # no two examples (devices) share a mask
