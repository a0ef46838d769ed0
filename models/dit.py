"""DiT: the diffusion transformer of Peebles & Xie 2023 (`facebookresearch/DiT`, models.py).

Patchify (a p x p convolution with stride p) plus fixed 2-D sin-cos position embeddings; `depth` blocks
of self-attention and an MLP, each conditioned on c = embed(t) + embed(y) by adaLN-Zero (a zero-init
regression of shift, scale and gate from c, so every block starts as the identity); a final adaLN
layer and a zero-init linear map back to patches. Initialised as the reference: xavier-uniform linear
layers, N(0, 0.02) time-MLP and label weights, zero adaLN and output layers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers

Dtype = Any

# Peebles & Xie 2023, Table 1: (hidden size, depth, heads) of DiT-S, -B, -L and -XL.
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """DiT's sinusoidal embedding [B, dim] of float times t [B]: cos half then sin half, freqs / half."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed [grid_h * grid_w, dim] position embeddings (MAE's get_2d_sincos_pos_embed, as DiT uses)."""
  if dim % 4:
    raise ValueError(f"config.model.dit.hidden_size={dim} must be divisible by 4 (2-D sin-cos embeddings).")

  def one_axis(positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  # The reference builds the grid with w first (np.meshgrid(grid_w, grid_h)): half from w, half from h.
  ws, hs = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
  return np.concatenate([one_axis(ws), one_axis(hs)], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """Peebles & Xie 2023, Sec. 3.2 (adaLN): x (1 + scale) + shift, per example over the tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    b, n, dim = x.shape
    dense = lambda features, name, init=_xavier: nn.Dense(features, kernel_init=init, dtype=self.dtype,
                                                          name=name)
    mod = dense(6 * dim, "adaLN_modulation", _zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = modulate(_layer_norm("norm1", self.dtype)(x), shift_msa, scale_msa)
    qkv = dense(3 * dim, "qkv")(h).reshape(b, n, 3, self.num_heads, dim // self.num_heads)
    h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                     implementation=self.attention)
    h = dense(dim, "proj")(h.reshape(b, n, dim))
    x = x + gate_msa[:, None, :] * h

    h = modulate(_layer_norm("norm2", self.dtype)(x), shift_mlp, scale_mlp)
    h = dense(int(dim * self.mlp_ratio), "fc1")(h)
    h = dense(dim, "fc2")(nn.gelu(h, approximate=True))
    return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
  """Diffusion transformer: NHWC images, float times t [B] (or scalar), conditioning dict cond or None

  cond keys: "label" int [B] (num_classes = the null label, the default), "concat" [B, H, W, K] extra
  input channels (SD-inpainting's mask and masked-image latents) concatenated to x; the output has x's
  channels, twice as many with learn_sigma (the prediction, then the variance values v of
  diffusion/learned_variance.py).
  """

  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 0  # Class-conditional if > 0; label num_classes is the "null" class.
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention implementation: None, "xla", "cudnn".
  remat: bool = False  # Recompute each block in the backward pass instead of storing its activations.
  learn_sigma: bool = False  # Also output the variance values v (Nichol & Dhariwal 2021, as DiT does).

  def _check_inputs(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> None:
    if x.ndim != 4:
      raise ValueError(f"DiT expects NHWC images, got shape {x.shape}.")
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(f"Image size {x.shape[1]}x{x.shape[2]} (config.data.image_size) is not divisible "
                       f"by config.model.dit.patch_size={self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"config.model.dit.num_heads={self.num_heads} does not divide the hidden size "
                       f"{self.hidden_size}.")
    layers.check_time_and_cond(x, t, cond, model=type(self).__name__, num_classes=self.num_classes)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None, *,
               train: bool) -> jax.Array:
    """The prediction of the configured parameterisation, shaped like x; with learn_sigma, then v."""
    del train  # DiT has no dropout.
    t = jnp.asarray(t)
    cond = dict(cond or {})
    self._check_inputs(x, t, cond)
    y = cond.get("label")
    b, height, width, channels = x.shape
    p, dim = self.patch_size, self.hidden_size
    gh, gw = height // p, width // p

    # Patchify: xavier-uniform over the flattened p * p * C -> dim map, as the reference.
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                  out_axis=3)
    h = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init, dtype=self.dtype,
                name="x_embedder")(_with_concat(x, cond).astype(self.dtype))
    h = h.reshape(b, gh * gw, dim) + jnp.asarray(sincos_pos_embed_2d(dim, gh, gw), self.dtype)

    normal = nn.initializers.normal(0.02)
    c = timestep_embedding(jnp.broadcast_to(t, (b,)), 256)
    c = nn.Dense(dim, kernel_init=normal, dtype=self.dtype, name="t_embedder_0")(c)
    c = nn.Dense(dim, kernel_init=normal, dtype=self.dtype, name="t_embedder_1")(nn.silu(c))
    if self.num_classes > 0:
      if y is None:  # All "null" labels: the unconditional model of classifier-free guidance.
        y = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, dim, embedding_init=normal, dtype=self.dtype,
                       name="y_embedder")(y)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(self.num_heads, self.mlp_ratio, dtype=self.dtype, attention=self.attention,
                    name=f"blocks_{i}")(h, c)

    shift, scale = jnp.split(nn.Dense(2 * dim, kernel_init=_zeros, dtype=self.dtype,
                                      name="final_adaLN_modulation")(nn.silu(c)), 2, axis=-1)
    h = modulate(_layer_norm("final_norm", self.dtype)(h), shift, scale)
    out_channels = 2 * channels if self.learn_sigma else channels
    h = nn.Dense(p * p * out_channels, kernel_init=_zeros, dtype=self.dtype, name="final_linear")(h)
    # Unpatchify: [B, gh * gw, p * p * C'] -> [B, gh * p, gw * p, C'].
    h = h.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out_channels).astype(x.dtype)


def _with_concat(x: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
  """x with cond["concat"] appended along the channels (SD-inpainting's 9-channel input), if given."""
  if "concat" not in cond:
    return x
  return jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)
