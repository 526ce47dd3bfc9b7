"""Pictures of runs and models: metric charts, and where an answer looks in the image.

matplotlib's object API (a `Figure`, no pyplot state), so the same code saves
PNGs from tools/plot.py and shows inline in notebooks.
"""
import json
import math
import pathlib

from flax import traverse_util
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np

from mmjax.models import deep_fusion
from mmjax.models import vit

# Chart panels: a title and which metrics.jsonl keys it draws.
PANELS = (
    ("loss", lambda key: key in ("loss", "eval_loss")),
    ("held-out scores", lambda key: key.startswith(("vqa/", "caption/"))
     or key in ("eval_accuracy", "eval_top1")),
    ("learning rate", lambda key: key == "learning_rate"),
    ("throughput (items/s)", lambda key: key == "items_per_sec"),
    ("cross-attention gates |tanh|", lambda key: key.startswith("gate/")),
)
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x")  # with LINE_STYLES, one look per key in a panel


def read_metrics(workdir: str) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (is {workdir} a training workdir?)")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_figure(runs: dict[str, list[dict]]) -> Figure:
  """One panel per kind of metric that any run logged; each run a colour, each key a line style."""
  panels = []
  for title, wanted in PANELS:
    keys = sorted({k for rows in runs.values() for row in rows for k in row if wanted(k)})
    if keys:
      panels.append((title, keys))
  if not panels:
    raise ValueError(f"no metrics to plot in {sorted(runs)}")
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  figure = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
  for n, (title, keys) in enumerate(panels):
    axis = figure.add_subplot(rows, columns, n + 1)
    for colour, (name, metrics) in enumerate(runs.items()):
      for style, key in enumerate(keys):
        points = [(row["step"], row[key]) for row in metrics if key in row]
        if not points:
          continue
        steps, values = zip(*points)
        axis.plot(steps, values, color=f"C{colour}", linestyle=LINE_STYLES[style % 4],
                  marker=MARKERS[style % len(MARKERS)] if len(points) <= 12 else None,
                  markersize=3,
                  label=f"{name}: {key}" if len(runs) > 1 else key)
    axis.set_title(title)
    axis.set_xlabel("step")
    if title == "loss":
      axis.set_yscale("log")
    axis.legend(fontsize=7)
  return figure


def spread_figure(groups: dict[str, list[dict]], scores: tuple[str, ...],
                  reference: tuple[str, dict[str, float]] | None = None) -> Figure:
  """Bars of each group's mean score with its spread: groups {label: one dict of scores per
  seed}; each score a cluster of bars, each group a colour, the error bar the sample standard
  deviation over seeds and the dots the seeds themselves. reference (label, {score: value}):
  a dashed line across each cluster at its value (a baseline such as chance)."""
  if not groups:
    raise ValueError("no runs to chart")
  figure = Figure(figsize=(2.2 + 1.6 * len(scores) * max(1, len(groups)) / 3, 3.8),
                  layout="constrained")
  axis = figure.add_subplot(1, 1, 1)
  width = 0.8 / len(groups)
  for g, (label, runs) in enumerate(groups.items()):
    for k, score in enumerate(scores):
      values = np.array([run[score] for run in runs if score in run])
      if not len(values):
        continue
      x = k - 0.4 + width * (g + 0.5)
      spread = values.std(ddof=1) if len(values) > 1 else 0.0
      axis.bar(x, values.mean(), width, yerr=spread, capsize=3, color=f"C{g}",
               label=f"{label} ({len(values)} seeds)" if k == 0 else None)
      axis.plot(np.full(len(values), x), values, "k.", markersize=3)
  if reference is not None:
    label, values = reference
    for k, score in enumerate(scores):
      if score in values:
        axis.hlines(values[score], k - 0.45, k + 0.45, colors="k", linestyles="dashed",
                    label=label)
        label = None  # one legend entry
  axis.set_xticks(range(len(scores)), [s.rsplit("/", 1)[-1] for s in scores])
  axis.set_ylim(0, 1)
  axis.set_ylabel("held-out accuracy")
  axis.grid(axis="y", alpha=0.3)
  axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return figure


