"""Pictures from a real short run: metric charts, gate values, attention maps over patches."""
import dataclasses

import jax
import jax.numpy as jnp
from matplotlib import container
import numpy as np
from PIL import Image
import pytest

from configs import deep_fusion as deep_config
from configs import early_fusion as early_config
from mmjax import checkpoint
from mmjax import models
from mmjax import plots
from mmjax import steps
from mmjax import trainer
from mmjax.data import sources
from mmjax.models import layers
from test_tools import run_tool


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
  """A short deep-fusion run on in-memory scenes, with held-out evaluation (made once: its
  tests share a group, which one worker of `pytest -n` runs under --dist loadgroup)."""
  workdir = tmp_path_factory.mktemp("deep")
  config = deep_config.get_config("tiny")
  config.update_from_flattened_dict({
      "data.name": "shapes", "total_steps": 40, "log_every": 10, "eval_every": 20,
      "eval_steps": 1, "checkpoint_every": 0, "checkpoint.async_save": False})
  trainer.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.mark.xdist_group("deep_run")
def test_gates_are_logged_and_open_from_zero(deep_run):
  rows = plots.read_metrics(deep_run)
  _, params, _ = checkpoint.read_model(str(deep_run))
  blocks = [name.split("_")[1] for name in params if name.startswith("xattn_")]
  assert blocks and all({f"gate/attn_{i}", f"gate/mlp_{i}"} <= set(row)
                        for row in rows for i in blocks)
  for i in blocks:
    assert rows[-1][f"gate/attn_{i}"] == pytest.approx(
        float(np.mean(np.abs(np.tanh(params[f"xattn_{i}"]["attn_gate"])))), rel=1e-5)
    values = [row[f"gate/attn_{i}"] for row in rows]
    assert all(0 < v < 1 for v in values) and len(set(values)) == len(values)  # moving off 0


@pytest.mark.xdist_group("deep_run")
def test_plot_tool_writes_a_chart_of_runs(deep_run, tmp_path):
  out = tmp_path / "runs.png"
  run_tool("plot.py", f"--workdir={deep_run}", f"--workdir={deep_run}", f"--out={out}")
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size[0] > 800
    pixels = np.asarray(image.convert("L"), np.float32)
  assert pixels.std() > 10  # drawn, not blank
  figure = plots.metrics_figure({"a": plots.read_metrics(deep_run)})
  titles = [axis.get_title() for axis in figure.axes]
  assert titles == ["loss", "held-out scores", "learning rate", "throughput (items/s)",
                    "cross-attention gates |tanh|"]


def test_attention_probs_against_a_direct_softmax():
  q = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))  # 4 query heads
  k = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))  # 2 key heads: GQA groups of 2
  allowed = jax.random.bernoulli(jax.random.key(2), 0.6, (2, 3, 5)).at[:, :, 0].set(True)
  allowed = allowed.at[1, 2].set(False)  # a query with no key: all zeros
  probs = layers.attention_probs(q, k, layers.Mask(explicit=allowed)).reshape(2, 4, 3, 5)
  for n in range(4):
    logits = jnp.einsum("btd,bsd->bts", q[:, :, n], k[:, :, n // 2]) / np.sqrt(8)
    expected = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    expected = jnp.where(allowed.any(-1, keepdims=True), expected, 0)
    np.testing.assert_allclose(probs[:, n], expected, atol=1e-6)


def scenes(config, count):
  examples = sources.build(config, "validation").examples(0)[:count]
  tokens, rows = plots.answer_rows([e["prompt"] for e in examples], [list(b"re")] * count, 0)
  return jnp.asarray(tokens), jnp.asarray(np.stack([e["image"] for e in examples])), rows


def test_spread_chart_draws_means_and_sample_spreads():
  groups = {"a": [{"s/x": 0.2, "s/y": 1.0}, {"s/x": 0.4, "s/y": 0.5}], "b": [{"s/x": 0.9}]}
  axis = plots.spread_figure(groups, ("s/x", "s/y"), reference=("chance", {"s/y": 0.25})).axes[0]
  assert [p.get_height() for p in axis.patches] == pytest.approx([0.3, 0.75, 0.9])
  # Error bars: the sample standard deviation over seeds (none for one seed).
  halves = []
  for errorbar in (c for c in axis.containers if isinstance(c, container.ErrorbarContainer)):
    (segment,) = errorbar.lines[2][0].get_segments()
    halves.append((segment[1][1] - segment[0][1]) / 2)
  assert halves == pytest.approx([np.std([0.2, 0.4], ddof=1), np.std([1.0, 0.5], ddof=1), 0.0])
  assert [t.get_text() for t in axis.get_xticklabels()] == ["x", "y"]
  assert [t.get_text() for t in axis.get_legend().get_texts()] == [
      "chance", "a (2 seeds)", "b (1 seeds)"]
  # The reference: one dashed line across the cluster of s/y (x = 1) at its value.
  (line,) = [c for c in axis.collections if c.get_label() == "chance"]
  np.testing.assert_allclose(line.get_segments(), [[[0.55, 0.25], [1.45, 0.25]]])


def test_answer_rows_by_hand():
  tokens, rows = plots.answer_rows([[5, 6, 7], [8]], [[1, 2], []], pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 1, 2], [8, 0, 0, 0, 0]])
  # 7 predicted 1 and 1 predicted 2; the empty answer keeps the prompt's last position.
  np.testing.assert_array_equal(rows, [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])


