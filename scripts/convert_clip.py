"""Converts the `text_encoder/` folder of a diffusers-format model (SD 1.x, 2.x) to a models.clip text encoder.

  python scripts/convert_clip.py PATH/stable-diffusion-v1-5/text_encoder ~/models/sd15_text \
      [PATH/stable-diffusion-v1-5/tokenizer]

reads `config.json` and `model.safetensors` with numpy (no torch) and writes the Flax parameters and
the module's arguments as models/pretrained.py describes (`models.pretrained.load_text_encoder` reads
it). Both key layouts are read: the hub's `text_model.embeddings...` and transformers 5's
`save_pretrained` without the `text_model.` prefix. Given a tokenizer folder, it is checked (loaded
with models.tokenizer) and its files are copied to `<out>/tokenizer`. The name table (`name_table`)
lists, for every parameter, our path beside transformers' CLIPTextModel module name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import clip  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# The safetensors file a text_encoder/ folder holds; the second is diffusers' `variant="fp16"` download.
WEIGHTS = ("model.safetensors", "model.fp16.safetensors")
PICKLED = ("pytorch_model.bin", "model.bin", "pytorch_model.fp16.bin", "model.ckpt")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_PREFIX = "text_model."  # The hub's SD folders store CLIPTextModel's keys under this prefix.


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """models.clip.CLIPTextTransformer's arguments from a transformers CLIPTextModel config.json."""
  if config.get("model_type", "clip_text_model") != "clip_text_model":
    raise ValueError(f"config.json: model_type={config['model_type']!r}, not 'clip_text_model'.")
  if config.get("hidden_act", "quick_gelu") not in clip.ACTIVATIONS:
    raise ValueError(f"config.json: hidden_act={config['hidden_act']!r} is not one of "
                     f"{', '.join(clip.ACTIVATIONS)}.")
  names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "max_position_embeddings")
  missing = [k for k in names if k not in config]
  if missing:
    raise ValueError(f"config.json has no {', '.join(missing)}: it does not describe a CLIPTextModel.")
  kwargs = {k: int(config[k]) for k in names}
  kwargs.update(hidden_act=config.get("hidden_act", "quick_gelu"),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                eos_token_id=int(config.get("eos_token_id", 2)))
  return kwargs


