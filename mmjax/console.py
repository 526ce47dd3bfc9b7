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
import contextlib
import difflib
import importlib.util
import logging
import os
import pathlib
import shlex
import shutil
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Level of the libraries' logs (Orbax, jax, tfds); mmjax's own messages always show.")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the traceback of errors about the input too.")

# Exceptions mmjax raises for what it was given or where it runs (a config key, a file, a full
# disk); any of them raised by mmjax's own code (the package, the configs, the tools, train.py)
# is the user's to fix, and said in a line.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)
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


# Library warnings that are not the user's business, dropped below --log_level=info: Orbax on
# reading a train state's params (their metadata is the step's, one folder up), tfds on every
# dataset mmjax builds (its configs are made at run time by design) and on each not built yet;
# Orbax's stack trace of a background save that failed (mmjax's save raises it again, in a line).
NOISE = ("Metadata file does not exist", "Using custom data configuration", "Variant folder ",
         "_SignalingThread.run() raised an exception")


def _not_noise(record: logging.LogRecord) -> bool:
  return not any(noise in str(record.msg) for noise in NOISE)


def setup_logging():
  """Libraries at --log_level; mmjax's loggers at INFO, as "mmjax: message" on stderr."""
  quiet_libtpu_without_a_tpu()
  absl_logging.set_verbosity(_LOG_LEVEL.value)
  logging.getLogger().setLevel(_LOG_LEVEL.value.upper())
  if _LOG_LEVEL.value not in ("debug", "info"):
    logging.getLogger("absl").addFilter(_not_noise)
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
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
      if _TRACEBACK.value or os.environ.get("MMJAX_TRACEBACK"):
        raise
      print("error: interrupted (Ctrl-C); the newest saved checkpoint is kept", file=sys.stderr)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if _TRACEBACK.value or os.environ.get("MMJAX_TRACEBACK") or not is_input_error(e):
        raise
      message = " ".join(str(e).split())  # one line, whatever the message held
      print(f"error: {message}", file=sys.stderr)
      sys.exit(1)

  return wrapped


def app_run(main: Callable[[list[str]], int | None]):
  """absl's app.run(run(main)), its flags parsed by `parse_flags`."""
  app.run(run(main), flags_parser=parse_flags)


HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with what a user mistypes said in one line and exit status 1.

  --help prints the program's docstring and flags and exits 0. Before absl
  loads --config, the file, its variant and every --config.KEY override are
  checked here (a key the config lacks names its nearest keys), so that no
  traceback reaches the user; --traceback shows absl's own error instead.
  """
  if any(a in HELP for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  try:
    if not _wants_traceback(argv):
      check_config_args(argv[1:])
    return flags.FLAGS(argv)
  except (ValueError, flags.Error) as e:
    if _wants_traceback(argv):
      raise
    message = " ".join(str(e).split("\n", 1)[0].split())  # absl appends hints on more lines
    print(f"error: {message} (--help lists the flags)" if isinstance(e, flags.Error)
          else f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _wants_traceback(argv: list[str]) -> bool:
  """--traceback, looked for by hand: the flags are not parsed yet."""
  return ("--traceback" in argv or "--traceback=true" in argv
          or bool(os.environ.get("MMJAX_TRACEBACK")))


def help_text() -> str:
  """The program's docstring, its own flags, and where config keys are documented."""
  program = sys.modules["__main__"]
  text = [(program.__doc__ or "").strip(), "", "flags:", flags.FLAGS.main_module_help().strip()]
  if "config" in flags.FLAGS:
    text += ["", "Every key of the config is a flag too: --config.KEY=VALUE (--config.optimizer."
             "learning_rate=1e-3).", "The keys and their meaning: configs/common.py and the "
             "config file, one comment a key;", "`python train.py --config FILE:VARIANT "
             "--print_config` prints a config's keys and values,", "`python train.py "
             "--list_configs` every config file and its variants."]
  return "\n".join(text)


