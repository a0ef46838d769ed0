"""Text conditioning: prompts -> token ids (on the host) -> context [B, T, D] (inside the compiled step).

A text-conditional model (models/sd_unet.py) reads cond["context"], the text encoder's last hidden
state (after its final LayerNorm; Stable Diffusion's conditioning, see models/clip.py). Prompts are
tokenised on the host, outside any compiled program, so a new prompt never recompiles; the encoder runs
inside the train step and the sampler on the ids, with its parameters passed as an argument.

config.text.encoder names a converted CLIP text encoder (scripts/convert_clip.py); its tokenizer is
config.text.tokenizer, or the tokenizer/ folder the conversion copied beside the weights. Or it is "new":
a CLIPTextTransformer of config.text.clip, initialised with the model and trained with it, and a
word-level tokenizer of the training captions' words, built at the first start into workdir/tokenizer
(prepare_tokenizer), whose path the run's config then holds.

In training (TextConditioning), cond["tokens"] carries the batch's ids through caption dropout (the
dropped rows get the empty prompt's ids) and becomes cond["context"] just before the model reads it:
with the frozen encoder's parameters (the step's constants), or with the encoder's own part of the
train state when config.text.trainable (optimised and EMA'd with the model's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from models import clip
from models import pretrained
from models import tokenizer as tokenizer_lib

NEW = "new"  # config.text.encoder of a text encoder trained from scratch (config.text.clip).
MODEL, TEXT = "model", "text_encoder"  # The train state's params of a trainable text encoder: {MODEL, TEXT}.


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A tokenizer and a text transformer: tokenize(prompts) on the host, encode(params, ids) when compiled."""

  tokenizer: Callable[[Sequence[str]], np.ndarray]  # prompts -> int32 ids [B, max_length].
  module: nn.Module  # ids [B, T] -> models.clip.TextEncoderOutput.
  params: Any  # None for a "new" encoder, whose parameters are the train state's.
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

  def prompt_cond(self, prompts: Sequence[str], *, negative_prompt: str = "", num: int,
                  params: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(cond {"context": [num, L, width]}, image i's of prompts[i % len(prompts)]; null {"context":
    [L, width]}, the negative prompt's: guidance's unconditional half) for generate.Sampler.sample.

    params: the encoder's (default: its own, a converted encoder's weights).
    """
    ids = self.tokenize(list(prompts) + [negative_prompt])
    context = np.asarray(jax.device_get(jax.jit(self.encode)(self.params if params is None else params, ids)))
    return {"context": context[np.arange(num) % len(prompts)]}, {"context": context[-1]}


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """config.text.tokenizer, else the tokenizer/ folder scripts/convert_clip.py copied into the encoder's."""
  if config.text.tokenizer is not None:
    return os.path.expanduser(config.text.tokenizer)
  if config.text.encoder == NEW:
    raise ValueError("config.text.encoder='new' with config.text.tokenizer=None: training builds the "
                     "word-level tokenizer into workdir/tokenizer and records it (prepare_tokenizer).")
  beside = os.path.join(os.path.expanduser(config.text.encoder), "tokenizer")
  if not os.path.isdir(beside):
    raise FileNotFoundError(f"config.text.tokenizer is None and {beside} does not exist: name the "
                            "checkpoint's tokenizer/ folder with --config.text.tokenizer.")
  return beside


def create_text_encoder(config: ml_collections.ConfigDict) -> Optional[TextEncoder]:
  """The text encoder of config.text, or None for a model without text conditioning."""
  if config.text.encoder is None:
    return None
  if config.text.encoder == NEW:
    tokenizer = tokenizer_lib.load(tokenizer_dir(config), max_length=config.text.max_length)
    return TextEncoder(tokenizer=tokenizer, module=new_module(config.text, eos_token_id=tokenizer.eos_id),
                       params=None, max_length=tokenizer.max_length, clip_skip=config.text.clip_skip,
                       description="a text encoder trained from scratch")
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


