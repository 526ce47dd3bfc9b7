"""Tests of the trainer: learning, sharding presets, accumulation, NaN guard, checkpoints, processes."""
import importlib
import json
import re
import resource
import signal
import struct
import subprocess
import sys
import time

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import metrics
from mmjax import sharding
from mmjax import steps
from mmjax import trainer
from mmjax.data import sources
from mmjax.models import lm
from mmjax.models import vit
import train_cli
from train_cli import final_params


def config_for(name: str, arg: str = "tiny", **overrides):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config.update_from_flattened_dict({"total_steps": 8, "log_every": 2, "eval_every": 0,
                                     "checkpoint_every": 0, "checkpoint.async_save": False,
                                     **overrides})
  return config


def losses(rows):
  return [r["loss"] for r in rows if "loss" in r]


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_loss_terms_are_sums_that_split_exactly():
  model = lm.Model("gpt2-tiny", vocab_size=11)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 11, (4, 6)))
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_weights": jnp.asarray(np.random.RandomState(2).rand(4, 6) > 0.3, jnp.float32)}
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
  total, count, correct = steps.loss_terms(model, params, batch)
  logits, _ = model.apply({"params": params}, tokens)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  np.testing.assert_allclose(total, np.sum(per_token * batch["loss_weights"]), rtol=1e-6)
  assert count == np.sum(batch["loss_weights"])
  hits = (np.argmax(logits, -1) == batch["targets"]) * batch["loss_weights"]
  assert correct == np.sum(hits)
  # Summing over two halves and dividing once gives the full-batch mean.
  halves = [steps.loss_terms(model, params, jax.tree.map(lambda x, i=i: x[i:i + 2], batch))
            for i in (0, 2)]
  np.testing.assert_allclose(sum(h[0] for h in halves) / sum(h[1] for h in halves),
                             total / count, rtol=1e-6)


