"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion.

Token and learned position embeddings, pre-LayerNorm blocks of causal self-attention and an MLP, and a
final LayerNorm. Layer for layer it is transformers' CLIPTextModel (`models/clip/modeling_clip.py`), so
SD 1.x's CLIP ViT-L/14 (quick-GELU) and SD 2.x's OpenCLIP ViT-H (GELU) convert exactly
(scripts/convert_clip.py). Stable Diffusion conditions on `last_hidden_state`, the last layer's output
after the final LayerNorm; SD 2.x's "penultimate layer" is already cut from its diffusers-format
encoder (23 of ViT-H's 24 layers), so nothing more is skipped unless `clip_skip` says so.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), the GELU approximation of the original CLIP (Hendrycks & Gimpel 2016, Sec. 2)."""
  return x * jax.nn.sigmoid(1.702 * x)


# config.json's hidden_act -> the MLP's activation; "gelu" is the exact (erf) GELU, as in torch.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}


class TextEncoderOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, T, width]: the conditioning of Stable Diffusion.
  pooled: jax.Array  # [B, width]: the final LayerNorm's output at each sequence's end token.


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention in which position i attends to positions <= i."""

  num_heads: int
  dtype: Dtype = jnp.float32
  attention: Optional[str] = None  # jax.nn.dot_product_attention's implementation.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, width = x.shape
    head_dim = width // self.num_heads
    q, k, v = (nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(b, t, self.num_heads, head_dim)
               for name in ("q_proj", "k_proj", "v_proj"))
    h = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(h.reshape(b, t, width))


class EncoderLayer(nn.Module):
  """x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))): a pre-LayerNorm transformer block."""

  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    x = x + CausalSelfAttention(self.num_heads, self.dtype, self.attention, name="self_attn")(
        norm(name="layer_norm1")(x))
    h = norm(name="layer_norm2")(x)
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(h)
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](h))
    return x + h


class CLIPTextTransformer(nn.Module):
  """ids [B, T] (T <= max_position_embeddings) -> TextEncoderOutput; the defaults are SD 1.x's CLIP ViT-L/14."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # quick_gelu (CLIP ViT-L/14, SD 1.x) or gelu (OpenCLIP ViT-H, SD 2.x).
  layer_norm_eps: float = 1e-5
  # The pooled state is at the first eos_token_id; at the largest id when it is 2 (transformers' rule
  # for configs written before the end token's id was recorded, which SD's are).
  eos_token_id: int = 2
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.
  attention: Optional[str] = None  # jax.nn.dot_product_attention's implementation.

  def setup(self) -> None:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} does not divide "
                       f"hidden_size={self.hidden_size}.")
    self.token_embedding = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype)
    self.position_embedding = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype)
    self.layers = [EncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                                self.layer_norm_eps, self.dtype, self.attention, name=f"layers_{i}")
                   for i in range(self.num_hidden_layers)]
    self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)

  def __call__(self, input_ids: jax.Array, *, clip_skip: Optional[int] = None) -> TextEncoderOutput:
    """clip_skip=k conditions on the output of layer num_hidden_layers - k, through the final LayerNorm.

    This is diffusers' `encode_prompt(clip_skip=k)`: `final_layer_norm(hidden_states[-(k + 1)])`. The
    pooled output is always the full model's, as transformers' `pooler_output`.
    """
    t = input_ids.shape[-1]
    if t > self.max_position_embeddings:
      raise ValueError(f"{t} tokens do not fit max_position_embeddings={self.max_position_embeddings}; "
                       "tokenize with max_length at most that.")
    skip = clip_skip or 0
    if not 0 <= skip < self.num_hidden_layers:
      raise ValueError(f"clip_skip={clip_skip} is not in [0, num_hidden_layers={self.num_hidden_layers}).")
    x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))
    states = [x]
    for layer in self.layers:
      states.append(layer(states[-1]))
    last = self.final_layer_norm(states[-1])
    if self.eos_token_id == 2:
      end = jnp.argmax(input_ids, axis=-1)
    else:
      end = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, end[:, None, None], axis=1)[:, 0]
    if skip:
      last = self.final_layer_norm(states[-1 - skip])
    return TextEncoderOutput(last_hidden_state=last, pooled=pooled)
