"""tools/bench.py: its FLOP count against hand-written MaxText formulas, and one real run."""
import gzip
import json
import re
import subprocess
import sys

from flax import linen as nn
import jax
import numpy as np
import pytest

from mmjax import metrics
from mmjax import models
from mmjax import optim
from mmjax import steps
import train_cli

sys.path.insert(0, str(train_cli.ROOT / "tools"))
import bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def case_flops(name, frozen: str = ""):
  """A bench case's FLOPs a step, with the parameters the regex `frozen` names frozen."""
  config = bench.case_config(name)
  model = models.build(config.family, config.model)
  data = bench.synthetic_batch(config, np.random.default_rng(0))
  example = jax.tree.map(lambda x: x[:1], data)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   *steps.init_inputs(example))["params"])
  mask = jax.tree.map(lambda p: bool(re.search(frozen, p)), optim.param_paths(params)) if (
      frozen) else None
  return metrics.model_flops(config.family, model, params, data, mask)


def test_lm_flops_match_maxtext_formula():
  V, D, L, T, B = 512, 128, 4, 128, 8  # lm-tiny, as in the naive reference
  matmul_params = 12 * L * D * D + V * D  # blocks + the tied unembedding
  expected = 6 * matmul_params * B * T + 6 * L * T * D * B * T  # causal attention halved
  assert case_flops("lm-tiny") == pytest.approx(expected, rel=1e-9)


def test_frozen_kernels_count_no_weight_gradient():
  # LoRA's base: every projection frozen, the tied embedding trained. A frozen kernel runs
  # forward and passes the input's gradient back (4 x its parameters x tokens), no more.
  V, D, L, T, B = 512, 128, 4, 128, 8
  expected = 4 * 12 * L * D * D * B * T + 6 * V * D * B * T + 6 * L * T * D * B * T
  assert case_flops("lm-tiny", r"block_\d+/.*/kernel$") == pytest.approx(expected, rel=1e-9)


def test_a_frozen_vision_tower_runs_forward_only():
  # Early fusion with its ViT frozen: the ViT's share drops to a third (no backward pass).
  config = bench.case_config("early-tiny")
  tower = models.build("vit", config.model.vit)
  images = bench.synthetic_batch(config, np.random.default_rng(0))["images"]
  images = images.reshape(-1, *images.shape[2:])  # every image of the batch
  params = nn.unbox(jax.eval_shape(tower.init, jax.random.key(0), images[:1])["params"])
  vision = metrics.model_flops("vit", tower, params, {"images": images})
  assert case_flops("early-tiny") - case_flops("early-tiny", "^vit/") == pytest.approx(
      2 / 3 * vision, rel=1e-9)


