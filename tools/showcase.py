"""Early vs deep fusion, with error bars: trains each scheme over several seeds, same towers,
same data, and reports held-out VQA as mean and spread.

  python tools/showcase.py --out /tmp/showcase                        # the tiny pair, 3 seeds
  python tools/showcase.py --out /tmp/showcase --schemes deep_fusion \\
      --name gate=channel --set model.gate=channel                    # one ablation of deep fusion

Each run is `train.py --config configs/<scheme>.py:<pair> --config.seed=S` with the --set
overrides, evaluated once at its last step on --questions held-out questions (greedy, exact
match; per question type too). Every run's scores and wall time are appended to
OUT/results.jsonl under --name; the table printed at the end covers every name in that file,
so ablations add rows to the same table. A finished run (its workdir has the final metrics) is
read, not trained again.
"""
import collections
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import flags

from mmjax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCORES = ("vqa/accuracy", "vqa/accuracy_colour", "vqa/accuracy_count", "vqa/accuracy_position")
TEXT_ONLY = "text only: the commonest training answer to each question"

_OUT = flags.DEFINE_string("out", None, "Directory for the runs and results.jsonl.")
_PAIR = flags.DEFINE_string("pair", "tiny", "The backbone pair of configs/<scheme>.py.")
_SCHEMES = flags.DEFINE_list("schemes", ["early_fusion", "deep_fusion"], "Schemes to train.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) per scheme.")
_NAME = flags.DEFINE_string("name", "default", "What these runs are called in the table.")
_SET = flags.DEFINE_multi_string("set", [], "key=value config overrides for these runs.")
_QUESTIONS = flags.DEFINE_integer("questions", 1024, "Held-out questions per evaluation.")
_CHART = flags.DEFINE_string("chart", None, "Also draw the table's scores as bars with their "
                             "spread over seeds into this PNG.")
_CHART_RUNS = flags.DEFINE_list("chart_runs", [], "NAME:SCHEME rows for --chart, in order "
                                "(default: every row).")
flags.mark_flag_as_required("out")


def train(workdir: pathlib.Path, scheme: str, seed: str, overrides: list[str]) -> dict:
  """Trains one run (or reads a finished one) -> its last metrics row with "wall_seconds"."""
  done = workdir / "showcase.json"
  if done.exists():
    return json.loads(done.read_text())
  command = [sys.executable, str(ROOT / "train.py"),
             f"--config={ROOT / 'configs' / scheme}.py:{_PAIR.value}", f"--workdir={workdir}",
             f"--config.seed={seed}", *(f"--config.{o}" for o in overrides)]
  tic = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = {**rows[-1], "wall_seconds": time.perf_counter() - tic}
  done.write_text(json.dumps(last))
  return last


def evaluation_overrides(total_steps: int, batch_size: int) -> list[str]:
  """One evaluation, at the last step, on --questions held-out questions."""
  return [f"eval_every={total_steps}", f"log_every={total_steps}",
          f"eval_steps={-(-_QUESTIONS.value // batch_size)}"]


def text_only(config, questions: int) -> dict[str, float]:
  """What a model blind to the image scores: each of `questions` held-out questions answered
  with the commonest answer to the same question in 64 training batches of the scenes."""
  from mmjax import evaluate  # pylint: disable=g-import-not-at-top
  from mmjax.data import synthetic  # pylint: disable=g-import-not-at-top
  def scenes(split: str, batch_size: int):
    return synthetic.ShapeScenes(batch_size, None, 32, 1, max_shapes=config.data.max_shapes,
                                 seed=config.seed, split=split)
  train = scenes("train", 256)
  given = collections.defaultdict(collections.Counter)
  for step in range(64):
    for e in train.examples(step):
      given[e["question"]][e["answer"]] += 1
  held_out = scenes("validation", questions).examples(0)
  answers = [given[e["question"]].most_common(1)[0][0] if given[e["question"]] else ""
             for e in held_out]
  return evaluate.vqa_scores(answers, [e["answer"] for e in held_out],
                             [e["type"] for e in held_out])


def table(results: list[dict], baseline: dict[str, float]) -> str:
  """Markdown: a row per (name, scheme), each score as mean +- standard deviation over seeds,
  then the text-only baseline."""
  groups = collections.defaultdict(list)
  for r in results:
    groups[(r["name"], r["scheme"])].append(r)
  lines = ["| runs | scheme | seeds | " + " | ".join(s.removeprefix("vqa/") for s in SCORES)
           + " | wall s |", "|---" * (len(SCORES) + 4) + "|"]
  for (name, scheme), runs in groups.items():
    cells = []
    for key in (*SCORES, "wall_seconds"):
      values = [r[key] for r in runs if key in r]
      spread = statistics.stdev(values) if len(values) > 1 else 0.0
      digits = 0 if key == "wall_seconds" else 3
      cells.append(f"{statistics.mean(values):.{digits}f} +- {spread:.{digits}f}"
                   if values else "-")
    lines.append(f"| {name} | {scheme} | {len(runs)} | " + " | ".join(cells) + " |")
  lines.append(f"| {TEXT_ONLY} | - | - | "
               + " | ".join(f"{baseline[k]:.3f}" if k in baseline else "-" for k in SCORES)
               + " | - |")
  return "\n".join(lines)


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  sys.path.insert(0, str(ROOT))
  from configs import common  # pylint: disable=g-import-not-at-top
  for scheme in _SCHEMES.value:
    config = common.load(f"{scheme}.py:{_PAIR.value}")
    settings = dict(o.split("=", 1) for o in _SET.value)
    steps = int(settings.get("total_steps", config.total_steps))
    batch = int(settings.get("batch_size", config.batch_size))
    for seed in _SEEDS.value:
      workdir = out / _NAME.value.replace("/", "_") / f"{scheme}-seed{seed}"
      row = train(workdir, scheme, seed, [*_SET.value, *evaluation_overrides(steps, batch)])
      record = {"name": _NAME.value, "scheme": scheme, "seed": int(seed), "set": _SET.value,
                **{k: row[k] for k in (*SCORES, "wall_seconds") if k in row}}
      with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
      print(f"{_NAME.value} {scheme} seed {seed}: vqa/accuracy "
            f"{record.get('vqa/accuracy', float('nan')):.3f} in {record['wall_seconds']:.0f} s",
            flush=True)
  results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  latest = {(r["name"], r["scheme"], r["seed"]): r for r in results}  # a rerun replaces its row
  baseline = text_only(common.load(f"{_SCHEMES.value[0]}.py:{_PAIR.value}"), _QUESTIONS.value)
  print(table(list(latest.values()), baseline))
  if _CHART.value:
    chart(list(latest.values()), _CHART_RUNS.value, _CHART.value, baseline)


def chart(results: list[dict], rows: list[str], path: str, baseline: dict[str, float]):
  """The scores of the NAME:SCHEME rows (every row when empty) as bars with their spread."""
  from mmjax import plots  # pylint: disable=g-import-not-at-top
  groups = collections.defaultdict(list)
  for r in results:
    groups[f"{r['name']}:{r['scheme']}"].append(r)
  missing = [row for row in rows if row not in groups]
  if missing:
    raise ValueError(f"--chart_runs {missing} are not in the table; it has {sorted(groups)}")
  picked = {row.replace(":", ", "): groups[row] for row in rows or groups}
  plots.spread_figure(picked, SCORES, reference=(TEXT_ONLY, baseline)).savefig(path, dpi=120)
  print(f"chart: {path}")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  console.app_run(main)
