import copy
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mae_jax import checkpointing, summaries, train
from mae_jax import steps as steps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _short(config, steps=40):
  config.total_steps, config.warmup_steps, config.log_every = steps, 5, 10
  config.num_preview_images = 3
  return config


def test_loop_learns_checkpoints_and_writes_outputs(tmp_path, tiny_config):
  config = _short(tiny_config)
  state, history = train.train_and_evaluate(config, str(tmp_path))
  steps, losses = zip(*history)
  assert steps == (10, 20, 30, 40)
  assert losses[-1] < 0.85 * losses[0], losses
  assert int(state.step) == 40

  # checkpoint: complete, restorable, equal to the final state; config stored beside it
  assert checkpointing.latest_step(str(tmp_path)) == 40
  restored, step = checkpointing.restore(str(tmp_path), params=state.params,
                                         opt_state=state.opt_state)
  for a, b in zip(jax.tree.leaves((restored["params"], restored["opt_state"])),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert step == 40 and restored["config"].model.embed_dim == 32
  assert restored["meta"] == {"step": 40, "data": {"step": 40}, "data_per_process": [{"step": 40}],
                             "seed": 0, "rollbacks": 0, "good": True}

  picture = np.asarray(Image.open(tmp_path / "reconstructions.png"))
  scale = 224 // 32
  assert picture.shape == ((3 * 34 + 2) * scale, (4 * 34 + 2) * scale, 3)

  (event_file,) = os.listdir(tmp_path / "tensorboard")
  events = summaries.read_events(str(tmp_path / "tensorboard" / event_file))
  logged = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  np.testing.assert_allclose([logged[(s, "loss")] for s in steps], losses, rtol=1e-6)
  assert {(40, "lr"), (40, "img_per_s"), (40, "grad_norm"), (40, "step_time_p50"),
          (40, "step_time_p90"), (40, "step_time_max")} <= set(logged)
  # 10 steps per interval: 10 step times (one step in flight; the first interval has 9)
  assert 0 < logged[(40, "step_time_p50")] <= logged[(40, "step_time_p90")] <= (
      logged[(40, "step_time_max")])
  assert any(v.tag == "reconstructions" and v.image.height > 0
             for e in events for v in e.summary.value)


def test_same_seed_same_run(tmp_path, tiny_config):
  a = train.train_and_evaluate(_short(tiny_config, 10), str(tmp_path / "a"))[1]
  b = train.train_and_evaluate(_short(tiny_config, 10), str(tmp_path / "b"))[1]
  assert a == b


def test_unwritable_workdir_fails_at_start(tmp_path, tiny_config):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="is not writable"):
    train.train_and_evaluate(_short(tiny_config), str(blocker / "workdir"))


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "mae_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_bad_input_fails_before_compile(tmp_path):
  """The schedule is checked by train.py before any compile (field checks: test_bad_inputs)."""
  result = _cli("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                "--config.warmup_steps=500")
  assert result.returncode == 2, result.stderr[-2000:]
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  assert re.fullmatch(r"error: warm-up \(500 steps\) must be shorter than training \(200 steps\)",
                      last), last
  assert "Traceback" not in result.stderr and "compiled" not in result.stdout
  assert not (tmp_path / "run").exists()


def test_readme_demo_command_reconstructs_the_photos(tmp_path):
  """The README's demo command: 800 real steps on the bundled photos; its masked patches
  end >= 1 dB above the oracle that fills each with its true mean colour."""
  result = _cli("--config=configs/demo.py", f"--workdir={tmp_path}", timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  losses = [float(x) for x in re.findall(r"step \d+/800  loss ([0-9.]+)", output)]
  assert len(losses) == 16
  assert losses[-1] < 0.5 * losses[0], losses
  margins = [float(x) for x in re.findall(r"mean-colour oracle [0-9.]+ dB \(([-+0-9.]+) dB\)",
                                          output)]
  assert len(margins) == 4 and margins[-1] >= 1.0, margins  # steps 200, 400, 600, 800
  assert (tmp_path / "checkpoints" / "800").is_dir()
  assert (tmp_path / "reconstructions.png").is_file()


def test_nonfinite_steps_are_skipped_counted_and_weights_stay_finite(tmp_path, tiny_config):
  straight, _ = train.train_and_evaluate(_short(tiny_config, 10), str(tmp_path / "clean"))
  config = _short(tiny_config, 10)
  config.log_every = 5
  config.debug_nonfinite_steps = (2, 3)  # steps 3 and 4 (0-based 2, 3) get NaN gradients
  state, history = train.train_and_evaluate(config, str(tmp_path / "poisoned"))
  assert all(np.isfinite(loss) for _, loss in history)  # the logged loss skips bad steps
  (event_file,) = os.listdir(tmp_path / "poisoned" / "tensorboard")
  events = summaries.read_events(str(tmp_path / "poisoned" / "tensorboard" / event_file))
  logged = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  assert logged[(5, "nonfinite")] == 2 and logged[(10, "nonfinite")] == 0
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  assert all(np.isfinite(x).all() for x in leaves)
  # two skipped updates: the weights differ from the clean run's (the data moved on)
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(leaves, jax.tree.leaves(straight.params)))


def _logged(workdir, tag):
  """{step: value} of a scalar across all event files; a replayed step keeps its last value."""
  out = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(folder)):
    for e in summaries.read_events(os.path.join(folder, name)):
      out.update({e.step: v.simple_value for v in e.summary.value if v.tag == tag})
  return out


