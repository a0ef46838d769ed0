"""Optional: the converted text encoder and our tokenizer against transformers' CLIPTextModel and CLIPTokenizer.

Runs where torch and transformers import (requirements-reference.txt). Small random CLIPTextModels
(quick-GELU as SD 1.x, GELU as SD 2.x) are saved with save_pretrained, converted by
scripts/convert_clip.py (numpy only), also with the keys renamed to the hub's `text_model.*`, and
compared on the same ids. The tokenizer is compared on CLIP's real vocabulary, built from
open-clip-torch's bpe_simple_vocab_16e6.txt.gz as CLIP's SimpleTokenizer builds it, with transformers'
CLIPTokenizer (transformers 5 has only the `tokenizers`-backed one) and with CLIP's own SimpleTokenizer.
"""

import gzip
import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_env  # pylint: disable=g-bad-import-order

torch = reference_env.import_torch()
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_clip  # pylint: disable=g-import-not-at-top,wrong-import-position

ATOL = 1e-4
V = 1000
CONFIG = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=V - 2, pad_token_id=1)
# SD 1.x's configs say eos_token_id=2 (pooled at the largest id); a configured end token is the other path.
CASES = {"sd1_quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=2),
         "sd2_gelu": dict(hidden_act="gelu", eos_token_id=V - 1)}


def _save_random_clip(directory, spec):
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CONFIG, **spec))
  with torch.no_grad():  # Non-trivial norms and biases, so that a transposed or swapped weight shows.
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _add_hub_prefix(directory):
  path = os.path.join(directory, "model.safetensors")
  weights = {"text_model." + k: v for k, v in safetensors_numpy.load_file(path).items()}
  weights["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  safetensors_numpy.save_file(weights, path)


@pytest.mark.parametrize("layout", ["transformers5", "hub_text_model"])
@pytest.mark.parametrize("case", list(CASES))
def test_converted_text_encoder_matches_transformers(tmp_path, case, layout):
  reference = _save_random_clip(str(tmp_path / "text_encoder"), CASES[case])
  with safetensors_numpy.safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "np") as f:
    assert not any(k.startswith("text_model.") for k in f.keys())  # transformers 5's layout.
  if layout == "hub_text_model":
    _add_hub_prefix(str(tmp_path / "text_encoder"))
  convert_clip.convert(str(tmp_path / "text_encoder"), str(tmp_path / "converted"))
  model, params, _ = pretrained.load_text_encoder(str(tmp_path / "converted"))

  rng = np.random.default_rng(0)
  ids = rng.integers(0, V - 2, (3, 77))
  ids[:, 0] = V - 2
  for row, (n, pad) in zip(ids, [(5, V - 1), (20, 0), (76, 0)]):  # SD 1.x pads with <eos>, SD 2.x with 0.
    row[n], row[n + 1:] = V - 1, pad
  with torch.no_grad():
    out = reference(torch.from_numpy(ids), output_hidden_states=True)
    skipped = reference.final_layer_norm(out.hidden_states[-2])  # diffusers' encode_prompt(clip_skip=1).
  ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
  ours_skipped = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), clip_skip=1)
  errors = {"last_hidden_state": np.abs(np.asarray(ours.last_hidden_state) - out.last_hidden_state.numpy()).max(),
            "pooled": np.abs(np.asarray(ours.pooled) - out.pooler_output.numpy()).max(),
            "clip_skip=1": np.abs(np.asarray(ours_skipped.last_hidden_state) - skipped.numpy()).max()}
  print(f"{case} {layout} max abs errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) < ATOL, errors


# ---------------------------------------------------------------------------------------------------
# Tokenizer.

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Hello, World!!! What's up? I'm sure they'll've done it; isn't it?",
    "   extra   whitespace\tand\n\nnewlines   ",
    "café crème brûlée, naïve façade; cafe\u0301 decomposed",
    "東京の夜景 🌃 and emoji 🚀🔥, Ünïcödé ΑΒΓ αβγ",
    "1234 numbers 3.14 and mixed-case CamelCase_words",
    "(masterpiece:1.2), [bad hands], {best quality} #tag @user",
    "",
    "an over-length prompt, " * 30,
]