def test_multi_hot_labels_take_a_sigmoid_per_class_and_precision_at_1():
  model = vit.Model(variant="mu/8", image_size=16, pool="gap", num_classes=5)
  images = jnp.asarray(np.random.RandomState(0).rand(3, 16, 16, 3), jnp.float32)
  params = nn.unbox(model.init(jax.random.key(0), images))["params"]
  logits = np.asarray(model.apply({"params": params}, images)[0], np.float64)
  top = logits.argmax(-1)
  labels = np.zeros((3, 5), np.float32)
  labels[0, top[0]] = 1  # the top class is one of row 0's
  labels[1, (top[1] + 1) % 5] = labels[1, (top[1] + 2) % 5] = 1  # and none of row 1's
  labels[2, [top[2], (top[2] + 3) % 5]] = 1
  total, count, correct = steps.loss_terms(model, params, {"images": images, "labels": labels})
  p = 1 / (1 + np.exp(-logits))
  by_hand = -np.sum(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(total, by_hand, rtol=1e-5)
  assert count == 3 and correct == 2


def test_tiny_lm_trains(tmp_path, run_train):
  rows = run_train(tmp_path, "lm.py:tiny", {"total_steps": 120, "log_every": 20,
                                            "eval_every": 120, "optimizer.decay_steps": 120})
  assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
  assert all("loss" in r and "learning_rate" in r and "items_per_sec" in r for r in rows)
  # Uniform over 256 bytes is 5.5 nats; the digit/symbol alphabet alone gets below 2.6.
  assert rows[0]["loss"] < 5.5 and rows[-1]["loss"] < 2.0
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
  assert rows[-1]["eval_loss"] < 2.0 and rows[-1]["eval_accuracy"] > 0.3
  assert rows[-1]["eval_perplexity"] == pytest.approx(np.exp(rows[-1]["eval_loss"]), rel=1e-6)
  logged = tensorboard_scalars(tmp_path / "tensorboard")
  for name in ("loss", "learning_rate", "eval_loss"):
    expected = [(r["step"], r[name]) for r in rows if name in r]
    assert [step for step, _ in logged[name]] == [step for step, _ in expected], name
    np.testing.assert_allclose([v for _, v in logged[name]], [v for _, v in expected], rtol=1e-6)


def test_a_resumed_run_lists_each_step_once_in_metrics_and_tensorboard(tmp_path):
  first = metrics.Writer(str(tmp_path))
  for step in (10, 20, 30):
    first.write(step, {"loss": float(step)})
  first.close()  # it stopped after saving step 20: the resumed run logs step 30 again
  time.sleep(1.1)  # event files are named by the second they were opened in
  second = metrics.Writer(str(tmp_path), after_step=20)
  second.write(30, {"loss": 3.0})
  second.write(40, {"loss": 4.0})
  second.close()
  expected = [(10, 10.0), (20, 20.0), (30, 3.0), (40, 4.0)]
  assert [(r["step"], r["loss"]) for r in train_cli.read_metrics(tmp_path)] == expected
  assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == expected


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """tag -> (step, value) as TensorBoard shows them, from its event files (TFRecords of Event
  protos, named by their start time): a session's START event at step s hides the earlier
  events of steps >= s."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(logdir.iterdir()):
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # [length: u64][its crc: u32][event][its crc: u32]
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {tag: [(step, v) for step, v in rows if step < event.step]
                   for tag, rows in scalars.items()}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.mark.parametrize("name", ["early_fusion", "deep_fusion"])
def test_fusion_models_learn_from_the_image(tmp_path, run_train, name):
  rows = run_train(tmp_path, f"{name}.py:tiny", {
      "total_steps": 400, "log_every": 50, "eval_every": 400, "optimizer.decay_steps": 400,
      "data.max_shapes": 1, "data.name": "shapes"},  # in memory: no 50k-scene build for this
                   fast_compile=False)
  # Greedy answers to 128 held-out questions about one-shape scenes. The question alone leaves
  # colour and place at 1/4 and the count ("how many squares?": zero or one) at 1/2.
  last = rows[-1]
  assert last["vqa/accuracy_colour"] > 0.8 and last["vqa/accuracy"] > 0.5, last
  samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == 8 and all(s["step"] == 400 for s in samples)
  # Throughput counts the tokens the loss is on (the answers), not the prompt or padding:
  # over the last logged steps (351-400, batches 351-400) their share of the batch slots.
  config = config_for(name, **{"data.max_shapes": 1, "data.name": "shapes"})
  data = sources.build(config)
  weights = [data.batch(s)["loss_weights"] for s in range(351, 401)]
  share = sum(w.sum() for w in weights) / sum(w.size for w in weights)
  assert last["items_per_sec"] / last["padded_items_per_sec"] == pytest.approx(share, rel=1e-5)
  assert share < 0.5
  assert {"prompt", "answer", "truth", "type"} <= set(samples[0])


# ----------------------------------------------------------------------------
# Sharding presets on 8 fake devices reproduce one device.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,presets", [
    ("lm", [("dp", dict(data=-1, fsdp=1, tensor=1)), ("fsdp", dict(data=1, fsdp=-1, tensor=1)),
            ("fsdp_tp", dict(data=2, fsdp=-1, tensor=2))]),
    ("early_fusion", [("fsdp_tp", dict(data=1, fsdp=-1, tensor=2))]),
    ("deep_fusion", [("fsdp_tp", dict(data=2, fsdp=-1, tensor=2))]),
])
def test_sharded_runs_match_one_device(tmp_path, run_train, name, presets):
  reference = losses(run_train(tmp_path / "one", f"{name}.py:tiny", {
      "total_steps": 8, "log_every": 2, "eval_every": 0, "checkpoint_every": 0}, devices=1))
  assert jax.device_count() == 8
  for rules, shape in presets:
    config = config_for(name, **{"mesh.rules": rules, **{f"mesh.shape.{k}": v
                                                        for k, v in shape.items()}})
    workdir = tmp_path / rules
    trainer.train_and_evaluate(config, str(workdir))
    np.testing.assert_allclose(losses(train_cli.read_metrics(workdir)), reference, rtol=2e-5,
                               err_msg=f"{name} with {rules} {shape}")


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path):
  # SGD: its update is linear in the gradient, so the two differ by summation order only
  # (Adam's 1/sqrt(v) would blow a near-zero gradient's noise up to a full step).
  sgd = {"optimizer.name": "sgd"}
  whole = trainer.train_and_evaluate(config_for("lm", **sgd), str(tmp_path / "whole"))
  accumulated = trainer.train_and_evaluate(config_for("lm", microbatches=2, **sgd),
                                           str(tmp_path / "micro"))
  np.testing.assert_allclose(losses(train_cli.read_metrics(tmp_path / "micro")),
                             losses(train_cli.read_metrics(tmp_path / "whole")), rtol=2e-5)
  assert accumulated["step"] == whole["step"] == 8
  assert_trees_close(final_params(tmp_path / "micro"), final_params(tmp_path / "whole"),
                     rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arg,steps", [("tiny", 100), ("tiny-scenes", 300)])
def test_vit_family_trains(tmp_path, arg, steps):
  config = config_for("vit", arg, total_steps=steps, log_every=20, eval_every=steps,
                      eval_steps=2, **{"optimizer.learning_rate": 3e-3})
  last = trainer.train_and_evaluate(config, str(tmp_path))
  rows = losses(train_cli.read_metrics(tmp_path))
  assert rows[-1] < rows[0] - 0.5  # from ln(32) = 3.47 (one class), 32 ln(2) = 22.2 (multi-hot)
  # Chance: 1/32 (tiny); the top class among a scene's one or two (tiny-scenes): 1.5/32.
  assert last["eval_top1"] > 0.2


def test_generated_answers_are_the_same_on_a_sharded_mesh(tmp_path, run_train):
  overrides = {"total_steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1}
  one = run_train(tmp_path / "one", "deep_fusion.py:tiny", overrides, devices=1)
  config = config_for("deep_fusion", **{"mesh.rules": "fsdp_tp", "mesh.shape.data": 2,
                                        "mesh.shape.fsdp": -1, "mesh.shape.tensor": 2,
                                        **overrides})
  eight = trainer.train_and_evaluate(config, str(tmp_path / "eight"))
  read = lambda run: [json.loads(line)["answer"]
                      for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
  assert read("eight") == read("one") and any(read("one"))
  assert eight["vqa/accuracy"] == one[-1]["vqa/accuracy"]


@pytest.mark.parametrize("name,arg", [("deep_fusion", "tiny-native"),
                                      ("early_fusion", "tiny-anyres")])
def test_native_resolution_trains_and_answers_alike_on_one_and_eight_devices(tmp_path, run_train,
                                                                             name, arg):
  # Varied-size scenes at their own resolution (packed patches for deep fusion, AnyRes tiles
  # for early fusion), through train.py on one device, then sharded over 8 (fsdp_tp): the same
  # losses and the same greedy answers.
  overrides = {"total_steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1,
               "batch_size": 4}
  one = run_train(tmp_path / "one", f"{name}.py:{arg}", overrides, devices=1)
  config = config_for(name, arg, **{
      "mesh.rules": "fsdp_tp", "mesh.shape.data": 2, "mesh.shape.fsdp": -1,
      "mesh.shape.tensor": 2, **overrides})
  eight = trainer.train_and_evaluate(config, str(tmp_path / "eight"))
  np.testing.assert_allclose(losses(train_cli.read_metrics(tmp_path / "eight")), losses(one),
                             rtol=2e-5)
  assert all(np.isfinite(losses(one)))
  read = lambda run: [json.loads(line)["answer"]
                      for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
  assert read("eight") == read("one") and len(read("one")) == 4
  assert eight["vqa/accuracy"] == one[-1]["vqa/accuracy"]


# ----------------------------------------------------------------------------
# Non-finite updates.
# ----------------------------------------------------------------------------


def test_nan_skip_policy_skips_and_counts(tmp_path):
  # A learning rate of 1e30 makes the second step's loss non-finite.
  config = config_for("lm", **{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0,
                               "nan_policy": "skip", "checkpoint_every": 4})
  last = trainer.train_and_evaluate(config, str(tmp_path))
  assert last["skipped_steps"] >= 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_params(tmp_path)))


def test_nan_stop_policy_names_the_step(tmp_path):
  config = config_for("lm", **{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0,
                               "nan_policy": "stop"})
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step \d+"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


# ----------------------------------------------------------------------------
# Bad configs fail before compiling, naming the key.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"model.num_heads": 5}, r"config.model.num_heads=5 does not divide config.model.width=64"),
    ({"model.num_kv_heads": 3}, r"config.model.num_kv_heads=3 does not divide"),
    ({"mesh.shape.data": 3}, r"config.mesh.shape .* does not divide 8 devices"),
    ({"batch_size": 12}, r"config.batch_size=12 .* not divisible by the data-parallel size 8"),
    ({"microbatches": 3}, r"config.microbatches=3 must be >= 1 and divide"),
    ({"optimizer.name": "lion"}, r"config.optimizer.name must be one of"),
    ({"nan_policy": "ignore"}, r"config.nan_policy must be one of"),
    ({"model.variant": "gpt5"}, r"unknown LM variant 'gpt5'"),
    ({"family": "rnn"}, r"config.family must be one of"),
    ({"model.vocab_size": 100}, r"config.model.vocab_size=100 is smaller than the tokenizer's "
                                r"320 ids \(ByteTokenizer\(\)"),
    ({"batch_size": 0}, r"config.batch_size must be >= 1, got 0"),
    ({"total_steps": 0}, r"config.total_steps must be >= 1, got 0"),
    ({"log_every": 0}, r"config.log_every must be >= 1, got 0"),
    ({"eval_steps": -1}, r"config.eval_steps must be >= 1, got -1"),
    ({"optimizer.learning_rate": 0.0}, r"config.optimizer.learning_rate must be > 0, got 0.0"),
    ({"optimizer.b2": 1.0}, r"config.optimizer.b2 must be >= 0 and < 1, got 1.0"),
    ({"optimizer.warmup_steps": 10, "optimizer.decay_steps": 10},
     r"config.optimizer.decay_steps=10 must exceed the warmup's 10 steps"),
    ({"data.seq_len": 1}, r"config.data.seq_len must be >= 2, got 1"),
    ({"checkpoint.max_to_keep": 0}, r"config.checkpoint.max_to_keep must be >= 1, got 0"),
    ({"model.max_len": 0}, r"config.model.max_len must be >= 1, got 0"),
])
def test_bad_configs(overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.validate(config_for("lm", **overrides), 8)


def test_fusion_tower_heads_are_checked():
  config = config_for("deep_fusion", **{"model.vit.num_heads": 3})
  with pytest.raises(ValueError, match=r"config.model.vit.num_heads=3 does not divide "
                                       r"config.model.vit.width=32"):
    trainer.validate(config, 8)


def test_bad_config_on_the_command_line(tmp_path):
  result = subprocess.run(
      train_cli.command(tmp_path, "lm.py:tiny", {"optimizer.name": "lion"}),
      env=train_cli.env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.optimizer.name must be one of" in result.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------
# Resume, preemption, determinism, several processes.
# ----------------------------------------------------------------------------

LONG = {"total_steps": 120, "log_every": 10, "eval_every": 0, "checkpoint_every": 20}
# Every run of LONG steps (and each run one is compared with) runs optimised code.
OPTIMISED = {"fast_compile": False}


def start_train(workdir, overrides):
  return subprocess.Popen(train_cli.command(workdir, "lm.py:tiny", overrides),
                          env=train_cli.env(1, **OPTIMISED), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, run_train_module):
  """LONG, uninterrupted: what an interrupted and resumed run must end as."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, run_train_module(workdir, "lm.py:tiny", LONG, **OPTIMISED)


@pytest.mark.xdist_group("straight_run")
def test_sigkill_then_resume_is_bit_identical(tmp_path, run_train, straight_run):
  process = start_train(tmp_path / "killed", LONG)
  train_cli.wait_for(tmp_path / "killed" / "checkpoints" / "40" / "commit_success.txt")
  process.kill()
  process.wait()
  assert 120 not in [int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                     if p.name.isdigit()], "the run finished before it was killed"
  rows = run_train(tmp_path / "killed", "lm.py:tiny", LONG, **OPTIMISED)
  assert_trees_equal(final_params(tmp_path / "killed"), final_params(straight_run[0]))
  # Rows logged after the last checkpoint, before the kill, are not listed twice.
  assert [r["step"] for r in rows] == [r["step"] for r in straight_run[1]]


@pytest.mark.xdist_group("straight_run")
def test_a_full_disk_stops_the_run_in_a_line_and_keeps_the_newest_checkpoint(tmp_path, run_train,
                                                                            straight_run):
  process = start_train(tmp_path, LONG)
  train_cli.wait_for(tmp_path / "checkpoints" / "40" / "commit_success.txt")
  # As on a full disk, from here no file of the run may grow past 64 KiB: a checkpoint's array
  # file would (626 KB), the metrics and TensorBoard files do not.
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 1, stderr[-2000:]
  directory = tmp_path / "checkpoints"
  said = re.search(rf"^error: saving checkpoint step (\d+) in {directory} failed \(File too large, "
                   rf"errno 27\); checkpoint step (\d+) \({directory}/\d+\) is intact and the "
                   r"same command resumes from it once the storage is fixed$", stderr, re.M)
  # The traces of the failed writes run to thousands of lines: show mmjax's own lines first.
  assert said, "\n".join(line for line in stderr.splitlines()
                         if line.startswith(("error", "mmjax"))) + "\n..." + stderr[-1000:]
  failed, intact = int(said.group(1)), int(said.group(2))
  assert failed > intact >= 40
  rows = run_train(tmp_path, "lm.py:tiny", LONG, **OPTIMISED)  # the disk has room again
  assert_trees_equal(final_params(tmp_path), final_params(straight_run[0]))
  assert [r["step"] for r in rows] == [r["step"] for r in straight_run[1]]


@pytest.mark.xdist_group("straight_run")
def test_ctrl_c_saves_the_step_and_the_same_command_resumes(tmp_path, run_train, straight_run):
  # A shell starting a job in the background leaves it SIGINT ignored, a terminal does not:
  # the child takes SIGINT's default before it becomes train.py (an exec keeps it).
  process = subprocess.Popen(
      [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
       "signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
       *train_cli.command(tmp_path, "lm.py:tiny", {**LONG, "checkpoint_every": 1000})],
      env=train_cli.env(1, **OPTIMISED), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  train_cli.wait_for(tmp_path / "metrics.jsonl")  # step 10 is done
  process.send_signal(signal.SIGINT)
  sent = time.time()
  _, stderr = process.communicate(timeout=120)
  assert time.time() - sent < 30, "Ctrl-C took more than a few steps to stop the run"
  assert process.returncode == 130, stderr[-2000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 10 <= saved[0] < 120, saved
  assert f"stopped by Ctrl-C: step {saved[0]} of 120" in stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  rows = run_train(tmp_path, "lm.py:tiny", {**LONG, "checkpoint_every": 1000}, **OPTIMISED)
  assert [r["step"] for r in rows] == [r["step"] for r in straight_run[1]]
  assert rows[-1]["loss"] == straight_run[1][-1]["loss"]
  assert_trees_equal(final_params(tmp_path), final_params(straight_run[0]))


def test_total_steps_plans_the_schedule_and_extending_a_run_re_plans_it(tmp_path):
  def run(total_steps):
    result = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", {
        "total_steps": total_steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0}),
                            env=train_cli.env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, {r["step"]: r["learning_rate"] for r in train_cli.read_metrics(tmp_path)}

  # The file plans 1000 steps (warmup 100); 40 steps warm up for 4 and decay to 0 at step 40.
  _, rates = run(40)
  peak = 3e-3
  assert max(rates.values()) == pytest.approx(peak) and rates[5] == pytest.approx(peak)
  assert rates[40] < 1e-2 * peak  # the rate used by step 40: schedule(39), its last but one
  # Extended to 80: planned again over 80 steps, with a warning, never at rate 0.
  said, rates = run(80)
  assert "checkpoint step 40 was saved by a run of 40 steps, this one runs 80" in said
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, 8),
                                   optax.cosine_decay_schedule(peak, 72)], [8])
  for step in (41, 60, 80):
    assert rates[step] == pytest.approx(float(schedule(step - 1)))
  assert min(rates[s] for s in range(41, 80)) > 0 and rates[80] < 1e-2 * peak