def test_vit_flops_match_maxtext_formula():
  D, L, P, R, B, C = 128, 4, 8, 64, 16, 1000  # vit-tiny
  T = (R // P) ** 2
  forward = 2 * (12 * L * D * D + 3 * P * P * D) * B * T + 2 * D * C * B + 4 * L * T * T * D * B
  assert case_flops("vit-tiny") == pytest.approx(3 * forward, rel=1e-9)


# The naive reference lives beside the checkout (../shared, as in CI), not in it: the tests that
# compare with it say so when it is absent, rather than failing on a clone alone.
REFERENCE = train_cli.ROOT.parent / "shared" / "bench" / "naive_reference.py"
needs_reference = pytest.mark.skipif(
    not REFERENCE.exists(), reason=f"the naive reference is not beside this checkout ({REFERENCE}"
    " is absent): these tests compare mmjax with it, and CI has it")


@needs_reference
def test_bench_runs_and_compares_with_the_reference():
  result = subprocess.run(
      [sys.executable, str(train_cli.ROOT / "tools" / "bench.py"), "--cases=lm-tiny",
       "--steps=2", "--repeats=2",
       f"--reference={REFERENCE}"],
      env=train_cli.env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  *runs, ratio = lines
  ours, theirs = runs[0::2], runs[1::2]  # they take turns
  assert all(o["impl"] == "mmjax" and t["impl"] == "naive_reference" for o, t in zip(ours, theirs))
  assert ours[0]["params"] == theirs[0]["params"]  # the same model shape
  assert ratio["ratio_mmjax_over_reference"] == pytest.approx(
      max(o["tokens_per_s"] for o in ours) / max(t["tokens_per_s"] for t in theirs))
  assert ratio["ratio_each_repeat"] == pytest.approx(
      [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs)])


def test_decode_bench_reports_throughput_and_bytes_read():
  result = subprocess.run(
      [sys.executable, str(train_cli.ROOT / "tools" / "bench.py"), "--decode", "--cases=lm-tiny",
       "--decode_batches=1,4", "--prompt_len=8", "--new_tokens=6", "--steps=3"],
      env=train_cli.env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [r["batch"] for r in rows] == [1, 4]
  V, D, L, T = 512, 128, 4, 128  # lm-tiny
  params = 12 * L * D * D + 13 * L * D + V * D + T * D + 2 * D  # blocks, embeddings, final norm
  for row in rows:
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * 6 / row["seconds"])
    cache = 2 * L * D * 4 * row["batch"] * (8 + 6 / 2)  # keys + values, float32, mean length
    assert row["bytes_per_step"] == pytest.approx(4 * params + cache)
    assert row["bound_tokens_per_s"] is None  # no known bandwidth for a CPU


def test_data_bench_reports_every_source():
  result = subprocess.run(
      [sys.executable, str(train_cli.ROOT / "tools" / "bench.py"), "--data", "--steps=1"],
      env=train_cli.env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [r["source"] for r in rows] == ["shapes", "shapes-varied", "tfds_scenes"]
  for row in rows[::2]:  # a row per example
    assert row["examples_per_s"] == pytest.approx(16 * 1000 / row["ms_per_batch"])
  # Packed rows hold several examples each, and most of their patch slots.
  assert rows[1]["examples_per_s"] > 2 * 16 * 1000 / rows[1]["ms_per_batch"]
  assert 0.9 <= rows[1]["patch_slots_used"] <= 1


def test_mixed_sizes_bench_times_native_and_resized_on_the_same_images():
  (native, packed), (dense, resized), images, used = bench.mixed_size_batches("tiny-native", 2)
  assert images == int(np.sum(packed["image_grids"][..., 0] > 0)) == len(resized["tokens"])
  assert used == pytest.approx(np.mean(packed["patch_images"] > 0))
  # Every image of the packed batch is in the resized one, at the largest side.
  largest = max(max(g) for g in packed["image_grids"].reshape(-1, 2)) * 8
  assert resized["images"].shape[2:4] == (largest, largest)
  assert dense.data.image_size == largest and native.data.max_patches == 128
  # The same text: each example's loss-weighted targets, in order.
  packed_answers = [packed["targets"][r][(packed["segment_ids"][r] == k)
                                         & (packed["loss_weights"][r] > 0)].tolist()
                    for r in range(2) for k in range(1, packed["segment_ids"][r].max() + 1)]
  resized_answers = [t[w > 0].tolist() for t, w in zip(resized["targets"],
                                                       resized["loss_weights"])]
  assert packed_answers == resized_answers


@needs_reference
def test_gpu_script_keeps_going_after_a_failed_stage(tmp_path):
  # tools/gpu_bench.sh is what a short GPU lease runs; here on the CPU with the tiny LM. A
  # stage that fails (an unknown case) is logged and the stages after it still run.
  settings = dict(CASES="no-such-case,lm-tiny", FLAG_CASES="lm-tiny", DECODE_CASES="",
                  PROFILE_CASES="lm-tiny", STEPS="2", LIMIT="300")
  result = subprocess.run(["bash", str(train_cli.ROOT / "tools" / "gpu_bench.sh"), str(tmp_path)],
                          cwd=train_cli.ROOT, env={**train_cli.env(1), **settings},
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  log = (tmp_path / "log.txt").read_text()
  assert any(line.startswith("== train --cases no-such-case ") and line.endswith(": exit 1")
             for line in log.splitlines())
  assert log.rstrip().splitlines()[-1].startswith("done")
  for name in ("train", "train_flags"):
    lines = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [line.get("impl") for line in lines] == ["mmjax", "naive_reference", None]
    assert lines[0]["case"] == "lm-tiny" and lines[2]["ratio_mmjax_over_reference"] > 0
  assert f"jax {jax.__version__}" in (tmp_path / "environment.txt").read_text()
  # The profile stage: mmjax alone (no reference line), and a trace of its step's ops.
  (profiled,) = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
  assert profiled["impl"] == "mmjax" and profiled["case"] == "lm-tiny"
  (trace,) = (tmp_path / "profile" / "lm-tiny").glob("**/*.trace.json.gz")
  events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
  assert any("train_step" in event.get("name", "") for event in events)


def test_bench_needs_none_of_what_the_gpu_image_lacks():
  # The GPU image has no tfds, grain, tensorflow or tensorboardX (and may lack Pillow); a None
  # in sys.modules makes any import of them fail, so a stray top-level import shows up here.
  script = (
      "import sys\n"
      "for name in ('tensorflow_datasets', 'grain', 'tensorflow', 'tensorboardX', 'PIL'):\n"
      "  sys.modules[name] = None\n"
      f"sys.path.insert(0, {str(train_cli.ROOT / 'tools')!r})\n"
      "import bench\n"
      "print(bench.run_case('lm-tiny', 1, 'float32', 'xla')['tokens_per_s'] > 0)\n")
  result = subprocess.run([sys.executable, "-c", script], env=train_cli.env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "True"
