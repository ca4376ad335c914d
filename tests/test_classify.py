"""The classification task through the one loop: linear probe, partial fine-tune, fine-tune,
evaluation that counts every example once, init_from of every source, clear errors."""

import hashlib
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import classify_base
from mae_jax import classifier, initial_state, sharding, summaries, train
from mae_jax import steps as steps_lib
from mae_jax import data as mae_data
from mae_jax.tasks import classify
from mae_jax.weights import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(train, eval) image folders of real photos: 3 classes, 12 train and 13 eval images."""
  root = tmp_path_factory.mktemp("labelled")
  photos = mae_data.bundled_photos()
  for split, count in (("train", 12), ("eval", 13)):
    for i in range(count):
      label = i % 3
      photo = photos[label * 5 + (i // 3) % 5]
      top = 7 * (i // 3)
      os.makedirs(root / split / f"class{label}", exist_ok=True)
      Image.fromarray(photo[top:top + 120, :120]).save(root / split / f"class{label}" / f"{i}.png")
  return str(root / "train"), str(root / "eval")


def _config(folders, kind="finetune", steps=4, **finetune):
  make = classify_base.finetune_config if kind == "finetune" else classify_base.linprobe_config
  config = make("tiny")
  config.model.update(TINY)
  config.data.update(dataset="image_folder", folder=folders[0], eval_folder=folders[1])
  config.batch_size, config.total_steps, config.warmup_steps = 4, steps, 1
  config.log_every, config.eval_every, config.mesh.data = 2, -1, 1
  config.checkpoint.every_steps = 100
  config.finetune.update(finetune)
  return config


def _leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(sharding.to_host(state))[0]}


def _initial(config, workdir):
  """The state a run starts from (before any step), through the loop's own restore path."""
  mesh = sharding.make_mesh(config.mesh)
  classify.TASK.check(config)
  built = steps_lib.build(config, mesh, config.total_steps, config.warmup_steps)
  state = initial_state.restore_or_init(built, config, str(workdir))[0]
  return _leaves(state.params), _leaves(state.model_state)


def test_linear_probe_trains_only_the_head_and_bn_statistics(tmp_path, folders, trained_workdir):
  config = _config(folders, "linprobe")
  config.init_from = str(trained_workdir)
  before, stats_before = _initial(config, tmp_path / "probe")
  state, history = train.train_and_evaluate(config, str(tmp_path / "probe"))
  after, stats_after = _leaves(state.params), _leaves(state.model_state)
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed and all(k.startswith("['head']") for k in changed), changed
  assert sorted(stats_after) == ["['head'][0]['mean'].value", "['head'][0]['var'].value"]
  assert all(not np.array_equal(stats_before[k], stats_after[k]) for k in stats_after)
  assert len(history) == 2 and np.isfinite([l for _, l in history]).all()
  # the encoder is the pre-trained one, bit for bit
  mae = workdir_lib.restore_mae(trained_workdir)[0]
  np.testing.assert_array_equal(after["['blocks'][0]['attn']['qkv']['kernel'].value"],
                                np.asarray(mae.blocks[0].attn.qkv.kernel[...]))
  np.testing.assert_array_equal(after["['norm']['scale'].value"], np.asarray(mae.norm.scale[...]))
  np.testing.assert_array_equal(after["['cls_token'].value"], np.asarray(mae.cls_token[...]))
  np.testing.assert_array_equal(after["['pos_embed'].value"], np.asarray(mae.pos_embed[...]))


def test_partial_finetune_k1_trains_last_block_norm_and_head(tmp_path, folders, trained_workdir):
  config = _config(folders, trainable_blocks=1)
  config.init_from = str(trained_workdir)
  before, _ = _initial(config, tmp_path / "partial")
  state, _ = train.train_and_evaluate(config, str(tmp_path / "partial"))
  after = _leaves(state.params)
  changed = {k.split("]")[0] + "]" for k in before if not np.array_equal(before[k], after[k])}
  assert {k for k in changed} <= {"['blocks']", "['fc_norm']", "['head']"}
  changed_blocks = {k.split("]")[1] for k in before if k.startswith("['blocks']")
                    and not np.array_equal(before[k], after[k])}
  assert changed_blocks == {"[1"}, changed_blocks  # only the last of the two blocks
  assert {"['fc_norm']", "['head']"} <= changed


def test_finetune_from_mae_logs_eval_once_per_example(tmp_path, folders, trained_workdir):
  config = _config(folders, steps=4)
  config.init_from = str(trained_workdir)
  config.eval_every = 2
  train.train_and_evaluate(config, str(tmp_path / "ft"))
  (event_file,) = os.listdir(tmp_path / "ft" / "tensorboard")
  events = summaries.read_events(str(tmp_path / "ft" / "tensorboard" / event_file))
  logged = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  assert logged[(2, "eval/examples")] == logged[(4, "eval/examples")] == 13
  for step in (2, 4):
    assert 0.0 <= logged[(step, "eval/top1")] <= logged[(step, "eval/top5")] <= 1.0
    assert np.isfinite(logged[(step, "eval/loss")])
  assert logged[(4, "eval/top5")] == 1.0  # 3 classes: the top-5 always holds the label