def test_sigterm_saves_and_exits_cleanly(tmp_path, run_train):
  process = start_train(tmp_path, {**LONG, "checkpoint_every": 1000})
  train_cli.wait_for(tmp_path / "metrics.jsonl")
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 10 <= steps[0] < 120
  assert "stopped at step" in stderr
  # Resumes from the preemption checkpoint.
  rows = run_train(tmp_path, "lm.py:tiny", LONG, **OPTIMISED)
  logged = [r["step"] for r in rows]
  assert logged == sorted(set(logged)) and logged[-1] == 120  # continued, not restarted


def test_a_missing_process_is_a_line_within_the_join_timeout(tmp_path):
  started = time.time()
  result = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", {
      "distributed.coordinator_address": f"127.0.0.1:{train_cli.free_port()}",
      "distributed.num_processes": 2, "distributed.process_id": 0,
      "distributed.join_timeout_s": 3}), env=train_cli.env(1), capture_output=True, text=True,
                          timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and time.time() - started < 30
  assert lines[0].startswith("mmjax: process 0 of 2: waiting up to 3 s for all 2 to join")
  assert lines[1:] == [f"error: not all 2 processes joined {lines[0].split()[-1]} within 3 s "
                       "(config.distributed.join_timeout_s): run the same command on every host, "
                       "each with its own config.distributed.process_id"], lines
  assert not tmp_path.joinpath("checkpoints").exists()


