"""The CLIP text encoder, its converter and the CLIP tokenizer, without torch.

The model is checked against a numpy forward pass written from the paper's description (pre-LayerNorm
causal transformer), the converter on transformers-named state dicts written with safetensors' numpy
API in both key layouts, and the tokenizer on a small vocabulary built here the way CLIP builds its own.
Parity with transformers' own CLIPTextModel and CLIPTokenizer is tests/test_reference_clip.py.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from safetensors.numpy import save_file

from models import clip
from models import pretrained
from models import tokenizer as tokenizer_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import convert_clip  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=10)
IDS = np.array([[38, 5, 7, 9, 39, 39, 39, 39, 39, 39],  # SD 1.x: padded with the end token (39).
                [38, 11, 39, 0, 0, 0, 0, 0, 0, 0]], np.int32)  # SD 2.x: padded with id 0.


def _random_params(model, seed=0):
  """Initial parameters with every leaf perturbed, so that a swapped or transposed weight shows."""
  params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(IDS))["params"]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [np.asarray(p) + 0.2 * rng.normal(size=p.shape).astype(np.float32)
                                      for p in leaves])


def _numpy_forward(params, ids, *, num_heads, hidden_act, eps=1e-5):
  """Hidden states after each layer (before the final LayerNorm), in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  def norm(x, q):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * q["scale"] + q["bias"]
  def dense(x, q):
    return x @ q["kernel"] + q["bias"]
  act = {"quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
         "gelu": lambda x: 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))}[hidden_act]
  b, t = ids.shape
  x = p["token_embedding"]["embedding"][ids] + p["position_embedding"]["embedding"][:t]
  states = [x]
  for i in range(len([k for k in p if k.startswith("layers_")])):
    layer = p[f"layers_{i}"]
    h = norm(x, layer["layer_norm1"])
    split = lambda a: a.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(h, layer["self_attn"][n])) for n in ("q_proj", "k_proj", "v_proj"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    h = (weights / weights.sum(-1, keepdims=True)) @ v
    x = x + dense(h.transpose(0, 2, 1, 3).reshape(b, t, -1), layer["self_attn"]["out_proj"])
    x = x + dense(act(dense(norm(x, layer["layer_norm2"]), layer["fc1"])), layer["fc2"])
    states.append(x)
  return states, lambda s: norm(s, p["final_layer_norm"])


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_forward_matches_a_numpy_transformer_with_clip_skip_and_pooling(hidden_act):
  model = clip.CLIPTextTransformer(**TINY, hidden_act=hidden_act)
  params = _random_params(model)
  apply = jax.jit(model.apply, static_argnames="clip_skip")
  out = apply({"params": params}, jnp.asarray(IDS))
  states, final_norm = _numpy_forward(params, IDS, num_heads=2, hidden_act=hidden_act)
  assert out.last_hidden_state.shape == (2, 10, 16) and out.pooled.shape == (2, 16)
  np.testing.assert_allclose(out.last_hidden_state, final_norm(states[-1]), atol=2e-5)
  # eos_token_id=2 (SD's configs): pooled at the largest id, the first end token (positions 4 and 2).
  np.testing.assert_allclose(out.pooled, final_norm(states[-1])[[0, 1], [4, 2]], atol=2e-5)
  # clip_skip=1: the second-to-last layer's output, through the final LayerNorm; pooling unchanged.
  skipped = apply({"params": params}, jnp.asarray(IDS), clip_skip=1)
  np.testing.assert_allclose(skipped.last_hidden_state, final_norm(states[-2]), atol=2e-5)
  assert np.abs(final_norm(states[-2]) - final_norm(states[-1])).max() > 0.1
  np.testing.assert_array_equal(skipped.pooled, out.pooled)


def test_pooled_state_is_at_the_first_end_token_when_eos_token_id_is_set():
  # A configured end token (not 2) is looked up, so a larger id after it does not move the pooled state.
  model = clip.CLIPTextTransformer(**TINY, eos_token_id=30)
  ids = np.array([[38, 5, 30, 39, 30, 0, 0, 0, 0, 0]], np.int32)
  params = _random_params(model)
  out = model.apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_array_equal(out.pooled, out.last_hidden_state[:, 2])


def test_causal_mask_a_later_token_does_not_change_earlier_states():
  model = clip.CLIPTextTransformer(**TINY)
  params = _random_params(model)
  changed = IDS.copy()
  changed[:, 5] = 17
  a = model.apply({"params": params}, jnp.asarray(IDS)).last_hidden_state
  b = model.apply({"params": params}, jnp.asarray(changed)).last_hidden_state
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).min(axis=-1).max() > 0


def test_bfloat16_compute_keeps_float32_params_and_bad_arguments_are_named():
  model = clip.CLIPTextTransformer(**TINY, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), jnp.asarray(IDS))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert model.apply(variables, jnp.asarray(IDS)).last_hidden_state.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"clip_skip=3 is not in \[0, num_hidden_layers=3\)"):
    model.apply(variables, jnp.asarray(IDS), clip_skip=3)
  with pytest.raises(ValueError, match="max_position_embeddings=10"):
    model.apply(variables, jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match="hidden_act='relu' is not one of quick_gelu, gelu"):
    clip.CLIPTextTransformer(**TINY, hidden_act="relu").init(jax.random.key(0), jnp.asarray(IDS))


