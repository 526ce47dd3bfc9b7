"""What train.py says: a live line in a terminal, plain lines in a log, a summary, errors."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from configs import common
from mmjax import console
from mmjax.data import sources
import train_cli


def test_a_log_file_gets_plain_lines_and_the_summary(tmp_path):
  # The README's first command, output to a file: no library chatter, a line per logged step,
  # then the summary with the final loss and where the checkpoint is. A fifth of its 1000 steps,
  # logged five times as often: the same 40 step lines, evaluation at the end.
  result = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", {
      "total_steps": 200, "log_every": 5}),
                          env=train_cli.env(1, fast_compile=False), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert len(lines) <= 60, "\n".join(lines)
  steps = [line for line in lines if line.startswith("step ")]
  assert len(steps) == 200 // 5
  assert re.fullmatch(r"step 200/200: loss [\d.]+, eval loss [\d.]+, [\d,]+ tokens/s, ETA 0:00",
                      steps[-1])
  final_loss = train_cli.read_metrics(tmp_path)[-1]["loss"]
  summary = "\n".join(lines[lines.index(steps[-1]) + 1:])
  assert "done: step 200 in " in summary and f"loss {final_loss:.4g}" in summary
  assert f"workdir: {tmp_path} (metrics.jsonl, tensorboard/, checkpoints/200)" in summary
  config = f"{train_cli.ROOT / 'configs'}/lm.py:tiny"
  assert (f"  resume:   python train.py --config {config} --config.total_steps=200 "
          f"--config.log_every=5 --workdir {tmp_path}") in summary
  assert not any(line.startswith(("I0", "W0", "INFO", "Creating")) for line in lines)


def test_a_fusion_run_is_quiet_and_its_generate_line_runs(tmp_path):
  # A dataset built on first use says so in one line (tfds would say "Downloading" and draw
  # progress bars into the log): built in this test's own data_dir, whichever tests ran before;
  # the summary's generate command asks about a held-out image.
  result = subprocess.run(train_cli.command(tmp_path / "run", "early_fusion.py:tiny", {
      "total_steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1,
      "data.train_size": 64, "data.eval_size": 16, "data.data_dir": tmp_path / "tfds"}),
                          env=train_cli.env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert len(lines) <= 14, lines
  assert sum("building mmjax_shape_scenes" in line for line in lines) == 1, lines
  assert not any(w in result.stdout + result.stderr for w in (
      "Downloading", "Using custom data", "\x1b[", "\r", "Metadata file", "W1", "I1")), lines
  generate = next(line for line in lines if line.startswith("  generate: "))
  assert f"--image {tmp_path / 'run' / 'example.png'} --prompt " in generate
  answered = subprocess.run(generate.removeprefix("  generate: "), shell=True,
                            cwd=train_cli.ROOT, env=train_cli.env(1), capture_output=True,
                            text=True, timeout=300)
  assert answered.returncode == 0 and answered.stderr == "", answered.stderr[-2000:]
  assert len(answered.stdout.splitlines()) == 1


def test_the_resume_line_repeats_the_command_lines_overrides():
  argv = ["--config=configs/early_fusion.py:tiny", "--config.total_steps=4",
          "--config.optimizer.frozen", "^vit/", "--workdir=/tmp/w", "--config.data.json=a b.json"]
  assert console.config_spec(argv) == "configs/early_fusion.py:tiny"
  # Given twice, the last --config is the one absl loads, and the one checked.
  assert console.config_spec(["--config", "a.py", *argv, "--config", "b.py:x"]) == "b.py:x"
  overrides = console.config_overrides(argv)
  assert overrides == ["--config.total_steps=4", "--config.optimizer.frozen=^vit/",
                       "--config.data.json=a b.json"]
  text = console.summary({"step": 4}, workdir="/tmp/w", config_spec="configs/early_fusion.py:tiny",
                         wall_seconds=1.0, overrides=overrides)
  assert ("  resume:   python train.py --config configs/early_fusion.py:tiny "
          "--config.total_steps=4 '--config.optimizer.frozen=^vit/' "
          "'--config.data.json=a b.json' --workdir /tmp/w") in text


def test_a_terminal_gets_one_live_line(tmp_path):
  primary, replica = pty.openpty()
  fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 160 columns
  process = subprocess.Popen(
      train_cli.command(tmp_path, "lm.py:tiny", {"total_steps": 60, "log_every": 20}),
      env=train_cli.env(1), stdin=replica, stdout=replica, stderr=replica)
  os.close(replica)
  output = b""
  while True:
    try:
      chunk = os.read(primary, 65536)
    except OSError:  # the terminal closed: the process is done
      break
    if not chunk:
      break
    output += chunk
  assert process.wait(timeout=600) == 0, output[-3000:]
  text = output.decode(errors="replace")
  assert "\r" in text  # redrawn in place, not a line per update
  assert not re.search(r"^step \d+/60:", text, flags=re.MULTILINE)  # no plain log lines
  frames = [f for f in re.split(r"[\r\n]", text) if "60/60" in f]
  assert frames and re.search(r"loss [\d.]+, eval loss [\d.]+, [\d,]+ tokens/s", frames[-1])
  assert "done: step 60 in " in text


@pytest.mark.parametrize("overrides,message", [
    ({"optimizer.name": "adamz"}, "error: config.optimizer.name must be one of"),
    ({"data.name": "text"}, "error: config.data.files must be set for config.data.name='text'"),
    ({"model.vocab_size": 100}, "error: config.model.vocab_size=100 is smaller than"),
    ({"model.num_heads": 5}, "error: --config.model.num_heads=5: "),
])
def test_bad_input_is_one_line_without_a_traceback(tmp_path, overrides, message):
  result = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", overrides),
                          env=train_cli.env(1), capture_output=True, text=True, timeout=300)
  lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) <= 5, lines
  assert lines[-1].startswith(message) and "Traceback" not in result.stderr
  if "num_heads" in message:  # a key the config does not have
    assert "configs/lm.py:tiny has no key model.num_heads" in lines[-1]
  # --traceback shows where it came from.
  shown = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", overrides) + ["--traceback"],
                         env=train_cli.env(1), capture_output=True, text=True, timeout=300)
  assert shown.returncode != 0 and "Traceback (most recent call last)" in shown.stderr


def test_only_mmjax_checks_are_input_errors():
  # Where the error was raised decides: a ValueError from mmjax's own check is about the input
  # (a line); the same type raised elsewhere, or another type, is a bug (a traceback).
  config = common.load("lm.py:tiny")
  config.data.name = "nope"
  with pytest.raises(ValueError) as checked:
    sources.check(config)
  assert console.is_input_error(checked.value)
  with pytest.raises(ValueError) as elsewhere:
    raise ValueError("raised outside mmjax's code")
  assert not console.is_input_error(elsewhere.value)
  with pytest.raises(AttributeError) as bug:
    sources.check(None)
  assert not console.is_input_error(bug.value)


# ----------------------------------------------------------------------------
# What a new user mistypes: each a line naming the fault, exit status 1, nothing written.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 4-step lm.py:tiny run: the workdir some mistakes are made with."""
  workdir = tmp_path_factory.mktemp("finished")
  result = subprocess.run(train_cli.command(workdir, "lm.py:tiny", {
      "total_steps": 4, "log_every": 2, "eval_every": 0}), env=train_cli.env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def train(workdir, config="lm.py:tiny", overrides=(), *flags):
  """train.py's command line, overrides given as written: ("totl_steps=100", ...)."""
  return [sys.executable, str(train_cli.ROOT / "train.py"), *(
      [f"--config={train_cli.ROOT / 'configs' / config}"] if config else []),
          f"--workdir={workdir}", *(f"--config.{o}" for o in overrides), *flags]


def tool(name, *args):
  return [sys.executable, str(train_cli.ROOT / "tools" / name), *args]


# Each: (command(tmp_path, finished run), words the one line holds).
MISTAKES = {
    "batch_size=0": (lambda d, run: train(d, overrides=["batch_size=0"]),
                     ["error: config.batch_size must be >= 1, got 0"]),
    "a near-miss key": (lambda d, run: train(d, overrides=["totl_steps=100"]),
                        ["--config.totl_steps=100", "has no key totl_steps",
                         "did you mean total_steps"]),
    "a near-miss nested key": (
        lambda d, run: train(d, overrides=["optimizer.learning_rat=0.1"]),
        ["has no key optimizer.learning_rat", "did you mean optimizer.learning_rate?"]),
    "a value of the wrong type": (lambda d, run: train(d, overrides=["total_steps=abc"]),
                                  ["error: flag --config.total_steps=abc", "--help"]),
    "a near-miss variant": (lambda d, run: train(d, config="lm.py:tinyy"),
                            ["unknown configs/lm.py variant 'tinyy'", "did you mean 'tiny'",
                             "llama-7b"]),
    "a fusion variant": (lambda d, run: train(d, config="deep_fusion.py:tiny-natve"),
                         ["did you mean 'tiny-native'", "tiny-native"]),
    "a config file that does not exist": (
        lambda d, run: train(d, config="lmm.py"),
        ["there is no file", "lmm.py", "did you mean", "configs/lm.py", "--list_configs"]),
    "no --config": (lambda d, run: train(d, config=None), ["error: --config is required"]),
    "a workdir that is a file": (
        lambda d, run: train(run / "metrics.jsonl"),
        ["error: --workdir", "metrics.jsonl is a file, not a directory"]),
    "a bucket as the workdir": (
        lambda d, run: train("gs://bucket/run"),
        ["error: --workdir gs://bucket/run: mmjax writes its workdir with local file", "gcsfuse"]),
    "an init_from that does not exist": (
        lambda d, run: train(d, overrides=[f"init_from={d}/nowhere"]),
        ["error: config.init_from=", "nowhere is not a directory"]),
    "an init_from without a model": (
        lambda d, run: train(d, overrides=[f"init_from={run}/checkpoints"]),
        ["error: config.init_from", "neither mmjax_config.json nor a complete checkpoints"]),
    "a workdir of another model": (
        lambda d, run: train(run, config="vit.py:tiny"),
        ["error: checkpoint step 4", "holds the run of another model", "new --workdir"]),
    "a topology libtpu cannot lay out": (
        lambda d, run: tool("dry_run.py", f"--config={train_cli.ROOT / 'configs/lm.py:tiny'}",
                            "--topology=v5e:3x3"),
        ["error: topology 'v5e:3x3' is not a slice libtpu can lay out", "2x2x1"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_naming_the_fault(tmp_path, finished_run, mistake):
  command, words = MISTAKES[mistake]
  workdir = tmp_path / "new"
  before = sorted(p.name for p in finished_run.rglob("*"))
  result = subprocess.run(command(workdir, finished_run), env=train_cli.env(1),
                          capture_output=True, text=True, timeout=300)
  lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
  assert result.returncode == 1, lines
  assert len([line for line in lines if not line.startswith("mmjax: ")]) == 1, lines
  assert lines[-1].startswith("error: ") and all(w in lines[-1] for w in words), lines[-1]
  assert not workdir.exists(), "a failed run wrote its workdir"
  assert sorted(p.name for p in finished_run.rglob("*")) == before


def test_help_and_the_config_listings(tmp_path):
  shown = subprocess.run(train(tmp_path, None, (), "--help"), env=train_cli.env(1),
                         capture_output=True, text=True, timeout=300)
  assert shown.returncode == 0 and "--config.KEY=VALUE" in shown.stdout
  assert "--print_config" in shown.stdout and "--list_configs" in shown.stdout
  listed = subprocess.run(train(tmp_path, None, (), "--list_configs"), env=train_cli.env(1),
                          capture_output=True, text=True, timeout=300)
  assert listed.returncode == 0
  for file, variants in (("lm.py", "tiny, gpt2-124m, llama-1b, llama-7b"),
                         ("early_fusion.py", "tiny, base, large, pretrained, tiny-anyres, "
                          "paligemma2-3b-224, paligemma2-3b-448, paligemma2-10b-224"),
                         ("deep_fusion.py",
                          "tiny, base, large, pretrained, tiny-native, llama-3.2-11b-vision, "
                          "llama-3.2-90b-vision, idefics-9b")):
    text = listed.stdout.split(f"configs/{file}:", 1)[1]
    assert text.splitlines()[1] == f"  variants: {variants}"
  printed = subprocess.run(train(tmp_path, "lm.py:tiny", ["total_steps=50"], "--print_config"),
                           env=train_cli.env(1), capture_output=True, text=True, timeout=300)
  assert printed.returncode == 0 and "\ntotal_steps: 50\n" in printed.stdout
  assert printed.stdout.strip().endswith(
      "# learning rate: warmup 5 steps to 0.003, cosine to 0 at step 50")
  assert not tmp_path.joinpath("checkpoints").exists()


def test_init_from_a_train_workdir_and_lora_over_a_random_base(tmp_path, finished_run):
  # Another run's workdir starts a new one from its newest checkpoint's parameters.
  rows = []
  for name, config, extra in (("fresh", "lm.py:tiny", []),
                              ("from", "lm.py:tiny", [f"init_from={finished_run}"]),
                              ("lora", "lm.py:tiny,lora", [])):
    result = subprocess.run(train(tmp_path / name, config, [
        "total_steps=1", "log_every=1", "eval_every=0", *extra]), env=train_cli.env(1),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows.append((train_cli.read_metrics(tmp_path / name)[0]["loss"], result.stderr))
  (fresh, _), (started, said), (_, lora_said) = rows
  trained = train_cli.read_metrics(finished_run)[-1]["loss"]
  assert f"initialised the parameters from {finished_run}" in said
  assert abs(started - trained) < 0.1 * trained < fresh - trained, (started, trained, fresh)
  assert "LoRA over a randomly initialised model" in lora_said
