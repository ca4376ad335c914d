import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from mae_jax import checkpointing, sharding, train
from mae_jax import steps as steps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ("img_size=32,embed_dim=32,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
             "decoder_num_heads=4,num_preview_images=2")


def _config(tiny_config, total=20, **overrides):
  config = tiny_config
  config.total_steps, config.warmup_steps, config.log_every = total, min(3, total - 1), 1
  config.image_every, config.num_preview_images = -1, 2
  config.checkpoint.every_steps = 10
  for key, value in overrides.items():
    config[key] = value
  return config


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(sharding.to_host(state.params))]


def test_exact_resume_same_params_and_loss_curve(tmp_path, tiny_config):
  straight_state, straight = train.train_and_evaluate(_config(tiny_config), str(tmp_path / "a"))
  first_state, first = train.train_and_evaluate(_config(tiny_config, stop_after_steps=10),
                                                str(tmp_path / "b"))
  assert [s for s, _ in first] == list(range(1, 11))
  assert checkpointing.latest_step(tmp_path / "b") == 10
  resumed_state, resumed = train.train_and_evaluate(_config(tiny_config), str(tmp_path / "b"))
  assert [s for s, _ in resumed] == list(range(11, 21))
  assert first + resumed == straight  # same data order, same masks, bit-identical losses
  for a, b in zip(_params(resumed_state), _params(straight_state)):
    np.testing.assert_array_equal(a, b)
  assert int(resumed_state.step) == 20


def test_restore_fsdp_checkpoint_on_other_meshes(tmp_path, tiny_config):
  config = _config(tiny_config, total=2)
  config.mesh.update(data=1, fsdp=8, tensor=1)
  config.batch_size = 16
  state, _ = train.train_and_evaluate(config, str(tmp_path))
  qkv = state.params["blocks"][0]["attn"]["qkv"]["kernel"][...]
  assert qkv.addressable_shards[0].data.shape == (4, 96)  # really FSDP-sharded over 8
  saved = _params(state)
  for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (4, 2, 1))):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
    built = steps_lib.build(config, mesh, 2, 1)
    target = sharding.abstract_with_shardings(built.abstract_state, built.state_sh)
    restored, step = checkpointing.restore(tmp_path, params=target.params,
                                           opt_state=target.opt_state)
    assert step == 2
    leaves = jax.tree.leaves(restored["params"])
    assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)
    for a, b in zip(leaves, saved):
      np.testing.assert_array_equal(np.asarray(a), b)


def test_other_model_size_clear_error(tmp_path, tiny_config):
  train.train_and_evaluate(_config(tiny_config, total=1), str(tmp_path))
  bigger = _config(tiny_config, total=2)
  bigger.model.embed_dim = 64
  with pytest.raises(ValueError, match=r"params 'blocks/0/attn/proj/bias' has shape \(32,\) in "
                                       r"the checkpoint but \(64,\) in the model"):
    train.train_and_evaluate(bigger, str(tmp_path))


def _cli(workdir, *extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, "-m", "mae_jax.main", f"--config=configs/tiny.py:{TINY_ARGS}",
       f"--workdir={workdir}", "--config.mesh.data=1", "--config.warmup_steps=3",
       "--config.image_every=-1", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, text, timeout=240):
  deadline, lines = time.time() + timeout, []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line and proc.poll() is not None:
      break
    lines.append(line)
    if text in line:
      return lines
  proc.kill()
  raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines[-40:])}")


def test_sigterm_checkpoints_at_current_step_and_resume_continues(tmp_path):
  proc = _cli(tmp_path, "--config.total_steps=100000", "--config.log_every=5",
              "--config.checkpoint.every_steps=100000")
  _wait_for_line(proc, "step 10/100000")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "stopping at step" in out
  step = checkpointing.latest_step(tmp_path)
  assert step is not None and step >= 10 and f"stopping at step {step} (signal)" in out
  resumed = _cli(tmp_path, "--config.total_steps=100000", "--config.log_every=1",
                 "--config.stop_after_steps=3")
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out[-3000:]
  assert f"resuming from {tmp_path}/checkpoints/{step}" in out
  assert f"step {step + 1}/100000" in out and f"step {step + 3}/100000" in out
  assert checkpointing.latest_step(tmp_path) == step + 3


