"""Text conditioning: prompts -> token ids (on the host) -> context [B, T, D] (inside the compiled step).

A text-conditional model (models/sd_unet.py) reads cond["context"], the text encoder's last hidden
state (after its final LayerNorm; Stable Diffusion's conditioning, see models/clip.py). Prompts are
tokenised on the host, outside any compiled program, so a new prompt never recompiles; the encoder runs
inside the train step and the sampler on the ids, with its parameters passed as an argument.

config.text.encoder names a converted CLIP text encoder (scripts/convert_clip.py); its tokenizer is
config.text.tokenizer, or the tokenizer/ folder the conversion copied beside the weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from models import pretrained
from models import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A tokenizer and a text transformer: tokenize(prompts) on the host, encode(params, ids) when compiled."""

  tokenizer: Callable[[Sequence[str]], np.ndarray]  # prompts -> int32 ids [B, max_length].
  module: nn.Module  # ids [B, T] -> models.clip.TextEncoderOutput.
  params: Any
  max_length: int
  clip_skip: Optional[int] = None  # Condition on layer num_hidden_layers - clip_skip (models/clip.py).
  description: str = "text encoder"

  @property
  def width(self) -> int:
    """The context's last dimension, which the UNet's cross_attention_dim must equal."""
    return self.module.hidden_size

  def tokenize(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
    """int32 ids [B, max_length]; "" is the unconditional prompt of classifier-free guidance."""
    return np.asarray(self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts)), np.int32)

  def encode(self, params: Any, ids: jax.Array) -> jax.Array:
    """cond["context"] [B, max_length, width] of the ids."""
    return self.module.apply({"params": params}, ids, clip_skip=self.clip_skip).last_hidden_state

  def prompt_cond(self, prompts: Sequence[str], *, negative_prompt: str = "",
                  num: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(cond {"context": [num, L, width]}, image i's of prompts[i % len(prompts)]; null {"context":
    [L, width]}, the negative prompt's: guidance's unconditional half) for generate.Sampler.sample."""
    ids = self.tokenize(list(prompts) + [negative_prompt])
    context = np.asarray(jax.device_get(jax.jit(self.encode)(self.params, ids)))
    return {"context": context[np.arange(num) % len(prompts)]}, {"context": context[-1]}


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """config.text.tokenizer, else the tokenizer/ folder scripts/convert_clip.py copied into the encoder's."""
  if config.text.tokenizer is not None:
    return os.path.expanduser(config.text.tokenizer)
  beside = os.path.join(os.path.expanduser(config.text.encoder), "tokenizer")
  if not os.path.isdir(beside):
    raise FileNotFoundError(f"config.text.tokenizer is None and {beside} does not exist: name the "
                            "checkpoint's tokenizer/ folder with --config.text.tokenizer.")
  return beside


def create_text_encoder(config: ml_collections.ConfigDict) -> Optional[TextEncoder]:
  """The text encoder of config.text, or None for a model without text conditioning."""
  if config.text.encoder is None:
    return None
  try:
    module, params, description = pretrained.load_text_encoder(config.text.encoder)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"config.text.encoder={config.text.encoder!r} is not a converted text encoder: {e}") from e
  tokenizer = tokenizer_lib.load(tokenizer_dir(config), max_length=config.text.max_length)
  if tokenizer.max_length > module.max_position_embeddings:
    raise ValueError(f"config.text.max_length={tokenizer.max_length} exceeds the text encoder's "
                     f"max_position_embeddings={module.max_position_embeddings}.")
  return TextEncoder(tokenizer=tokenizer, module=module, params=jax.device_put(params),
                     max_length=tokenizer.max_length, clip_skip=config.text.clip_skip,
                     description=f"{description.get('source', config.text.encoder)}")