def answer_rows(prompts: list[list[int]], answers: list[list[int]],
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Each prompt then its answer, right-padded -> (tokens int32[B, W], rows bool[B, W]).

  rows marks the positions whose next-token predictions were the answer: from the
  prompt's last token to the answer's second-to-last (the prompt's last alone for
  an empty answer), the `rows` that `image_attention` averages over.
  """
  width = max(len(p) + len(a) for p, a in zip(prompts, answers))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  rows = np.zeros((len(prompts), width), bool)
  for b, (prompt, answer) in enumerate(zip(prompts, answers)):
    tokens[b, :len(prompt) + len(answer)] = list(prompt) + list(answer)
    rows[b, len(prompt) - 1:len(prompt) - 1 + max(1, len(answer))] = True
  return tokens, rows


def image_attention(model, params, tokens: jax.Array, images: jax.Array | vit.Patches,
                    rows: jax.Array) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
  """Where the positions `rows` look in the first image -> (maps float32[B, gh, gw], share [B]).

  tokens int[B, T]; images float[B, I, H, W, 3], or Patches (deep fusion; maps
  is then a list of each row's float32[gh, gw]); rows bool[B, T]: the positions
  to average over (e.g. those that produced an answer). Probabilities are
  averaged over heads, layers and rows. maps sums to one over the image's gh x gw
  patches; share is the part of the rows' attention that went to those patches
  (1 for deep fusion's cross-attention, which sees only images).

  Deep fusion: the gated cross-attention layers, over the image's visual tokens
  (the ViT's patches: a resampler's latents have no place in the image).
  Early fusion: the LM's self-attention, over the image's placeholder positions.
  """
  _, state = model.apply({"params": params}, tokens, images, mutable=["intermediates"])
  sown = traverse_util.flatten_dict(state["intermediates"])
  cross = isinstance(model, deep_fusion.Model)
  layers = "xattn_" if cross else "lm"  # deep fusion's xattn_<i> blocks; early fusion's LM
  probs = [v[0] for path, v in sown.items()
           if path[-1] == "attention" and path[0].startswith(layers)]
  probs = jnp.mean(jnp.stack(probs), axis=(0, 2))  # [B, T, S]: layers and heads averaged
  weights = rows.astype(jnp.float32)[..., None]
  probs = jnp.sum(probs * weights, axis=1) / jnp.sum(weights, axis=1)  # [B, S]
  if cross and isinstance(images, vit.Patches):
    if probs.shape[-1] != images.image_ids.shape[1]:
      raise ValueError("the visual keys are a resampler's latents, not patches: no map onto "
                       "the image")
    first = np.asarray((images.image_ids == 1) & ~images.is_cls)  # [B, P]
    grids = np.asarray(images.grids[:, 0])
    image = [np.asarray(probs[b])[first[b]] for b in range(len(first))]
    share = np.array([x.sum() for x in image])
    return [x.reshape(*grid) / max(total, 1e-9) for x, grid, total in zip(image, grids, share)
            ], share
  if cross:
    num_tokens = probs.shape[-1] // images.shape[1]  # visual keys are image-major: [I * R]
    image = probs[:, :num_tokens]
  else:  # the first P placeholder positions of each row hold the first image
    placeholders = np.asarray(tokens == model.image_token_id)
    num_tokens = int(placeholders.sum(axis=1).min()) // images.shape[1]
    columns = np.stack([np.flatnonzero(p)[:num_tokens] for p in placeholders])
    image = jnp.take_along_axis(probs, jnp.asarray(columns), axis=1)
  patch = vit.Model(**model.vit).patch_size
  grid = (images.shape[2] // patch, images.shape[3] // patch)
  if grid[0] * grid[1] != num_tokens:
    raise ValueError(f"{num_tokens} image tokens are not the {grid[0]} x {grid[1]} patch grid "
                     "(a resampler, or a class token): no map onto the image")
  share = jnp.sum(image, axis=-1)
  maps = image / jnp.maximum(share, 1e-9)[:, None]
  return np.asarray(maps.reshape(-1, *grid)), np.asarray(share)


def attention_figure(images: np.ndarray, maps: np.ndarray, titles: list[str]) -> Figure:
  """Each image (float[H, W, 3] in [0, 1]) with its patch map laid over it, titled."""
  columns = min(4, len(images))
  rows = math.ceil(len(images) / columns)
  figure = Figure(figsize=(3 * columns, 3.3 * rows), layout="constrained")
  for n, (image, grid, title) in enumerate(zip(images, maps, titles)):
    axis = figure.add_subplot(rows, columns, n + 1)
    height, width = image.shape[:2]
    axis.imshow(np.clip(image, 0, 1))
    # The same extent as the image's pixels (centres at integers), so patches line up.
    axis.imshow(grid, cmap="inferno", alpha=0.5, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                interpolation="nearest")
    axis.set_title(title, fontsize=8)
    axis.axis("off")
  return figure