def new_module(text_config: ml_collections.ConfigDict, *, eos_token_id: int) -> clip.CLIPTextTransformer:
  """The CLIPTextTransformer of config.text.clip, for prompts of config.text.max_length tokens."""
  c = text_config.clip
  return clip.CLIPTextTransformer(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      max_position_embeddings=text_config.max_length, hidden_act="gelu", eos_token_id=eos_token_id)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config with config.text.tokenizer set: for a "new" encoder without one, workdir/tokenizer.

  At a run's first start that folder is built (tokenizer.build_word_level) from the words of
  config.data.split's captions; later starts, and sampling, read the same one.
  """
  if config.text.encoder != NEW or config.text.tokenizer is not None:
    return config
  import input_pipeline  # pylint: disable=g-import-not-at-top

  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "tokenizer")
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    texts = input_pipeline.read_captions(config.data)
    if jax.process_index() == 0:
      partial = directory + ".tmp"
      if os.path.exists(partial):
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.rmtree(partial)
      tokenizer = tokenizer_lib.build_word_level(texts, vocab_size=config.text.clip.vocab_size,
                                                 directory=partial, max_length=config.text.max_length)
      os.replace(partial, directory)
      logging.info("Word-level tokenizer of %d words written to %s.",
                   tokenizer.backend.get_vocab_size(), directory)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("tokenizer written")
  config = config.copy_and_resolve_references()
  config.text.tokenizer = directory
  return config


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioning:
  """What the train step and the sampler do with text: the encoder, frozen or part of the train state."""

  encoder: TextEncoder
  trainable: bool
  # LoRA on the frozen encoder (config.lora.text_targets, training/lora.py): (encoder params, adapters)
  # -> adapted params; the train state's params are then {MODEL: the model's adapters, TEXT: these}.
  adapt: Optional[Callable[[Any, Any], Any]] = None

  @property
  def frozen_params(self) -> Any:
    """The encoder's parameters as the step's constants: a frozen encoder's, else None."""
    return None if self.trainable else self.encoder.params

  @property
  def empty_ids(self) -> np.ndarray:
    """The empty prompt's ids [max_length]: the null of cond["tokens"] for classifier-free guidance."""
    return self.encoder.tokenize("")[0]

  def state_params(self, rng: jax.Array, model_params: Any) -> Any:
    """The train state's params: the model's, or {MODEL, TEXT} with the encoder's when trainable.

    A "new" encoder starts from module.init(rng); a converted one from its weights.
    """
    if not self.trainable:
      return model_params
    text = self.encoder.params
    if text is None:
      ids = jnp.zeros((1, self.encoder.max_length), jnp.int32)
      text = self.encoder.module.init(rng, ids)["params"]
    return {MODEL: model_params, TEXT: text}

  def split(self, params: Any, frozen: Any) -> tuple[Any, Any]:
    """(the model's params, the encoder's) from the state's params and the frozen ones."""
    if self.adapt is not None:
      return params[MODEL], self.adapt(frozen, params[TEXT])
    return (params[MODEL], params[TEXT]) if self.trainable else (params, frozen)

  def with_context(self, text_params: Any, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """cond with "tokens" [B, T] replaced by "context" [B, T, width] (the encoder's last hidden state)."""
    cond = dict(cond)
    cond["context"] = self.encoder.encode(text_params, cond.pop("tokens"))
    return cond

  def sampling_inputs(self, params: Any, prompts: Sequence[str], *, negative_prompt: str = "",
                      num: Optional[int] = None) -> tuple[Any, dict, dict]:
    """(model params, cond {"context": [num, T, D]}, null {"context": [T, D]}) for Sampler.sample.

    params: the state's (EMA) params, so a trained encoder samples with its own weights; image i has
    prompts[i % len(prompts)] (num defaults to one image per prompt); the null is the negative prompt's
    context (default the empty prompt's), guidance's other half.
    """
    model_params, text_params = self.split(params, self.frozen_params)
    cond, null = self.encoder.prompt_cond(prompts, negative_prompt=negative_prompt,
                                          num=len(prompts) if num is None else num, params=text_params)
    return model_params, cond, null


def create_conditioning(config: ml_collections.ConfigDict,
                        encoder: Optional[TextEncoder] = None) -> Optional[TextConditioning]:
  """The TextConditioning of config.text (its encoder: `encoder` if given, else created), or None
  without a text encoder.

  Checks, before anything compiles, that the UNet's cross_attention_dim is the encoder's width.
  """
  encoder = encoder or create_text_encoder(config)
  if encoder is None:
    return None
  dim = config.model.sd_unet.cross_attention_dim
  if dim != encoder.width:
    key = "config.text.clip.hidden_size" if config.text.encoder == NEW else f"config.text.encoder={config.text.encoder!r}'s width"
    raise ValueError(f"config.model.sd_unet.cross_attention_dim={dim} is not {key}={encoder.width}: "
                     "the UNet's cross-attention reads the text encoder's context.")
  from training import lora  # pylint: disable=g-import-not-at-top  (lora builds on this module)
  adapt = None
  if lora.adapts_text_encoder(config.lora):  # Adapters on the frozen encoder too.
    scale = lora.Settings.from_config(config.lora).scale
    adapt = lambda params, adapters: lora.merge(params, adapters, scale=scale)
  return TextConditioning(encoder=encoder, trainable=bool(config.text.trainable), adapt=adapt)