def config_spec(argv: list[str]) -> str | None:
  """The value of --config in a command line ("configs/lm.py:tiny"), or None; the last one
  given, as absl takes it."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def load_config(spec: str):
  """A config file's get_config(variant), as ml_collections loads `--config FILE[:VARIANT]`."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("mmjax_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_args(argv: list[str]):
  """The config file, its variant and each --config.KEY override, checked as a user gives them:
  ValueErrors that name the argument at fault and what would be right."""
  spec = config_spec(argv)
  if spec is None:
    return
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
        folder) else []
    near = difflib.get_close_matches(os.path.basename(path), files, n=1)
    raise ValueError(f"--config {spec}: there is no file {path}"
                     + (f"; did you mean {os.path.join(folder, near[0])}?" if near else "")
                     + " (python train.py --list_configs lists the config files)")
  try:
    config = load_config(spec)
  except ValueError as e:
    raise ValueError(f"--config {spec}: {e}") from e
  for override in config_overrides(argv):
    key = override.split("=", 1)[0].removeprefix("--config.")
    node, walked = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"{override}: config.{'.'.join(walked)} is a value, not a group of keys")
      if part not in node:
        near = difflib.get_close_matches(part, list(node.keys()), n=2)
        hint = f"; did you mean {' or '.join('.'.join([*walked, n]) for n in near)}?" if near \
            else ""
        raise ValueError(f"{override}: {spec} has no key {key}{hint} (--print_config "
                         "prints its keys)")
      node, walked = node[part], [*walked, part]


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
  stopped = result.get("stopped_by")
  lines = [(f"stopped by {stopped}: step {result['step']} of {result['total_steps']}" if stopped
            else f"done: step {result['step']}") + f" in {duration(wall_seconds)}"
           + (f" (compiling {duration(result['compile_seconds'])})"
              if "compile_seconds" in result else "")
           + (f"; {format_scalars(result, unit)}" if "loss" in result else "")]
  scores = {k: v for k, v in result.items()
            if k.startswith(("vqa/", "caption/", "eval_")) and k != "eval_loss"}
  if scores:
    lines.append("held out: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))
  checkpoint = result.get("checkpoint_step")
  example = result.get("example")  # a held-out image and its question, for image-text runs
  lines.append(f"workdir: {workdir} (metrics.jsonl, tensorboard/"
               + (f", checkpoints/{checkpoint}" if checkpoint is not None else "")
               + (", example.png" if example else "") + ")")
  # Resuming takes the same config: the file and every override of the command line.
  config = "".join(f"{shlex.quote(a)} " for a in (
      *(("--config", config_spec) if config_spec else ()), *overrides))
  # The held-out example's question about its image, or a prompt to fill in.
  ask = (f"--image {shlex.quote(example['image'])} --prompt {shlex.quote(example['prompt'])}"
         if example else '--prompt "..."')
  lines += [
      f"  resume:   python train.py {config}--workdir {workdir}",
      f"  generate: python tools/generate.py --workdir {workdir} {ask}",
      f"  plot:     python tools/plot.py --workdir {workdir} --out {workdir}/runs.png",
      f"  export:   python tools/export_hf.py --workdir {workdir} --out {workdir}/hf",
  ]
  return "\n".join(lines)


@contextlib.contextmanager
def elapsed(what: str, every: float = 30.0):
  """Says `what` has started, then every `every` seconds how long it has run, so a long compile
  is never silence; the caller says when it ends."""
  log = logging.getLogger("mmjax")
  log.info("%s ...", what)
  done, timer = threading.Event(), Timer()

  def tick():
    while not done.wait(every):
      log.info("%s: %s so far", what, duration(timer.seconds))

  ticker = threading.Thread(target=tick, daemon=True)
  ticker.start()
  try:
    yield timer
  finally:
    done.set()
    ticker.join()


class Timer:
  """Wall-clock seconds since it was made."""

  def __init__(self):
    self.start = time.perf_counter()

  @property
  def seconds(self) -> float:
    return time.perf_counter() - self.start