# ---------------------------------------------------------------------------------------------------
# Conversion.


def _text_encoder_folder(directory, params, *, hidden_act="quick_gelu", hub_prefix=False, **sizes):
  """A text_encoder/ folder: our params under transformers' names, as torch lays them out."""
  sizes = dict(TINY, **sizes)
  kwargs = dict(sizes, hidden_act=hidden_act, layer_norm_eps=1e-5, eos_token_id=2)
  weights = {}
  for ours, theirs, kind in convert_clip.name_table(kwargs):
    leaf = params
    for part in ours.split("/"):
      leaf = leaf[part]
    if kind == "embed":
      weights[theirs + ".weight"] = np.asarray(leaf["embedding"])
    elif kind == "dense":
      weights[theirs + ".weight"] = np.ascontiguousarray(np.asarray(leaf["kernel"]).T)
      weights[theirs + ".bias"] = np.asarray(leaf["bias"])
    else:
      weights[theirs + ".weight"], weights[theirs + ".bias"] = np.asarray(leaf["scale"]), np.asarray(leaf["bias"])
  if hub_prefix:  # The hub's files also hold the position_ids buffer of older transformers.
    weights = {"text_model." + k: v for k, v in weights.items()}
    weights["text_model.embeddings.position_ids"] = np.arange(sizes["max_position_embeddings"], dtype=np.int64)[None]
  os.makedirs(directory)
  save_file(weights, os.path.join(directory, "model.safetensors"))
  config = dict(sizes, model_type="clip_text_model", architectures=["CLIPTextModel"], hidden_act=hidden_act,
                layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=8)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return weights


@pytest.mark.parametrize("hub_prefix", [False, True], ids=["transformers5", "hub_text_model"])
def test_conversion_round_trip_in_both_key_layouts(tmp_path, hub_prefix):
  model = clip.CLIPTextTransformer(**TINY, hidden_act="gelu")
  params = _random_params(model, seed=1)
  _text_encoder_folder(str(tmp_path / "text_encoder"), params, hidden_act="gelu", hub_prefix=hub_prefix)
  convert_clip.convert(str(tmp_path / "text_encoder"), str(tmp_path / "converted"))
  loaded, loaded_params, description = pretrained.load_text_encoder(str(tmp_path / "converted"))
  assert loaded == model and description["kind"] == "clip_text"
  jax.tree.map(np.testing.assert_array_equal, loaded_params, jax.tree.map(np.asarray, params))


def test_conversion_refuses_bad_folders_before_writing(tmp_path):
  model = clip.CLIPTextTransformer(**TINY)
  folder, out = tmp_path / "text_encoder", str(tmp_path / "converted")
  weights = _text_encoder_folder(str(folder), _random_params(model))
  os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin is a pickled PyTorch checkpoint.*safetensors"):
    convert_clip.convert(str(folder), out)
  os.remove(folder / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match=r"text_encoder/model\.safetensors does not exist"):
    convert_clip.convert(str(folder), out)
  del weights["encoder.layers.2.self_attn.k_proj.bias"]
  save_file(weights, str(folder / "model.safetensors"))
  with pytest.raises(KeyError, match=r"encoder\.layers\.2\.self_attn\.k_proj\.bias"):
    convert_clip.convert(str(folder), out)
  with open(folder / "config.json") as f:
    config = json.load(f)
  with open(folder / "config.json", "w") as f:
    json.dump(dict(config, hidden_act="gelu_new"), f)
  with pytest.raises(ValueError, match="hidden_act='gelu_new' is not one of quick_gelu, gelu"):
    convert_clip.convert(str(folder), out)
  with open(folder / "config.json", "w") as f:
    json.dump(dict(config, num_hidden_layers=2), f)
  with pytest.raises(ValueError, match=r"15 weights have no place.*encoder\.layers\.2\.layer_norm1\.bias"):
    convert_clip.convert(str(folder), out)
  os.remove(folder / "config.json")
  with pytest.raises(FileNotFoundError, match=r"text_encoder/config\.json does not exist"):
    convert_clip.convert(str(folder), out)
  assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------
# Tokenizer: a small vocabulary made the way CLIP's SimpleTokenizer makes its own (256 byte symbols,
# the same with "</w>", one entry per merge, then the two special tokens).


