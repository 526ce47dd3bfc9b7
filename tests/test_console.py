"""What train.py says: a live line in a terminal, plain lines in a log, a summary, errors."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios

import pytest

from configs import common
from mmjax import console
from mmjax.data import sources
import train_cli


def test_a_log_file_gets_plain_lines_and_the_summary(tmp_path):
  # The README's first command, output to a file: no library chatter, a line per logged step,
  # then the summary with the final loss and where the checkpoint is.
  result = subprocess.run(train_cli.command(tmp_path, "lm.py:tiny", {}), env=train_cli.env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert len(lines) <= 60, "\n".join(lines)
  steps = [line for line in lines if line.startswith("step ")]
  assert len(steps) == 1000 // 25
  assert re.fullmatch(r"step 1000/1000: loss [\d.]+, eval loss [\d.]+, [\d,]+ tokens/s, ETA 0:00",
                      steps[-1])
  final_loss = train_cli.read_metrics(tmp_path)[-1]["loss"]
  summary = "\n".join(lines[lines.index(steps[-1]) + 1:])
  assert "done: step 1000 in " in summary and f"loss {final_loss:.4g}" in summary
  assert f"workdir: {tmp_path} (metrics.jsonl, tensorboard/, checkpoints/1000)" in summary
  config = f"{train_cli.ROOT / 'configs'}/lm.py:tiny"
  assert f"python train.py --config {config} --workdir {tmp_path}" in summary
  assert not any(line.startswith(("I0", "W0", "INFO", "Creating")) for line in lines)


def test_the_resume_line_repeats_the_command_lines_overrides():
  argv = ["--config=configs/early_fusion.py:tiny", "--config.total_steps=4",
          "--config.optimizer.frozen", "^vit/", "--workdir=/tmp/w", "--config.data.json=a b.json"]
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
    assert lines[-1].endswith("configs/lm.py:tiny has no key model.num_heads")
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
