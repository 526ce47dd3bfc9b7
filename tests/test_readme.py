"""The README's Python examples run as written, in order, in one namespace."""
import re

import train_cli


def test_readme_python_examples_run():
  text = (train_cli.ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  out = namespace["out"]
  assert out["tokens"].shape == (2, 8) and out["lengths"].shape == (2,)
  assert namespace["logits"].shape == (1, 29, 512)  # the tiny early-fusion model's last call
  assert namespace["native_logits"].shape == (1, 22, 512)  # deep fusion, images at their sizes
  assert namespace["native_aux"]["img/features"].shape == (1, 40, 64)
  assert namespace["counts"] == [18, 16]  # AnyRes: placeholders by image size
  assert namespace["next_logits"].shape == (1, 1 + 18 + 3 + 16, 512)