def _open_clip_module():
  """open_clip's tokenizer.py (CLIP's SimpleTokenizer) loaded on its own: the package imports torchvision."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch).")
  path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
  pytest.importorskip("ftfy")
  module_spec = importlib.util.spec_from_file_location("open_clip_simple_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _clip_vocabulary(open_clip_tokenizer):
  """vocab and merges exactly as CLIP's SimpleTokenizer builds them from its BPE file."""
  with gzip.open(open_clip_tokenizer.default_bpe()) as f:
    merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(m.split()) for m in merges]
  symbols = list(open_clip_tokenizer.bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {s: i for i, s in enumerate(vocab)}, merges


def _sd_tokenizer_folder(directory, vocab, merges, version):
  """The hub's SD 1.x or SD 2.x tokenizer/ folder layout (vocab.json, merges.txt and the two configs)."""
  os.makedirs(directory)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = lambda s, normalized: {"content": s, "lstrip": False, "normalized": normalized, "rstrip": False,
                                   "single_word": False}
  tokens = {"bos_token": special("<|startoftext|>", True), "eos_token": special("<|endoftext|>", True),
            "unk_token": special("<|endoftext|>", True)}
  config = dict({k: dict(v, __type="AddedToken") for k, v in tokens.items()}, add_prefix_space=False, do_lower_case=True, errors="replace", model_max_length=77,
                tokenizer_class="CLIPTokenizer")
  if version == 1:
    config["pad_token"] = tokens["pad_token"] = "<|endoftext|>"
  else:  # stabilityai/stable-diffusion-2-1: pad with "!", registered as a special added token.
    tokens["pad_token"] = special("!", False)
    config["pad_token"] = dict(tokens["pad_token"], __type="AddedToken")
    config["added_tokens_decoder"] = {
        "0": dict(special("!", False), special=True),
        str(vocab["<|startoftext|>"]): dict(special("<|startoftext|>", True), special=True),
        str(vocab["<|endoftext|>"]): dict(special("<|endoftext|>", True), special=True)}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(tokens, f)
  return str(directory)


@pytest.fixture(scope="module")
def clip_vocabulary():
  module = _open_clip_module()
  return module, _clip_vocabulary(module)


@pytest.mark.parametrize("version", [1, 2])
def test_token_ids_equal_transformers_and_clip(tmp_path, clip_vocabulary, version):
  open_clip_tokenizer, (vocab, merges) = clip_vocabulary
  folder = _sd_tokenizer_folder(tmp_path / "tokenizer", vocab, merges, version)
  ours = tokenizer_lib.load(folder)
  ids = ours(PROMPTS)
  reference = transformers.CLIPTokenizer.from_pretrained(folder)
  expected = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length,
                       truncation=True).input_ids
  np.testing.assert_array_equal(ids, np.asarray(expected))
  eos = vocab["<|endoftext|>"]
  assert ours.pad_id == (eos if version == 1 else 0) and ids[-1, -1] == eos and (ids[:, 0] == eos - 1).all()
  # transformers saves tokenizer.json only: the same ids from that layout.
  reference.save_pretrained(str(tmp_path / "saved"))
  assert not os.path.exists(tmp_path / "saved" / "vocab.json")
  np.testing.assert_array_equal(tokenizer_lib.load(str(tmp_path / "saved"))(PROMPTS), ids)
  if version == 1:  # CLIP's own tokenizer pads with 0 after <eos>; SD 1.x pads with <eos>.
    simple = open_clip_tokenizer.SimpleTokenizer()(PROMPTS, context_length=77).numpy()
    for ours_row, row in zip(ids, simple):
      n = int(np.argmax(row == eos)) + 1
      np.testing.assert_array_equal(ours_row[:n], row[:n])
      np.testing.assert_array_equal(ours_row[n:], eos)