def test_two_processes_match_one(tmp_path, run_train):
  # (Two-process runs that stop, on a fault or a signal, and resume on 1, 2 or 4 processes are
  # tests/test_pods.py's: they end bit-identical to a two-process run that never stopped.)
  run = {"total_steps": 20, "log_every": 5, "eval_every": 0, "checkpoint_every": 10}
  single = run_train(tmp_path / "single", "lm.py:tiny", run)
  two = train_cli.run_processes(tmp_path / "two", "lm.py:tiny", run)
  assert [r["step"] for r in two] == [5, 10, 15, 20]
  np.testing.assert_allclose(losses(two), losses(single), rtol=2e-5)
  # Adam divides by sqrt(v): near-zero gradients turn summation-order noise into ~1e-6 moves.
  assert_trees_close(final_params(tmp_path / "two"), final_params(tmp_path / "single"),
                     rtol=1e-4, atol=2e-5)


def test_two_processes_train_lora_over_an_int8_base_as_one(tmp_path, run_train):
  overrides = {"total_steps": 10, "log_every": 5, "eval_every": 0, "checkpoint_every": 10,
               "optimizer.lora.base_dtype": "int8"}
  single = run_train(tmp_path / "single", "lm.py:tiny,lora", overrides)
  two = train_cli.run_processes(tmp_path / "two", "lm.py:tiny,lora", overrides)
  np.testing.assert_allclose(losses(two), losses(single), rtol=2e-5)
  one_params, two_params = final_params(tmp_path / "single"), final_params(tmp_path / "two")
  assert one_params["block_0"]["attn"]["query"]["kernel"].dtype == np.int8
  assert_trees_close(two_params, one_params, rtol=1e-4, atol=2e-5)