def test_kill9_during_async_save_keeps_previous_checkpoint(tmp_path):
  proc = _cli(tmp_path, "--config.total_steps=100000", "--config.log_every=50",
              "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=1000")
  root = tmp_path / "checkpoints"
  deadline, partial = time.time() + 240, None
  while time.time() < deadline and partial is None:
    names = os.listdir(root) if root.is_dir() else []
    if any(n.isdigit() for n in names):  # at least one complete step before the kill
      partial = next((n for n in names if "tmp" in n), None)
    if partial is None:
      time.sleep(0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate(timeout=60)
  assert partial is not None, "never caught a save in flight"
  partial_step = int(partial.split(".")[0])  # "<step>.orbax-checkpoint-tmp-..."
  latest = checkpointing.latest_step(tmp_path)
  assert latest is not None and latest < partial_step  # the cut-short save is not a step
  print(f"killed during the save of step {partial_step}; latest complete step {latest}")
  resumed = _cli(tmp_path, "--config.total_steps=100000", "--config.log_every=1",
                 "--config.stop_after_steps=2", "--config.checkpoint.keep=1000")
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out[-3000:]
  latest_after = checkpointing.latest_step(tmp_path)
  assert "resuming from" in out and latest_after >= latest + 2
  assert not [n for n in os.listdir(root) if "tmp" in n]  # the partial save was cleaned up


def test_restore_flag_initialises_a_new_workdir(tmp_path, tiny_config):
  source_state, _ = train.train_and_evaluate(_config(tiny_config, total=4), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="neither a workdir"):
    train.train_and_evaluate(_config(tiny_config, total=6), str(tmp_path / "b"),
                             restore_from=str(tmp_path))
  state, history = train.train_and_evaluate(_config(tiny_config, total=6), str(tmp_path / "b"),
                                            restore_from=str(tmp_path / "a" / "checkpoints" / "4"))
  assert [s for s, _ in history] == [5, 6]  # continued from step 4 of the other run
  assert checkpointing.latest_step(tmp_path / "a") == 4  # the source is left alone
  assert not np.array_equal(_params(state)[0], _params(source_state)[0])


def _three_steps(workdir):
  """A real checkpoint with steps 1, 2, 3 of a small params dict (no training)."""
  config = ml_collections.ConfigDict({"model": {"embed_dim": 32}})
  for step in (1, 2, 3):
    params = {"w": np.full((64, 64), step, np.float32), "b": np.arange(64, dtype=np.float32)}
    checkpointing.save(workdir, step, params, None, {"data": None, "seed": 0}, config)
  return {"w": jax.ShapeDtypeStruct((64, 64), np.float32),
          "b": jax.ShapeDtypeStruct((64,), np.float32)}


def _assert_fell_back_to_step_2(workdir, abstract, caplog):
  with caplog.at_level("WARNING", logger="mae_jax.checkpointing"):
    restored, step = checkpointing.restore_latest_readable(workdir, params=abstract)
  assert step == 2 and restored["meta"]["step"] == 2
  np.testing.assert_array_equal(restored["params"]["w"], np.full((64, 64), 2, np.float32))
  assert sorted(os.listdir(workdir / "checkpoints_unreadable")) == ["3"]
  assert checkpointing.latest_step(workdir) == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert f"{workdir}/checkpoints/3 is unreadable" in warnings[0]
  assert "\n" not in warnings[0]
  return warnings[0]


def test_restore_latest_readable_skips_truncated_array_file(tmp_path, caplog):
  abstract = _three_steps(tmp_path)
  data = tmp_path / "checkpoints" / "3" / "params" / "d"  # the OCDBT data files of step 3
  biggest = max(data.iterdir(), key=lambda f: f.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  warning = _assert_fell_back_to_step_2(tmp_path, abstract, caplog)
  assert "ValueError" in warning and "tensorstore_spec" not in warning


def test_restore_latest_readable_skips_broken_meta_json(tmp_path, caplog):
  abstract = _three_steps(tmp_path)
  (tmp_path / "checkpoints" / "3" / "meta" / "metadata").write_text('{"step": 3, "se')
  warning = _assert_fell_back_to_step_2(tmp_path, abstract, caplog)
  assert "JSONDecodeError" in warning
  # A later bad step 3 (here: its config item missing) goes beside the first, not over it.
  checkpointing.save(tmp_path, 3, {"w": np.zeros((64, 64), np.float32),
                                   "b": np.zeros(64, np.float32)}, None, {},
                     ml_collections.ConfigDict())
  shutil.rmtree(tmp_path / "checkpoints" / "3" / "config")
  assert checkpointing.restore_latest_readable(tmp_path, params=abstract)[1] == 2
  assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["3", "3.1"]


def test_restore_latest_readable_shape_mismatch_propagates_and_moves_nothing(tmp_path):
  _three_steps(tmp_path)
  other = {"w": jax.ShapeDtypeStruct((64, 32), np.float32),
           "b": jax.ShapeDtypeStruct((64,), np.float32)}
  with pytest.raises(ValueError, match=r"params 'w' has shape \(64, 64\) in the checkpoint but "
                                       r"\(64, 32\) in the model"):
    checkpointing.restore_latest_readable(tmp_path, params=other)
  assert not (tmp_path / "checkpoints_unreadable").exists()
  assert checkpointing.latest_step(tmp_path) == 3


def test_restore_latest_readable_none_readable(tmp_path, caplog):
  assert checkpointing.restore_latest_readable(tmp_path) == (None, None)  # no checkpoints at all
  abstract = _three_steps(tmp_path)
  for step in (1, 2, 3):
    (tmp_path / "checkpoints" / str(step) / "meta" / "metadata").write_text("{")
  with caplog.at_level("WARNING", logger="mae_jax.checkpointing"):
    assert checkpointing.restore_latest_readable(tmp_path, params=abstract) == (None, None)
  assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["1", "2", "3"]
  assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 3
  assert checkpointing.latest_step(tmp_path) is None


def test_restore_latest_readable_other_processes_move_nothing(tmp_path, monkeypatch, caplog):
  abstract = _three_steps(tmp_path)
  (tmp_path / "checkpoints" / "3" / "meta" / "metadata").write_text("{")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with caplog.at_level("WARNING", logger="mae_jax.checkpointing"):
    assert checkpointing.restore_latest_readable(tmp_path, params=abstract)[1] == 2
  assert not (tmp_path / "checkpoints_unreadable").exists()
  assert (tmp_path / "checkpoints" / "3").is_dir()  # process 0 moves it, not this one
  assert "checkpoints/3 is unreadable" in caplog.text