def _image_key(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_eval_counts_every_example_once_over_two_processes(folders):
  config = _config(folders)
  config.classifier.num_classes = 3
  model = classifier.Classifier(config.model, config.classifier, rngs=nnx.Rngs(3))
  # reference: one numpy pass over the 13 images in order, one at a time
  single = list(mae_data.create_eval_iterator(config, process_index=0, process_count=1))
  images = np.concatenate([b["images"][b["valid"]] for b in single])
  labels = np.concatenate([b["label"][b["valid"]] for b in single])
  assert len(labels) == 13
  logits = np.concatenate([np.asarray(model(mae_data_normalize(x[None]))) for x in images])
  want_top1 = float(np.mean(np.argmax(logits, axis=1) == labels))
  # two simulated processes, local batch 2: 7 + 6 examples, last batches padded and masked
  totals, seen = {}, []
  for process in range(2):
    batches = list(mae_data.create_eval_iterator(config, process_index=process, process_count=2))
    assert len(batches) == 4  # every process yields the same number of batches
    for batch in batches:
      seen += [_image_key(x) for x in batch["images"][batch["valid"]]]
      for k, v in classify.eval_sums(model, batch).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  assert sorted(seen) == sorted(_image_key(x) for x in images)  # each exactly once
  assert totals["count"] == 13
  np.testing.assert_allclose(totals["top1"] / totals["count"], want_top1, atol=1e-6)


def mae_data_normalize(images):
  from mae_jax import imaging  # pylint: disable=import-outside-toplevel
  return imaging.normalize(images) if images.dtype == np.uint8 else images


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mae_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _flags(folders, workdir, *extra):
  tiny = ",".join(f"{k}={v}" for k, v in TINY.items())
  return (f"--config=configs/finetune_vit_b.py:{tiny}", f"--workdir={workdir}",
          "--config.data.dataset=image_folder", f"--config.data.folder={folders[0]}",
          f"--config.data.eval_folder={folders[1]}", "--config.batch_size=4",
          "--config.total_steps=2", "--config.warmup_steps=1", "--config.log_every=1",
          "--config.mesh.data=1", *extra)


@pytest.mark.parametrize("extra,message", [
    (("--config.classifier.num_classes=5",),
     r"num_classes=5 but .*eval.* has 3 classes|num_classes=5 but .* has 3 classes"),
    (("--config.init_from={other}",),
     r"the checkpoint's encoder has embed_dim=48 .* but config.model has embed_dim=32"),
    (("--eval_only", "--config.init_from={mae}"),
     r"has no classifier head"),
])
def test_bad_input_is_one_clear_error_before_compile(tmp_path, folders, trained_workdir,
                                                     extra, message):
  from conftest import write_pth  # pylint: disable=import-outside-toplevel
  from mae_jax.weights import keys  # pylint: disable=import-outside-toplevel
  from mae_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  other = model_lib.MAE(dict(TINY, embed_dim=48), rngs=nnx.Rngs(0))
  pth = write_pth(tmp_path / "other.pth", keys.official_state_dict(other))
  extra = [e.format(other=pth, mae=trained_workdir) for e in extra]
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("mine")
  result = _cli(*_flags(folders, workdir), *extra)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert re.search(message, line), result.stderr[-3000:]
  assert "compiled" not in result.stdout
  assert sorted(os.listdir(workdir)) == ["keep.txt"]  # nothing written or removed


def test_eval_only_of_a_classifier_checkpoint_prints_metrics(tmp_path, folders, trained_workdir):
  workdir = tmp_path / "clf"
  ok = _cli(*_flags(folders, workdir, f"--config.init_from={trained_workdir}"))
  assert ok.returncode == 0, ok.stderr[-3000:]
  out = _cli(*_flags(folders, tmp_path / "unused", "--eval_only", f"--restore={workdir}"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split() for line in out.stdout.splitlines() if line.startswith("eval/"))
  assert float(lines["eval/examples"]) == 13 and 0 <= float(lines["eval/top1"]) <= 1
  assert not (tmp_path / "unused").exists()
  # the Python API opens the classifier too; its predictions give the same top-1
  import mae_jax  # pylint: disable=import-outside-toplevel
  loaded = mae_jax.load(workdir)
  config = _config(folders)
  config.classifier.num_classes = 3
  hits = count = 0
  for batch in mae_data.create_eval_iterator(config, process_index=0, process_count=1):
    images = mae_data_normalize(batch["images"])
    assert loaded.logits(images).shape == (len(images), 3)
    assert loaded.encode(images).shape == (len(images), 32)
    hits += int((np.asarray(loaded.predict(images)) == batch["label"])[batch["valid"]].sum())
    count += int(batch["valid"].sum())
  np.testing.assert_allclose(hits / count, float(lines["eval/top1"]), atol=1e-5)


def test_eval_only_of_an_official_linear_probe_pth_equals_the_checkpoint_it_came_from(
    tmp_path, folders, trained_workdir):
  """The whole-classifier path of --eval_only (an official-format .pth, BatchNorm head and
  running statistics included) scores exactly what evaluating our checkpoint scores."""
  pytest.importorskip("torch")
  from conftest import write_pth  # pylint: disable=import-outside-toplevel
  from mae_jax.weights import classifier as classifier_weights  # pylint: disable=import-outside-toplevel
  config = _config(folders, "linprobe")
  config.init_from = str(trained_workdir)
  train.train_and_evaluate(config, str(tmp_path / "probe"))
  model = classifier_weights.restore_classifier(tmp_path / "probe")[0]
  state_dict = classifier_weights.classifier_state_dict(model)
  assert {"head.0.running_mean", "head.0.running_var", "head.1.weight"} <= set(state_dict)
  pth = write_pth(tmp_path / "probe.pth", state_dict)
  from_pth = dict(train.evaluate(config, pth))
  from_ckpt = dict(train.evaluate(config, str(tmp_path / "probe")))
  assert from_pth["eval/examples"] == from_ckpt["eval/examples"] == 13
  for name in ("eval/top1", "eval/top5", "eval/loss"):
    np.testing.assert_allclose(from_pth[name], from_ckpt[name], rtol=1e-6, err_msg=name)


def test_init_from_an_hf_directory_starts_from_its_encoder(tmp_path, folders):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.ViTMAEConfig(
      image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32,
      decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=128,
      hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=0.75)
  torch.manual_seed(0)
  hf_model = transformers.ViTMAEForPreTraining(hf_config)
  hf_model.save_pretrained(tmp_path / "hf")
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  config = _config(folders, "linprobe")
  config.init_from = str(tmp_path / "hf")
  params, _ = _initial(config, tmp_path / "run")
  attn = "vit.layers.1.attention"  # transformers 5.x names
  qkv = np.concatenate([sd[f"{attn}.{n}_proj.weight"] for n in "qkv"]).T
  np.testing.assert_array_equal(params["['blocks'][1]['attn']['qkv']['kernel'].value"], qkv)
  np.testing.assert_array_equal(params["['cls_token'].value"].ravel(),
                                sd["vit.embeddings.cls_token"].ravel())
  np.testing.assert_array_equal(params["['norm']['scale'].value"], sd["vit.layernorm.weight"])
  patch = sd["vit.embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
  np.testing.assert_array_equal(params["['patch_embed']['proj']['kernel'].value"],
                                patch.transpose(2, 3, 1, 0))


def test_finetune_init_from_our_linear_probe_checkpoint_takes_its_encoder_not_its_head(
    tmp_path, folders, trained_workdir, caplog):
  probe = _config(folders, "linprobe")
  probe.init_from = str(trained_workdir)
  train.train_and_evaluate(probe, str(tmp_path / "probe"))
  config = _config(folders)
  config.init_from = str(tmp_path / "probe")
  with caplog.at_level("INFO", logger="mae_jax"):
    params, _ = _initial(config, tmp_path / "ft")
  assert "mae_jax classifier checkpoint (step 4)" in caplog.text
  mae = workdir_lib.restore_mae(trained_workdir)[0]  # the probe never moved the encoder
  np.testing.assert_array_equal(params["['blocks'][0]['attn']['qkv']['kernel'].value"],
                                np.asarray(mae.blocks[0].attn.qkv.kernel[...]))
  # fine-tuning has a plain linear head on fc_norm: freshly initialised, not the probe's
  assert "['head']['kernel'].value" in params
  assert not any(k.startswith("['head'][1]") for k in params)


def test_finetune_init_from_a_finetuned_checkpoint_takes_all_weights_and_starts_at_step_0(
    tmp_path, folders, trained_workdir):
  first = _config(folders)
  first.init_from = str(trained_workdir)
  done, _ = train.train_and_evaluate(first, str(tmp_path / "ft"))
  config = _config(folders)
  config.init_from = str(tmp_path / "ft")
  mesh = sharding.make_mesh(config.mesh)
  classify.TASK.check(config)
  built = steps_lib.build(config, mesh, config.total_steps, config.warmup_steps)
  state, _, data_state, start = initial_state.restore_or_init(built, config, str(tmp_path / "x"))
  assert start == 0 and int(state.step) == 0 and data_state is None  # lr schedule from 0
  want, got = _leaves(done.params), _leaves(state.params)
  assert sorted(want) == sorted(got) and all(np.array_equal(want[k], got[k]) for k in want)
  fresh = built.init_opt(state.params)  # a new run: a fresh optimizer, not the old moments
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
