"""Exports an mmjax model to HuggingFace format, or as params only for serving.

  python tools/export_hf.py --workdir DIR --out OUT [--format hf|params]

DIR is a training workdir (its newest checkpoint is used) or a directory from
tools/import_hf.py. "hf" writes config.json + model.safetensors that
transformers' from_pretrained loads (ViT, CLIP, SigLIP, GPT-2, Llama, LLaVA),
plus the tokenizer files of the run's init_from directory. A deep-fusion
model has no HuggingFace class: OUT/vision and OUT/language get its towers,
and OUT/model.safetensors all its weights named by their mmjax paths
("xattn_3/attn/query/kernel", ...). "params" writes mmjax_config.json and an
Orbax params-only checkpoint.
"""
import json
import os

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from mmjax import checkpoint
from mmjax.interop import hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or import directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "params"], "What to write.")
flags.mark_flags_as_required(["workdir", "out"])


def read_model(workdir: str) -> tuple[dict, dict, str]:
  """-> ({"family", "model"}, params on this host, the directory holding tokenizer files)."""
  imported = os.path.join(workdir, "mmjax_config.json")
  if os.path.exists(imported):
    with open(imported) as f:
      config = json.load(f)
    params_dir, tokenizer_dir = os.path.join(workdir, "params"), workdir
  else:
    manager = checkpoint.Checkpointer(workdir, max_to_keep=None, keep_every=None).manager
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir} has neither mmjax_config.json nor checkpoints/<step>")
    run_config = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    manager.close()
    config = {"family": run_config["family"], "model": run_config["model"]}
    params_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    tokenizer_dir = run_config.get("init_from", "")
  with ocp.StandardCheckpointer() as ckpt:
    saved = ckpt.metadata(os.path.abspath(params_dir)).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    restored = ckpt.restore(os.path.abspath(params_dir), target)
  params = restored["params"] if "params" in restored and "opt_state" in restored else restored
  return config, params, tokenizer_dir


def main(argv):
  del argv
  config, params, tokenizer_dir = read_model(_WORKDIR.value)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  if _FORMAT.value == "params":
    with open(os.path.join(out, "mmjax_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    checkpoint.save_params(os.path.join(out, "params"), params)
    print(f"wrote mmjax_config.json and params/ to {out}")
    return
  if config["family"] == "deep_fusion":
    hf.save_flat(os.path.join(out, "model.safetensors"), params)
    with open(os.path.join(out, "mmjax_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    hf.save(os.path.join(out, "language"), {"family": "lm", "model": config["model"]["lm"]},
            params["lm"])
    try:
      hf.save(os.path.join(out, "vision"), {"family": "vit", "model": config["model"]["vit"]},
              params["vit"])
    except ValueError as e:  # e.g. a tower without cls token or MAP head
      print(f"the vision tower has no HuggingFace form, not written: {e}")
    print(f"wrote {out}/language (and vision) and all weights by mmjax name in "
          f"{out}/model.safetensors")
    return
  hf.save(out, config, params)
  if tokenizer_dir:
    hf.copy_tokenizer(tokenizer_dir, out)
  print(f"wrote a HuggingFace {config['family']} model to {out}")


if __name__ == "__main__":
  app.run(main)