def test_frozen_parameters_get_no_gradient_and_no_say_in_grad_norm():
  # Flamingo's recipe: both towers frozen. The step differentiates the adapter and cross
  # blocks only: grad_norm is theirs, the towers stay bit-identical, and the compiled step does
  # far less work (no backward pass through the ViT, no weight gradients in the LM).
  config = config_for("deep_fusion", "tiny,flamingo", **{"data.name": "shapes", "batch_size": 8,
                                                        "optimizer.warmup_steps": 0})
  run = steps.setup(config)
  state = run.init(jax.random.key(0))
  batch = sharding.global_batch(sources.build(config).batch(1), run.mesh)
  params = jax.device_get(state["params"])
  train_step, _ = run.compile()
  new_state, metrics = train_step(state, batch)

  def loss(trained):
    total, count, _ = steps.loss_terms(run.model, {**params, **trained}, batch)
    return total / count

  trained = {k: v for k, v in params.items() if not k.startswith(("vit", "lm"))}
  expected = optax.tree.norm(jax.jit(jax.grad(loss))(trained))
  np.testing.assert_allclose(metrics["grad_norm"], expected, rtol=1e-4)
  new_params = jax.device_get(new_state["params"])
  assert_trees_equal(new_params["vit"], params["vit"])
  assert_trees_equal(new_params["lm"], params["lm"])
  assert not np.array_equal(new_params["adapter"]["dense_0"]["kernel"],
                            params["adapter"]["dense_0"]["kernel"])
  everything = steps.setup(config_for("deep_fusion", "tiny", **{"data.name": "shapes",
                                                                "batch_size": 8}))
  flops = lambda r: float(r.compile_train().cost_analysis()["flops"])
  assert flops(run) < 0.85 * flops(everything)
