"""Converts the `unet/` folder of a diffusers-format Stable Diffusion model (1.x, 2.x) to a models.SDUNet.

  python scripts/convert_diffusers_unet.py PATH/stable-diffusion-v1-5/unet ~/models/sd15_unet

reads `config.json` and `diffusion_pytorch_model.safetensors` (or its `.fp16` variant, or the shards of
a `.safetensors.index.json`) with numpy (no torch) and writes the Flax parameters and the module's
arguments as models/pretrained.py describes (`models.pretrained.load_sd_unet` reads it). Pickled
weights (`.bin`, `.ckpt`) are refused. Our modules carry diffusers' names with `.N` written `_N`, so the
name table (`name_table`) is that rule applied to every parameter of the model the config describes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import sd_unet  # pylint: disable=g-import-not-at-top,wrong-import-position

WEIGHTS = "diffusion_pytorch_model.safetensors"
_VARIANTS = (WEIGHTS, "diffusion_pytorch_model.fp16.safetensors")
_PICKLED = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "model.ckpt")

# config.json fields mapped to SDUNet's arguments, with diffusers' defaults.
_KNOBS = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
          "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "attention_head_dim": 8,
          "cross_attention_dim": 1280, "use_linear_projection": False, "upcast_attention": False,
          "in_channels": 4, "out_channels": 4, "norm_num_groups": 32, "dropout": 0.0}
# Fields SD 1.x and 2.x leave at these values; any other value is an architecture SDUNet does not build.
_FIXED = {"act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
          "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
          "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
          "dual_cross_attention": False, "resnet_time_scale_shift": "default",
          "time_embedding_type": "positional", "class_embed_type": None, "num_class_embeds": None,
          "addition_embed_type": None, "addition_time_embed_dim": None, "encoder_hid_dim": None,
          "encoder_hid_dim_type": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
          "conv_out_kernel": 3, "transformer_layers_per_block": 1, "num_attention_heads": None,
          "attention_type": "default", "timestep_post_act": None, "time_embedding_dim": None,
          "time_embedding_act_fn": None, "projection_class_embeddings_input_dim": None,
          "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
          "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
          "reverse_transformer_layers_per_block": None}
# Recorded or meaningless without the fields above being set.
_IGNORED = {"sample_size", "addition_embed_type_num_heads"}
def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """models.SDUNet's arguments from a diffusers UNet2DConditionModel config.json."""
  def fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config.json: {field}={value!r} {why}; this converter reads the UNet of Stable "
                     "Diffusion 1.x and 2.x (SDXL's and other architectures are not built here).")

  if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    fail("_class_name", config["_class_name"], "is not UNet2DConditionModel")
  for field, value in config.items():
    if field.startswith("_") or field in _KNOBS or field in _IGNORED:
      continue
    if field not in _FIXED:
      fail(field, value, "is a field this converter does not know")
    expected = _FIXED[field]
    same = value == expected or (isinstance(expected, int) and isinstance(value, list)
                                 and all(v == expected for v in value))  # One value per block.
    if not same:
      fail(field, value, f"is not supported (only {expected!r})")
  kwargs = {k: config.get(k, default) for k, default in _KNOBS.items()}
  levels = len(kwargs["block_out_channels"])
  for field, allowed in (("down_block_types", sd_unet.DOWN_BLOCKS), ("up_block_types", sd_unet.UP_BLOCKS)):
    types = kwargs[field]
    if len(types) != levels or any(t not in allowed for t in types):
      fail(field, types, f"must list {levels} blocks, each one of {', '.join(allowed)}")
    kwargs[field] = list(types)
  if not isinstance(kwargs["cross_attention_dim"], int):
    fail("cross_attention_dim", kwargs["cross_attention_dim"], "must be one integer")
  heads = kwargs["attention_head_dim"]
  if not isinstance(heads, int) and len(heads) != levels:
    fail("attention_head_dim", heads, f"must be an integer or have {levels} entries")
  kwargs["block_out_channels"] = list(kwargs["block_out_channels"])
  kwargs["attention_head_dim"] = heads if isinstance(heads, int) else list(heads)
  return kwargs


def parameter_shapes(kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every parameter of the SDUNet with these arguments (no memory used)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  model = pretrained.sd_unet_module(kwargs)
  f = 2 ** (len(kwargs["block_out_channels"]) - 1)
  x = jnp.zeros((1, f, f, kwargs["in_channels"]))
  cond = {"context": jnp.zeros((1, 1, kwargs["cross_attention_dim"]))}
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), cond))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


