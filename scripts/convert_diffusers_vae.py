"""Converts the `vae/` folder of a diffusers-format model (SD 1.x, 2.x, SDXL) to a models.AutoencoderKL.

  python scripts/convert_diffusers_vae.py PATH/stable-diffusion-v1-5/vae ~/models/sd15_vae

reads `config.json` and `diffusion_pytorch_model.safetensors` with numpy (no torch) and writes the
Flax parameters and the module's arguments, with the latent scaling factor, as models/pretrained.py
describes (`models.pretrained.load_autoencoder` reads it). Both attention key styles are read: `to_q / to_k / to_v / to_out.0` and the older
`query / key / value / proj_attn`. The name table (`name_table`) lists, for every parameter, our path
beside the diffusers module name, so it can be checked against diffusers' Encoder and Decoder.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position

WEIGHTS = "diffusion_pytorch_model.safetensors"
# The older diffusers attention names, and the ones diffusers uses now.
_ATTENTION_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """models.AutoencoderKL's arguments from a diffusers AutoencoderKL config.json."""
  def need(ok: bool, what: str) -> None:
    if not ok:
      raise ValueError(f"config.json: {what}; this converter reads diffusers' AutoencoderKL "
                       "(SD 1.x, 2.x, SDXL).")
  channels = list(config["block_out_channels"])
  ch = channels[0]
  need(all(c % ch == 0 for c in channels), f"block_out_channels={channels} are not multiples of the first")
  need(set(config.get("down_block_types", ["DownEncoderBlock2D"])) == {"DownEncoderBlock2D"},
       f"down_block_types={config.get('down_block_types')}")
  need(set(config.get("up_block_types", ["UpDecoderBlock2D"])) == {"UpDecoderBlock2D"},
       f"up_block_types={config.get('up_block_types')}")
  need(config.get("act_fn", "silu") == "silu", f"act_fn={config.get('act_fn')!r}")
  need(config.get("in_channels", 3) == config.get("out_channels", 3),
       "in_channels and out_channels differ")
  quant = config.get("use_quant_conv", True)
  need(quant == config.get("use_post_quant_conv", True), "use_quant_conv and use_post_quant_conv differ")
  return dict(ch=ch, ch_mult=[c // ch for c in channels], num_res_blocks=config["layers_per_block"],
              latent_channels=config["latent_channels"], out_channels=config.get("out_channels", 3),
              groups=config.get("norm_num_groups", 32),
              mid_attention=config.get("mid_block_add_attention", True), use_quant_conv=quant)


def name_table(kwargs: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(our parameter path, diffusers module name, kind) for every layer; kind: conv, dense or norm."""
  levels, blocks = len(kwargs["ch_mult"]), kwargs["num_res_blocks"]
  rows = []

  def resnet(ours: str, theirs: str, shortcut: bool) -> None:
    for layer, kind in (("norm1", "norm"), ("conv1", "conv"), ("norm2", "norm"), ("conv2", "conv")):
      rows.append((f"{ours}/{layer}", f"{theirs}.{layer}", kind))
    if shortcut:
      rows.append((f"{ours}/conv_shortcut", f"{theirs}.conv_shortcut", "conv"))

  def middle(ours: str, theirs: str) -> None:
    resnet(f"{ours}/res_0", f"{theirs}.resnets.0", False)
    if kwargs["mid_attention"]:
      rows.append((f"{ours}/attn/group_norm", f"{theirs}.attentions.0.group_norm", "norm"))
      for name in ("to_q", "to_k", "to_v"):
        rows.append((f"{ours}/attn/{name}", f"{theirs}.attentions.0.{name}", "dense"))
      rows.append((f"{ours}/attn/to_out", f"{theirs}.attentions.0.to_out.0", "dense"))
    resnet(f"{ours}/res_1", f"{theirs}.resnets.1", False)

  ch, mult = kwargs["ch"], kwargs["ch_mult"]
  rows.append(("encoder/conv_in", "encoder.conv_in", "conv"))
  previous = ch * mult[0]
  for level in range(levels):
    for i in range(blocks):
      resnet(f"encoder/down_{level}_res_{i}", f"encoder.down_blocks.{level}.resnets.{i}",
             previous != ch * mult[level])
      previous = ch * mult[level]
    if level != levels - 1:
      rows.append((f"encoder/down_{level}_downsample", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                   "conv"))
  middle("encoder/mid", "encoder.mid_block")
  rows += [("encoder/norm_out", "encoder.conv_norm_out", "norm"), ("encoder/conv_out", "encoder.conv_out", "conv")]
  if kwargs["use_quant_conv"]:
    rows += [("quant_conv", "quant_conv", "conv"), ("post_quant_conv", "post_quant_conv", "conv")]

  rows.append(("decoder/conv_in", "decoder.conv_in", "conv"))
  middle("decoder/mid", "decoder.mid_block")
  previous = ch * mult[-1]
  for i, level in enumerate(reversed(range(levels))):  # diffusers counts up blocks from the lowest resolution.
    for j in range(blocks + 1):
      resnet(f"decoder/up_{level}_res_{j}", f"decoder.up_blocks.{i}.resnets.{j}", previous != ch * mult[level])
      previous = ch * mult[level]
    if level != 0:
      rows.append((f"decoder/up_{level}_upsample", f"decoder.up_blocks.{i}.upsamplers.0.conv", "conv"))
  rows += [("decoder/norm_out", "decoder.conv_norm_out", "norm"), ("decoder/conv_out", "decoder.conv_out", "conv")]
  return rows


def _lookup(weights: dict[str, np.ndarray], name: str) -> str:
  """The name under which the diffusers module is stored: name, or its older attention name."""
  candidates = [name]
  for new, old in _ATTENTION_ALIASES.items():
    if name.endswith("." + new):
      candidates.append(name[: -len(new)] + old)
  for candidate in candidates:
    if candidate + ".weight" in weights:
      return candidate
  also = "".join(f" (nor {c}.weight)" for c in candidates[1:])
  raise KeyError(f"{WEIGHTS} has no {name}.weight{also}: its config.json does not describe the weights, or "
                 "this is not the vae/ folder of a diffusers-format model.")


def convert_weights(weights: dict[str, np.ndarray], kwargs: dict[str, Any]) -> dict[str, Any]:
  """Our parameter tree from diffusers' state dict; every diffusers weight must be used exactly once."""
  params: dict[str, Any] = {}
  used = set()
  for ours, theirs, kind in name_table(kwargs):
    stored = _lookup(weights, theirs)
    weight, bias = weights[stored + ".weight"], weights[stored + ".bias"]
    used.update((stored + ".weight", stored + ".bias"))
    if kind == "conv":  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
      leaf = {"kernel": np.transpose(weight, (2, 3, 1, 0)), "bias": bias}
    elif kind == "dense":  # torch [out, in] (or a 1x1 convolution [out, in, 1, 1]) -> flax [in, out]
      leaf = {"kernel": weight.reshape(weight.shape[0], weight.shape[1]).T, "bias": bias}
    else:
      leaf = {"scale": weight, "bias": bias}
    node = params
    for part in ours.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[ours.split("/")[-1]] = {k: np.asarray(v, np.float32) for k, v in leaf.items()}
  unused = sorted(set(weights) - used)
  if unused:
    raise ValueError(f"{len(unused)} weights of {WEIGHTS} have no place in the converted model, e.g. "
                     f"{unused[:3]}: the config.json does not describe these weights.")
  return params


def convert(vae_dir: str, out_dir: str) -> dict[str, Any]:
  """Converts vae_dir (config.json + safetensors) into out_dir; returns the written description."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  config_path, weights_path = os.path.join(vae_dir, "config.json"), os.path.join(vae_dir, WEIGHTS)
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: pass the vae/ folder of a diffusers-format model.")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise ValueError(f"{config_path}: _class_name={config['_class_name']!r}, not AutoencoderKL.")
  kwargs = module_kwargs(config)
  params = convert_weights(load_file(weights_path), kwargs)
  extra = {"scaling_factor": config.get("scaling_factor", 0.18215), "shift_factor": config.get("shift_factor"),
           "source": os.path.abspath(vae_dir)}
  pretrained.save(out_dir, kind="autoencoder_kl", kwargs=kwargs, params=params, **extra)
  return {"kind": "autoencoder_kl", "kwargs": kwargs, **extra}


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  description = convert(argv[1], argv[2])
  print(f"Wrote {argv[2]}: AutoencoderKL {description['kwargs']}, scaling factor "
        f"{description['scaling_factor']}.")


if __name__ == "__main__":
  main(sys.argv)