@pytest.mark.parametrize("name", ["early_fusion", "deep_fusion"])
def test_attention_maps_cover_the_patch_grid(name):
  config = {"early_fusion": early_config, "deep_fusion": deep_config}[name].get_config("tiny")
  config.data.name = "shapes"
  model = models.build(config.family, config.model)
  tokens, images, rows = scenes(config, 3)
  params = model.init(jax.random.key(0), tokens, images)["params"]
  # Sharper queries: at init (weights ~ N(0, 0.02)) every map is nearly flat.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 30 * x if "query" in jax.tree_util.keystr(path) else x, params)
  maps, share = plots.image_attention(model, params, tokens, images, jnp.asarray(rows))
  assert maps.shape == (3, 4, 4)  # 32 px / 8 px patches
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1, atol=1e-5)
  assert (maps >= 0).all() and not np.allclose(maps, 1 / 16, atol=1e-3)  # not flat
  if name == "deep_fusion":  # cross-attention sees only the image
    np.testing.assert_allclose(share, 1, atol=1e-5)
  else:  # self-attention shares itself between the image and the text
    assert ((share > 0) & (share < 1)).all()
  # Over two rows, the map is the share-weighted mean of each row's own map.
  singles = []
  for offset in range(2):
    one = np.zeros_like(rows)
    one[np.arange(3), np.argmax(rows, axis=1) + offset] = True
    singles.append(plots.image_attention(model, params, tokens, images, jnp.asarray(one)))
  (map_a, share_a), (map_b, share_b) = singles
  expected = (share_a[:, None, None] * map_a + share_b[:, None, None] * map_b) / (
      share_a + share_b)[:, None, None]
  np.testing.assert_allclose(maps, expected, atol=1e-5)
  np.testing.assert_allclose(share, (share_a + share_b) / 2, atol=1e-6)


def test_attention_maps_over_images_at_their_own_sizes():
  # Varied-size scenes packed one a row: each map has its image's grid (not square), and equals
  # the map of the same image run alone as a dense batch.
  config = deep_config.get_config("tiny-native")
  model = models.build(config.family, config.model)
  examples = sources.build(config, "validation").examples(0)[:3]
  tokens, rows = plots.answer_rows([e["prompt"] for e in examples], [list(b"re")] * 3, 0)
  layout = dataclasses.replace(sources.layout(config), max_images=1)
  packed = steps.batch_images(jax.tree.map(jnp.asarray, layout.pack(
      [list(e["image"]) for e in examples])))
  params = model.init(jax.random.key(0), jnp.asarray(tokens), packed)["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 30 * x if "query" in jax.tree_util.keystr(path) else x, params)
  maps, share = plots.image_attention(model, params, jnp.asarray(tokens), packed,
                                      jnp.asarray(rows))
  assert [m.shape for m in maps] == [(e["image"].shape[1] // 8, e["image"].shape[2] // 8)
                                     for e in examples]
  assert any(m.shape[0] != m.shape[1] for m in maps)
  np.testing.assert_allclose(share, 1, atol=1e-5)
  for b, e in enumerate(examples):
    alone, _ = plots.image_attention(model, params, jnp.asarray(tokens[b:b + 1]),
                                     jnp.asarray(e["image"][None]), jnp.asarray(rows[b:b + 1]))
    np.testing.assert_allclose(maps[b], alone[0], atol=1e-5)


@pytest.mark.xdist_group("deep_run")
def test_plot_tool_draws_attention_over_an_image(deep_run, tmp_path):
  image = tmp_path / "scene.png"
  config = deep_config.get_config("tiny")
  config.data.name = "shapes"
  example = sources.build(config, "validation").examples(0)[0]
  Image.fromarray(np.round(example["image"][0] * 255).astype(np.uint8)).save(image)
  out = tmp_path / "attention.png"
  run_tool("plot.py", "--attention", f"--workdir={deep_run}", f"--image={image}",
           f"--prompt={example['question']}", f"--out={out}")
  with Image.open(out) as picture:
    assert picture.format == "PNG" and np.asarray(picture.convert("L")).std() > 10