def _bytes_to_unicode():
  """GPT-2's and CLIP's reversible byte -> printable character table; "!" comes first (id 0)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


BYTES = _bytes_to_unicode()
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("w", "o"), ("wo", "r"), ("l", "d</w>"),
          ("wor", "ld</w>")]
SYMBOLS = list(BYTES.values())
VOCAB = {s: i for i, s in enumerate(SYMBOLS + [s + "</w>" for s in SYMBOLS] + ["".join(m) for m in MERGES]
                                      + ["<|startoftext|>", "<|endoftext|>"])}
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]


def _byte(b, end=False):
  return VOCAB[BYTES[b] + ("</w>" if end else "")]


def _tokenizer_folder(directory, *, pad, json_file=False):
  """SD 1.x (pad=<|endoftext|>) or SD 2.x (pad="!") tokenizer/ folder, in either file layout."""
  os.makedirs(directory)
  if json_file:
    backend = tokenizer_lib.clip_backend(vocab=VOCAB, merges=MERGES, unk_token="<|endoftext|>")
    backend.save(os.path.join(directory, "tokenizer.json"))
  else:
    with open(os.path.join(directory, "vocab.json"), "w") as f:
      json.dump(VOCAB, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  special = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
  config = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
            "unk_token": special("<|endoftext|>"), "pad_token": "<|endoftext|>", "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer"}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:  # Overrides the config's pad.
    json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token")} | {"pad_token": pad}, f)
  return str(directory)


@pytest.mark.parametrize("json_file", [False, True], ids=["vocab_merges", "tokenizer_json"])
def test_tokenizer_ids_padding_of_both_sd_versions_and_truncation(tmp_path, json_file):
  sd1 = tokenizer_lib.load(_tokenizer_folder(tmp_path / "sd1", pad="<|endoftext|>", json_file=json_file))
  sd2 = tokenizer_lib.load(_tokenizer_folder(tmp_path / "sd2", pad="!", json_file=json_file))
  assert (sd1.pad_id, sd2.pad_id, sd1.eos_id, sd1.max_length) == (EOS, 0, EOS, 77)
  hello, comma, world = VOCAB["hello</w>"], _byte(ord(","), end=True), VOCAB["world</w>"]
  # Lower case, runs of whitespace as one space, words split from punctuation.
  content = [hello, comma, world]
  ids = sd1(["Hello,  \t WORLD!", "HELLO,world!"])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  for row in ids:
    np.testing.assert_array_equal(row[:6], [BOS] + content + [_byte(ord("!"), end=True), EOS])
    np.testing.assert_array_equal(row[6:], EOS)
  # SD 2.x's pad token "!" is a special token: a "!" in the prompt becomes id 0 too, as in transformers.
  ids = sd2("Hello,  \t WORLD!")[0]
  np.testing.assert_array_equal(ids[:6], [BOS] + content + [0, EOS])
  np.testing.assert_array_equal(ids[6:], 0)
  # Unicode: NFC first (a decomposed é composes), then UTF-8 bytes, "</w>" on the word's last byte.
  cafe = [_byte(ord("c")), _byte(ord("a")), _byte(ord("f")), _byte(0xC3), _byte(0xA9, end=True)]
  for text in ("café", "cafe\u0301"):
    np.testing.assert_array_equal(sd1(text)[0, :7], [BOS] + cafe + [EOS])
  # Over-length: truncated to 77 with <bos> first and <eos> kept last.
  ids = sd2("hello " * 100)[0]
  np.testing.assert_array_equal(ids, [BOS] + [hello] * 75 + [EOS])


def test_tokenizer_folder_errors_name_the_file_and_key(tmp_path):
  folder = _tokenizer_folder(tmp_path / "tok", pad="!")
  os.remove(os.path.join(folder, "merges.txt"))
  with pytest.raises(FileNotFoundError, match=r"tok/merges\.txt does not exist"):
    tokenizer_lib.load(folder)
  folder = _tokenizer_folder(tmp_path / "tok2", pad="!")
  os.remove(os.path.join(folder, "special_tokens_map.json"))
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    config = json.load(f)
  del config["pad_token"]
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"tokenizer_config\.json names no pad_token"):
    tokenizer_lib.load(folder)


def test_conversion_with_a_tokenizer_copies_it_beside_the_weights(tmp_path):
  tokenizer_dir = _tokenizer_folder(tmp_path / "tokenizer", pad="!")
  short = clip.CLIPTextTransformer(**dict(TINY, vocab_size=len(VOCAB)))
  _text_encoder_folder(str(tmp_path / "short"), _random_params(short), vocab_size=len(VOCAB))
  with pytest.raises(ValueError, match="model_max_length=77 exceeds the text encoder.s max_position_embeddings=10"):
    convert_clip.convert(str(tmp_path / "short"), str(tmp_path / "converted"), tokenizer_dir)
  assert not os.path.exists(tmp_path / "converted")
  sizes = dict(vocab_size=len(VOCAB), max_position_embeddings=77)
  model = clip.CLIPTextTransformer(**dict(TINY, **sizes))
  params = model.init(jax.random.key(0), jnp.asarray(IDS))["params"]
  folder = tmp_path / "text_encoder"
  _text_encoder_folder(str(folder), params, **sizes)
  description = convert_clip.convert(str(folder), str(tmp_path / "converted"), tokenizer_dir)
  assert description["tokenizer"] == "tokenizer"
  copied = tokenizer_lib.load(str(tmp_path / "converted" / "tokenizer"))
  np.testing.assert_array_equal(copied("Hello world!"), tokenizer_lib.load(tokenizer_dir)("Hello world!"))
  assert copied.pad_id == 0