diffusers_name = sd_unet.diffusers_name  # Our path -> diffusers' module name.


def name_table(kwargs: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None,
               ) -> list[tuple[str, str, str]]:
  """(our parameter path, diffusers state-dict key, kind) for every parameter; kind: conv, dense, norm."""
  rows = []
  for path, shape in (shapes or parameter_shapes(kwargs)).items():
    module, leaf = path.rsplit("/", 1)
    theirs = diffusers_name(module) + (".bias" if leaf == "bias" else ".weight")
    kind = "norm" if leaf == "scale" else ("conv" if len(shape) == 4 else "dense")
    rows.append((path, theirs, kind))
  return rows


def convert_weights(weights: dict[str, np.ndarray], kwargs: dict[str, Any]) -> dict[str, Any]:
  """Our parameter tree from diffusers' state dict; every diffusers weight must be used exactly once."""
  shapes = parameter_shapes(kwargs)
  table = name_table(kwargs, shapes)
  params: dict[str, Any] = {}
  for ours, theirs, kind in table:
    if theirs not in weights:
      raise KeyError(f"{WEIGHTS} has no {theirs}: its config.json does not describe the weights, or this "
                     "is not the unet/ folder of a diffusers-format model.")
    value = weights[theirs]
    if kind == "conv" and value.ndim == 4:  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
      value = np.transpose(value, (2, 3, 1, 0))
    elif kind == "dense" and value.ndim == 2:  # torch [out, in] -> flax [in, out]
      value = value.T
    if value.shape != shapes[ours]:
      raise ValueError(f"{WEIGHTS}: {theirs} has shape {weights[theirs].shape}, which does not fit {ours} "
                       f"{shapes[ours]} of the model its config.json describes.")
    node = params
    parts = ours.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = np.asarray(value, np.float32)
  unused = sorted(set(weights) - {theirs for _, theirs, _ in table})
  if unused:
    raise ValueError(f"{len(unused)} weights of {WEIGHTS} have no place in the converted model, e.g. "
                     f"{unused[:3]}: the config.json does not describe these weights.")
  return params


def _weights_files(unet_dir: str) -> list[str]:
  """The safetensors files holding the weights; refuses pickled ones with how to get safetensors."""
  for name in _VARIANTS:
    path = os.path.join(unet_dir, name)
    if os.path.exists(path):
      return [path]
    index = path + ".index.json"
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(unet_dir, shard) for shard in shards]
  pickled = [n for n in _PICKLED if os.path.exists(os.path.join(unet_dir, n))]
  if pickled:
    raise ValueError(
        f"{os.path.join(unet_dir, pickled[0])} is a pickled checkpoint, which is not read: unpickling a "
        "downloaded file runs the code it holds. Download the safetensors weights instead (`hf download "
        "REPO --include 'unet/*.safetensors' 'unet/config.json'`), or, with diffusers in an environment "
        "you trust, `UNet2DConditionModel.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)`.")
  raise FileNotFoundError(f"{unet_dir} has no {WEIGHTS}: pass the unet/ folder of a diffusers-format model.")


def convert(unet_dir: str, out_dir: str) -> dict[str, Any]:
  """Converts unet_dir (config.json + safetensors) into out_dir; returns the written description."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if os.path.isfile(unet_dir) and unet_dir.endswith((".ckpt", ".bin", ".pt", ".pth")):
    raise ValueError(f"{unet_dir} is a pickled checkpoint, which is not read: unpickling a downloaded "
                     "file runs the code it holds. Pass the unet/ folder of a diffusers-format model "
                     "with safetensors weights.")
  config_path = os.path.join(unet_dir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: pass the unet/ folder of a diffusers-format "
                            "model.")
  with open(config_path) as f:
    config = json.load(f)
  kwargs = module_kwargs(config)
  files = _weights_files(unet_dir)
  if os.path.exists(out_dir):  # Before the slow part; pretrained.save checks again.
    raise FileExistsError(f"{os.path.abspath(out_dir)} exists already; give a new output directory.")
  weights = {}
  for path in files:
    weights.update(load_file(path))
  params = convert_weights(weights, kwargs)
  extra = {"sample_size": config.get("sample_size"), "source": os.path.abspath(unet_dir)}
  pretrained.save(out_dir, kind="sd_unet", kwargs=kwargs, params=params, **extra)
  return {"kind": "sd_unet", "kwargs": kwargs, **extra}


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  description = convert(argv[1], argv[2])
  print(f"Wrote {argv[2]}: SDUNet {description['kwargs']}.")


if __name__ == "__main__":
  main(sys.argv)
