"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` package from a checkpoint's own files.

A Stable Diffusion `tokenizer/` folder holds `vocab.json` + `merges.txt` (the hub's layout) or a
`tokenizer.json` (what transformers 5 saves), beside `tokenizer_config.json` and, in older folders,
`special_tokens_map.json`. The pipeline is transformers' CLIPTokenizer (CLIPConverter): NFC, runs of
whitespace to one space, lower case; CLIP's split pattern, then byte-level symbols; BPE with "</w>"
ending each word; <|startoftext|> ... <|endoftext|> around the ids. Prompts are truncated and padded to
`model_max_length` (77) with the folder's pad token: the end token in SD 1.x, "!" (id 0) in SD 2.x.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The original CLIP's word pattern (openai/CLIP simple_tokenizer.py), as transformers' CLIPTokenizer uses it.
CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                r"""[^\s\p{L}\p{N}]+""")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Turns prompts into [B, max_length] int32 ids: <bos> tokens <eos> <pad>..., truncated to fit."""

  backend: tokenizers.Tokenizer  # Truncation and padding to max_length are enabled on it.
  max_length: int
  bos_id: int
  eos_id: int
  pad_id: int

  def __call__(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    encodings = self.backend.encode_batch(list(prompts))
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(prompts), self.max_length)


def _added_token(spec: Union[str, dict[str, Any]]) -> tokenizers.AddedToken:
  """A special token from its config entry: a string, or transformers' serialised AddedToken dict."""
  if isinstance(spec, str):
    return tokenizers.AddedToken(spec, special=True, normalized=False)
  flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
  return tokenizers.AddedToken(spec["content"], special=True, **flags)


def clip_backend(*, vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> tokenizers.Tokenizer:
  """The tokenizer pipeline of transformers' CLIPTokenizer (convert_slow_tokenizer.CLIPConverter)."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
      fuse_unk=False, unk_token=unk_token))
  backend.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  backend.decoder = decoders.ByteLevel()
  return backend


def special_tokens(directory: str) -> dict[str, Any]:
  """bos/eos/unk/pad tokens and model_max_length of a tokenizer folder, read as transformers reads them.

  tokenizer_config.json first; special_tokens_map.json overrides it where the config has no
  `added_tokens_decoder` (transformers' rule for older folders).
  """
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: pass the tokenizer/ folder of a diffusers-format model.")
  with open(path) as f:
    config = json.load(f)
  map_path = os.path.join(directory, "special_tokens_map.json")
  if "added_tokens_decoder" not in config and os.path.exists(map_path):
    with open(map_path) as f:
      config.update({k: v for k, v in json.load(f).items() if k in SPECIAL_TOKENS})
  missing = [k for k in SPECIAL_TOKENS + ("model_max_length",) if config.get(k) is None]
  if missing:
    raise ValueError(f"{path} names no {', '.join(missing)}: a CLIP tokenizer needs bos_token, eos_token, "
                     "unk_token, pad_token and model_max_length (77 in Stable Diffusion).")
  return {k: config[k] for k in SPECIAL_TOKENS + ("model_max_length",)}


def load(directory: str, *, max_length: Optional[int] = None) -> Tokenizer:
  """The tokenizer of a folder: tokenizer.json if present (as transformers prefers), else vocab.json + merges.txt."""
  directory = os.path.abspath(os.path.expanduser(directory))
  config = special_tokens(directory)
  content = lambda k: config[k] if isinstance(config[k], str) else config[k]["content"]
  json_path = os.path.join(directory, "tokenizer.json")
  vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
  if os.path.exists(json_path):
    backend = tokenizers.Tokenizer.from_file(json_path)
  elif os.path.exists(vocab_path) and os.path.exists(merges_path):
    vocab, merges = tokenizers.models.BPE.read_file(vocab_path, merges_path)
    backend = clip_backend(vocab=vocab, merges=merges, unk_token=content("unk_token"))
  else:
    missing = vocab_path if not os.path.exists(vocab_path) else merges_path
    raise FileNotFoundError(f"{missing} does not exist, nor does {json_path}: a tokenizer folder needs "
                            "vocab.json and merges.txt, or tokenizer.json.")
  backend.add_special_tokens([_added_token(config[k]) for k in SPECIAL_TOKENS])
  ids = {k: backend.token_to_id(content(k)) for k in SPECIAL_TOKENS}
  unknown = [f"{k}={content(k)!r}" for k, i in ids.items() if i is None]
  if unknown:
    raise ValueError(f"{directory}: {', '.join(unknown)} is not in the vocabulary.")
  backend.post_processor = processors.RobertaProcessing(
      (content("eos_token"), ids["eos_token"]), (content("bos_token"), ids["bos_token"]),
      trim_offsets=False, add_prefix_space=False)
  length = int(max_length or config["model_max_length"])
  # Truncation leaves room for <bos> and <eos>, so an over-long prompt still ends with <eos>.
  backend.enable_truncation(max_length=length)
  backend.enable_padding(length=length, pad_id=ids["pad_token"], pad_token=content("pad_token"))
  return Tokenizer(backend=backend, max_length=length, bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                   pad_id=ids["pad_token"])


# The special tokens of a word-level tokenizer built here, in id order (pad 0, eos 1, bos 2, unk 3); the
# end token's id is not 2, which CLIPTextTransformer's pooling would read as "the largest id".
WORD_SPECIALS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}


def build_word_level(texts: Sequence[str], *, vocab_size: int, directory: str,
                     max_length: int) -> Tokenizer:
  """A word-level tokenizer of the texts' most frequent words, written to directory and loaded from it.

  Lower case, split on whitespace and punctuation (tokenizers' Whitespace pre-tokenizer), one id per
  word, unknown words to <unk>; vocab_size counts the four special tokens. directory receives
  tokenizer.json and tokenizer_config.json, which `load` reads back (it must not exist yet).
  """
  if vocab_size <= len(WORD_SPECIALS):
    raise ValueError(f"vocab_size={vocab_size} leaves no room for words beside the "
                     f"{len(WORD_SPECIALS)} special tokens.")
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token=WORD_SPECIALS["unk_token"]))
  backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1,
                                                 special_tokens=list(WORD_SPECIALS.values()))
  backend.train_from_iterator(texts, trainer=trainer)
  os.makedirs(directory)
  backend.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({**WORD_SPECIALS, "model_max_length": max_length}, f, indent=2)
  return load(directory)