def test_nonfinite_streak_rolls_back_to_the_last_good_checkpoint_with_new_masks(
    tmp_path, tiny_config, caplog):
  config = _short(copy.deepcopy(tiny_config), 40)
  config.log_every, config.checkpoint.every_steps, config.checkpoint.keep = 5, 10, 1
  config.nan_patience = 12
  config.debug_nonfinite_steps = tuple(range(15, 40))  # 0-based: steps 16.. of the 1st pass
  with caplog.at_level("INFO", logger="mae_jax"):
    state, history = train.train_and_evaluate(config, str(tmp_path / "run"))
  # streak 5 at the save of 20 and 15 at 30: both suspect; 10 is the good one, kept
  # although keep=1; the streak passes 12 at step 30 (15 in a row) -> back to 10
  text = caplog.text
  assert ("15 steps in a row up to step 30 had a non-finite loss or gradient (config.nan_"
          "patience=12): rolling back to checkpoint 10 (the last saved with a finite loss), "
          "masks re-seeded (roll-back 1 of config.max_rollbacks=3)") in text
  assert "moved the suspect checkpoint(s) [20]" in text
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints_suspect")) == ["20"]
  assert [s for s, _ in history] == list(range(5, 41, 5)) and all(np.isfinite(l) for _, l in history)
  assert int(state.step) == 40
  restored, step = checkpointing.restore(str(tmp_path / "run"))
  assert step == 40 and restored["meta"]["rollbacks"] == 1 and restored["meta"]["good"]
  # the replay of 11..40 is finite on disk too (the last logged value of each step)
  nonfinite = _logged(str(tmp_path / "run"), "nonfinite")
  assert nonfinite[20] == 0 and nonfinite[40] == 0
  # re-seeded masks: the same data from step 10 on, yet not the clean run's steps
  clean = _short(tiny_config, 40)
  clean.log_every, clean.checkpoint.every_steps = 5, 10
  clean_state, clean_history = train.train_and_evaluate(clean, str(tmp_path / "clean"))
  # (the poison hook changes the compiled program: equal up to float rounding before 10)
  clean_loss, loss = dict(clean_history), dict(history)
  assert abs(clean_loss[10] - loss[10]) < 1e-5, (clean_loss, loss)
  assert all(abs(clean_loss[s] - loss[s]) > 1e-4 for s in range(15, 41, 5)), (clean_loss, loss)