def name_table(kwargs: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(our parameter path, CLIPTextModel module name, kind) for every layer; kind: embed, dense or norm."""
  rows = [("token_embedding", "embeddings.token_embedding", "embed"),
          ("position_embedding", "embeddings.position_embedding", "embed")]
  for i in range(kwargs["num_hidden_layers"]):
    ours, theirs = f"layers_{i}", f"encoder.layers.{i}"
    rows.append((f"{ours}/layer_norm1", f"{theirs}.layer_norm1", "norm"))
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rows.append((f"{ours}/self_attn/{proj}", f"{theirs}.self_attn.{proj}", "dense"))
    rows.append((f"{ours}/layer_norm2", f"{theirs}.layer_norm2", "norm"))
    rows += [(f"{ours}/fc1", f"{theirs}.mlp.fc1", "dense"), (f"{ours}/fc2", f"{theirs}.mlp.fc2", "dense")]
  rows.append(("final_layer_norm", "final_layer_norm", "norm"))
  return rows


def expected_shapes(kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Our parameter shapes, '/'-joined path -> shape, without running the model."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  model = clip.CLIPTextTransformer(**kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_weights(weights: dict[str, np.ndarray], kwargs: dict[str, Any]) -> dict[str, Any]:
  """Our parameter tree from a CLIPTextModel state dict, with or without the hub's `text_model.` prefix."""
  prefix = HUB_PREFIX if any(k.startswith(HUB_PREFIX) for k in weights) else ""
  used = set()
  position_ids = f"{prefix}embeddings.position_ids"  # A buffer older transformers saved; not a weight.
  if position_ids in weights:
    if not np.array_equal(np.ravel(weights[position_ids]), np.arange(np.size(weights[position_ids]))):
      raise ValueError(f"{position_ids} is not 0, 1, 2, ...: positions other than the sequence's own are "
                       "not supported.")
    used.add(position_ids)
  shapes = expected_shapes(kwargs)
  params: dict[str, Any] = {}
  for ours, theirs, kind in name_table(kwargs):
    names = {"weight": f"{prefix}{theirs}.weight"} if kind == "embed" else {
        "weight": f"{prefix}{theirs}.weight", "bias": f"{prefix}{theirs}.bias"}
    for name in names.values():
      if name not in weights:
        layout = "the hub's text_model.* layout" if prefix else "transformers' layout without text_model."
        raise KeyError(f"the weights have no {name} (read in {layout}): the config.json does not describe "
                       "them, or this is not the text_encoder/ folder of a diffusers-format model.")
    used.update(names.values())
    weight = np.asarray(weights[names["weight"]], np.float32)
    if kind == "embed":
      leaf = {"embedding": weight}
    elif kind == "dense":  # torch [out, in] -> flax [in, out]
      leaf = {"kernel": weight.T, "bias": np.asarray(weights[names["bias"]], np.float32)}
    else:
      leaf = {"scale": weight, "bias": np.asarray(weights[names["bias"]], np.float32)}
    node = params
    for part in ours.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[ours.split("/")[-1]] = leaf
    for key, value in leaf.items():
      if value.shape != shapes[f"{ours}/{key}"]:
        raise ValueError(f"{names['weight' if key != 'bias' else 'bias']} has shape {value.shape}, but the "
                         f"config.json describes {shapes[f'{ours}/{key}']} (our {ours}/{key}).")
  unused = sorted(set(weights) - used)
  if unused:
    raise ValueError(f"{len(unused)} weights have no place in the converted text encoder, e.g. {unused[:3]}: "
                     "the config.json does not describe them (a CLIPTextModelWithProjection is not read).")
  return params


def weights_path(text_encoder_dir: str) -> str:
  """The folder's safetensors file; a pickled checkpoint is refused, since unpickling runs its code."""
  for name in WEIGHTS:
    if os.path.exists(os.path.join(text_encoder_dir, name)):
      return os.path.join(text_encoder_dir, name)
  pickled = [name for name in PICKLED if os.path.exists(os.path.join(text_encoder_dir, name))]
  if pickled:
    raise ValueError(
        f"{os.path.join(text_encoder_dir, pickled[0])} is a pickled PyTorch checkpoint, which this converter "
        "does not read (unpickling a downloaded file runs its code). Download the safetensors version, e.g. "
        "`hf download REPO text_encoder/model.safetensors text_encoder/config.json`, or, with a "
        "copy you trust, save it once with transformers: `CLIPTextModel.from_pretrained(DIR)"
        ".save_pretrained(DIR)` (safetensors by default).")
  raise FileNotFoundError(f"{os.path.join(text_encoder_dir, WEIGHTS[0])} does not exist: pass the text_encoder/ "
                          "folder of a diffusers-format model.")


def convert(text_encoder_dir: str, out_dir: str, tokenizer_dir: Optional[str] = None) -> dict[str, Any]:
  """Converts text_encoder_dir (config.json + safetensors) into out_dir; returns the written description."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(text_encoder_dir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: pass the text_encoder/ folder of a "
                            "diffusers-format model.")
  path = weights_path(text_encoder_dir)
  with open(config_path) as f:
    kwargs = module_kwargs(json.load(f))
  if os.path.exists(out_dir):
    raise FileExistsError(f"{os.path.abspath(out_dir)} exists already; give a new output directory.")
  if tokenizer_dir is not None:
    tok = tokenizer_lib.load(tokenizer_dir)  # Fails here, before anything is written, if it is unreadable.
    if tok.backend.get_vocab_size() > kwargs["vocab_size"]:
      raise ValueError(f"{tokenizer_dir} has {tok.backend.get_vocab_size()} tokens, more than the text "
                       f"encoder's vocab_size={kwargs['vocab_size']}.")
    if tok.max_length > kwargs["max_position_embeddings"]:
      raise ValueError(f"{tokenizer_dir}: model_max_length={tok.max_length} exceeds the text encoder's "
                       f"max_position_embeddings={kwargs['max_position_embeddings']}.")
  params = convert_weights(load_file(path), kwargs)
  extra = {"source": os.path.abspath(text_encoder_dir), "tokenizer": "tokenizer" if tokenizer_dir else None}
  pretrained.save(out_dir, kind="clip_text", kwargs=kwargs, params=params, **extra)
  if tokenizer_dir is not None:
    os.makedirs(os.path.join(out_dir, "tokenizer"))
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, "tokenizer", name))
  return {"kind": "clip_text", "kwargs": kwargs, **extra}


def main(argv: list[str]) -> None:
  if len(argv) not in (3, 4):
    raise SystemExit(__doc__)
  description = convert(*argv[1:])
  print(f"Wrote {argv[2]}: CLIPTextTransformer {description['kwargs']}"
        + (", with its tokenizer." if len(argv) == 4 else "."))


if __name__ == "__main__":
  main(sys.argv)
