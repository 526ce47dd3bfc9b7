"""What mmjax says on a console: its own messages, quiet libraries, progress, one-line errors.

  python train.py ... [--log_level=info] [--traceback]

- Library logs (Orbax, jax, tfds, grain: everything routed through absl or
  Python logging) stay at --log_level, WARNING by default; mmjax's own messages
  ("mmjax: resumed from checkpoint step 40") always show.
- Training progress: one live line in a terminal (tqdm), or one plain line per
  logged step when the output is a file or a pipe (CI, nohup, a pod's log).
- Errors about the input, raised by mmjax's own checks (a config key, a file, a
  checkpoint step, the data), print "error: <one line>" and exit 1;
  --traceback (or MMJAX_TRACEBACK=1) shows where. Any other error keeps its
  traceback: that is a bug to report.
"""
from collections.abc import Callable
import logging
import os
import pathlib
import shlex
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging

_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Level of the libraries' logs (Orbax, jax, tfds); mmjax's own messages always show.")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the traceback of errors about the input too.")

# Exceptions mmjax raises for what it was given; any of them raised by mmjax's own code (the
# package, the configs, the tools, train.py) is the user's to fix, and said in a line.
INPUT_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, RuntimeError)
ROOT = pathlib.Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(ROOT / part) for part in ("mmjax", "configs", "tools", "train.py"))


def on_a_tpu_vm() -> bool:
  """Whether this machine has TPU chips (v4/v5e expose /dev/accel*, v5p/v6e /dev/vfio)."""
  return any(pathlib.Path(p).exists() for p in ("/dev/accel0", "/dev/vfio"))


def quiet_libtpu_without_a_tpu():
  """On a machine without TPU chips, tell libtpu so before jax starts: it would otherwise ask a
  TPU VM's metadata server, find none, and print five lines of warnings in every process. (It
  is there with `pip install -e ".[tpu]"`, to compile for TPU slices.)"""
  if on_a_tpu_vm():
    return  # libtpu finds its chips itself
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_ACCELERATOR_TYPE", "v5litepod-1")):  # topologies still compile
    os.environ.setdefault(name, value)


def setup_logging():
  """Libraries at --log_level; mmjax's loggers at INFO, as "mmjax: message" on stderr."""
  quiet_libtpu_without_a_tpu()
  absl_logging.set_verbosity(_LOG_LEVEL.value)
  logging.getLogger().setLevel(_LOG_LEVEL.value.upper())
  own = logging.getLogger("mmjax")
  own.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("mmjax: %(message)s"))
  own.handlers = [handler]
  own.propagate = False  # absl's handler on the root logger would print it again


def is_input_error(error: BaseException) -> bool:
  """Raised by one of mmjax's checks (its last frame in mmjax's code) with a message."""
  frames = []
  tb = error.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return (isinstance(error, INPUT_ERRORS) and bool(str(error)) and bool(frames)
          and frames[-1].startswith(OWN_CODE))


def run(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
  """Wraps an absl main: logging set up first; an input error is one line and exit status 1."""

  def wrapped(argv):
    setup_logging()
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if _TRACEBACK.value or os.environ.get("MMJAX_TRACEBACK") or not is_input_error(e):
        raise
      message = " ".join(str(e).split())  # one line, whatever the message held
      print(f"error: {message}", file=sys.stderr)
      sys.exit(1)

  return wrapped


def app_run(main: Callable[[list[str]], int | None]):
  """absl's app.run(run(main)), and a --config override naming a key the config lacks said in a
  line (ml_collections raises it while absl parses the flags, before main)."""
  try:
    app.run(run(main))
  except (AttributeError, KeyError) as e:
    overrides = config_overrides(sys.argv[1:])
    key = str(e).strip("'\" ")
    culprit = next((a for a in overrides if a.split("=")[0].endswith("." + key)), None)
    # The flags are not parsed yet: look for --traceback by hand.
    if culprit is None or "--traceback" in sys.argv or os.environ.get("MMJAX_TRACEBACK"):
      raise
    spec = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "")
    print(f"error: {culprit}: {spec or 'the config'} has no key "
          f"{culprit.split('=')[0].removeprefix('--config.')}", file=sys.stderr)
    sys.exit(1)