def test_base_lr_1e9_gives_up_after_max_rollbacks_and_keeps_the_good_checkpoint(
    tmp_path, tiny_config):
  config = _short(copy.deepcopy(tiny_config), 10)
  config.log_every, config.checkpoint.every_steps, config.checkpoint.keep = 5, 5, 1
  train.train_and_evaluate(config, str(tmp_path))  # a good checkpoint at step 10
  diverge = _short(tiny_config, 60)
  diverge.log_every, diverge.checkpoint.every_steps, diverge.checkpoint.keep = 5, 5, 1
  diverge.base_lr, diverge.nan_patience, diverge.max_rollbacks = 1e9, 4, 2
  with pytest.raises(FloatingPointError, match=(
      r"steps in a row up to step \d+ had a non-finite loss or gradient \(config.nan_patience"
      r"=4\) after 2 roll-back\(s\) \(config.max_rollbacks=2\); the last good checkpoint "
      r"is step 10 in .* \(newer, suspect steps are in checkpoints_suspect/\); lower config.base_lr")):
    train.train_and_evaluate(diverge, str(tmp_path), allow_config_change=True)
  assert checkpointing.latest_step(str(tmp_path)) == 10  # suspect steps are set aside
  restored, _ = checkpointing.restore(str(tmp_path), 10)
  assert restored["meta"]["good"] and restored["config"].base_lr == config.base_lr
  assert os.listdir(tmp_path / "checkpoints_suspect")


def test_resume_refuses_a_config_that_defines_another_run(tmp_path, tiny_config):
  config = _short(tiny_config, 6)
  config.stop_after_steps = 3
  train.train_and_evaluate(config, str(tmp_path))
  config.batch_size, config.seed = 16, 1
  with pytest.raises(ValueError, match=r"batch_size: 32 -> 16; seed: 0 -> 1 \(pass "
                                       r"--allow_config_change"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.latest_step(str(tmp_path)) == 3  # nothing was touched
  config.batch_size, config.seed, config.log_every = 32, 0, 3  # a harmless change: resumes
  _, history = train.train_and_evaluate(config, str(tmp_path))
  assert [s for s, _ in history] == [6]
  config.total_steps = 8
  _, history = train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  assert [s for s, _ in history] == [8]


@pytest.mark.parametrize("as_workdir", [True, False])
def test_restore_of_weights_without_optimizer_state_starts_a_fresh_optimizer(
    tmp_path, tiny_config, as_workdir):
  """Pre-training from converted / official weights (e.g. mae_visualize_vit_large.pth)."""
  pytest.importorskip("torch")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from conftest import write_pth  # pylint: disable=import-outside-toplevel
  from mae_jax import convert, initial_state, sharding  # pylint: disable=import-outside-toplevel
  from mae_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  source = model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(7))
  pth = write_pth(tmp_path / "official.pth", convert.official_state_dict(source))
  restore = pth
  if as_workdir:
    restore = str(tmp_path / "converted")
    convert.main(["--input", pth, "--output", restore, "--num_heads=4", "--decoder_num_heads=4"])
    assert not os.path.exists(tmp_path / "converted" / "checkpoints" / "0" / "opt_state")
  config = _short(tiny_config, 2)
  config.log_every, config.warmup_steps = 1, 1
  built = steps_lib.build(config, sharding.make_mesh(config.mesh), 2, 1)
  state, _, _, step = initial_state.restore_or_init(built, config, str(tmp_path / "run"),
                                                    restore)
  assert step == 0
  for got, want in zip(jax.tree.leaves(sharding.to_host(state.params)),
                       jax.tree.leaves(nnx.state(source, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  moments = [np.asarray(x) for x in jax.tree.leaves(sharding.to_host(state.opt_state))]
  assert all(not x.any() for x in moments if x.ndim)  # a fresh AdamW: zero moments
  _, history = train.train_and_evaluate(config, str(tmp_path / "run"), restore_from=restore)
  assert [s for s, _ in history] == [1, 2] and np.isfinite([l for _, l in history]).all()