def config_overrides(argv: list[str]) -> list[str]:
  """A command line's config overrides as --config.KEY=VALUE, given so or as --config.KEY VALUE."""
  overrides = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      value = argv[i + 1] if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith(
          "--") else None
      overrides.append(arg if value is None else f"{arg}={value}")
  return overrides


def format_scalars(scalars: dict[str, float], unit: str) -> str:
  """The fields a person watches: loss, eval loss, held-out accuracy, throughput, MFU."""
  shown = [f"loss {scalars['loss']:.4g}"] if "loss" in scalars else []
  for key, name in (("eval_loss", "eval loss"), ("vqa/accuracy", "vqa"),
                    ("eval_top1", "top-1"), ("caption/cider", "CIDEr")):
    if key in scalars:
      shown.append(f"{name} {scalars[key]:.4g}")
  if "items_per_sec" in scalars:
    shown.append(f"{scalars['items_per_sec']:,.0f} {unit}/s")
  if "mfu" in scalars:
    shown.append(f"MFU {scalars['mfu']:.1%}")
  return ", ".join(shown)


def duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
  """Training progress: a live tqdm line in a terminal, else a plain line per logged step."""

  def __init__(self, total: int, start: int, unit: str, stream=None, enabled: bool = True):
    self.total, self.unit = total, unit
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.live = enabled and self.stream.isatty()
    self.bar = None
    if self.live:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      # A terminal that reports no width (some ptys, some IDEs) gets a fixed one.
      sized = shutil.get_terminal_size((0, 0)).columns > 0
      self.bar = tqdm(total=total, initial=start, unit="step", file=self.stream,
                      dynamic_ncols=sized, ncols=None if sized else 120, smoothing=0.1)

  def step(self):
    """One step done (no device sync: the count is the host's)."""
    if self.bar is not None:
      self.bar.update(1)

  def log(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    fields = format_scalars(scalars, self.unit)
    if self.bar is not None:
      self.bar.set_postfix_str(fields, refresh=True)
      return
    left = (self.total - step) / scalars["steps_per_sec"] if scalars.get("steps_per_sec") else 0
    print(f"step {step}/{self.total}: {fields}, ETA {duration(left)}", file=self.stream,
          flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def summary(result: dict, *, workdir: str, config_spec: str, wall_seconds: float,
            overrides: tuple[str, ...] = ()) -> str:
  """The closing lines of a run: what it reached, where things are, what to run next."""
  unit = "images" if "eval_top1" in result or result.get("family") == "vit" else "tokens"
  lines = [f"done: step {result['step']} in {duration(wall_seconds)}"
           + (f" (compiling {duration(result['compile_seconds'])})"
              if "compile_seconds" in result else "")
           + (f"; {format_scalars(result, unit)}" if "loss" in result else "")]
  scores = {k: v for k, v in result.items()
            if k.startswith(("vqa/", "caption/", "eval_")) and k != "eval_loss"}
  if scores:
    lines.append("held out: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))
  checkpoint = result.get("checkpoint_step")
  lines.append(f"workdir: {workdir} (metrics.jsonl, tensorboard/"
               + (f", checkpoints/{checkpoint}" if checkpoint is not None else "") + ")")
  # Resuming takes the same config: the file and every override of the command line.
  config = "".join(f"{shlex.quote(a)} " for a in (
      *(("--config", config_spec) if config_spec else ()), *overrides))
  lines += [
      f"  resume:   python train.py {config}--workdir {workdir}",
      f"  generate: python tools/generate.py --workdir {workdir} --prompt \"...\"",
      f"  plot:     python tools/plot.py --workdir {workdir} --out {workdir}/runs.png",
      f"  export:   python tools/export_hf.py --workdir {workdir} --out {workdir}/hf",
  ]
  return "\n".join(lines)


class Timer:
  """Wall-clock seconds since it was made."""

  def __init__(self):
    self.start = time.perf_counter()

  @property
  def seconds(self) -> float:
    return time.perf_counter() - self.start
