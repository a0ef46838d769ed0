"""UNet building blocks (Ho et al. 2020): time embedding, residual, attention, resampling."""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's initialiser: variance scaling, fan_avg, uniform (`diffusion_tf/nn.py`)."""
  # DDPM stands in 1e-10 for a zero scale; exact zeros are equivalent and clearer.
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def fused_init(parts: int, scale: float = 1.0) -> nn.initializers.Initializer:
  """default_init for a Dense that fuses `parts` equal layers along its output: each C_in x C_out block

  is drawn as its own layer (DDPM's q, k, v are three C x C layers), not with the fan of the fused one.
  """
  def init(key, shape, dtype=jnp.float32):
    if shape[-1] % parts:
      raise ValueError(f"fused_init: {shape[-1]} outputs do not split into {parts} equal layers.")
    block = shape[:-1] + (shape[-1] // parts,)
    return jnp.concatenate([default_init(scale)(k, block, dtype) for k in jax.random.split(key, parts)],
                           axis=-1)
  return init


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups: 32 for DDPM widths (>= 64 channels), else most with >= 2 channels each."""
  # One channel per group would cancel the embedding that DDPM adds per channel before the norm,
  # making narrow models blind to t and y.
  upper = max(min(max_groups, channels // 2), 1)
  return next(g for g in range(upper, 0, -1) if channels % g == 0)


def _group_sums(a: jax.Array, *, groups: int) -> jax.Array:
  """[B, C] -> the sum over each channel's group, broadcast back to [B, C]."""
  b, c = a.shape
  sums = jnp.sum(a.reshape(b, groups, c // groups), axis=-1, keepdims=True)
  return jnp.broadcast_to(sums, (b, groups, c // groups)).reshape(b, c)


def _group_stats(x: jax.Array, *, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each group's shift, mean of x - shift and variance, [B, C] each (per channel), from one pass over x.

  The shift is the group's first value, so that E[d^2] - E[d]^2 of d = x - shift does not cancel under a
  large common offset of x (shifted data; Chan, Golub & LeVeque 1983).
  """
  b, c = x.shape[0], x.shape[-1]
  first = jax.lax.stop_gradient(x.reshape(b, -1, groups, c // groups)[:, 0, :, :1])
  shift = jnp.broadcast_to(first, (b, groups, c // groups)).reshape(b, c)
  d = x.reshape(b, -1, c) - shift[:, None, :]
  n = d.shape[1] * (c // groups)  # Elements per group.
  mean = _group_sums(jnp.sum(d, axis=1), groups=groups) / n
  var = jnp.maximum(_group_sums(jnp.sum(d * d, axis=1), groups=groups) / n - jnp.square(mean), 0.0)
  return shift, mean, var


def _spatial(a: jax.Array, ndim: int) -> jax.Array:
  """[B, C] -> [B, 1, ..., 1, C] against an x of ndim dimensions."""
  return a.reshape(a.shape[0], *([1] * (ndim - 2)), a.shape[-1])


def group_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
                   silu: bool) -> jax.Array:
  """GroupNorm (Wu & He 2018, Eq. 1-3) over channels-last x, in float32, optionally followed by SiLU.

  One pass over x gives the statistics, one elementwise pass x * a + b (then SiLU) the output.
  Differentiated by JAX in both modes: the likelihood's probability-flow ODE takes forward-mode
  derivatives (jvp) of the network, which a custom VJP would refuse.
  """
  x32 = x.astype(jnp.float32)
  shift, mean, var = _group_stats(x32, groups=groups)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = _normalize(x32, shift, mean, rstd * scale.astype(jnp.float32), bias.astype(jnp.float32))
  return (y * jax.nn.sigmoid(y) if silu else y).astype(x.dtype)


def _normalize(x32, shift, mean, a, bias):
  """(x - shift - mean) a + bias: x - shift is exact for x near its group's first value."""
  return ((x32 - _spatial(shift, x32.ndim)) - _spatial(mean, x32.ndim)) * _spatial(a, x32.ndim) + bias


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters ("scale", "bias") and function, on group_norm_act: SiLU fused if silu."""

  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels.")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm_act(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon, self.silu)


def group_norm(channels: int, dtype: Dtype, name: Optional[str] = None, *,
               silu: bool = False) -> GroupNorm:
  """The UNet's GroupNorm (DDPM: epsilon 1e-6), SiLU fused when silu."""
  return GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype, silu=silu, name=name)


def dropout(rng: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout whose keep decisions use 16 random bits each (two per 32-bit word).

  The keep probability is round((1 - rate) * 2^16) / 2^16, within 8e-6 of 1 - rate, and kept values are
  divided by exactly that, so E[dropout(x)] = x. Drawing 32 bits per element, as
  jax.random.bernoulli does, made dropout's random bits about a tenth of the cifar10 UNet's CPU train
  step; half as many words halves that (bench/dropout.py).
  """
  if rate <= 0.0:
    return x
  keep = round((1.0 - rate) * 65536)
  if keep <= 0:
    return jnp.zeros_like(x)
  words = jax.random.bits(rng, (-(-x.size // 2),), jnp.uint32)
  bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size].reshape(x.shape)
  scale = jnp.asarray(65536.0 / keep, x.dtype)
  return jnp.where(bits < keep, x * scale, jnp.zeros((), x.dtype)) if keep < 65536 else x


class Dropout(nn.Module):
  """nn.Dropout's interface (rate, the "dropout" rng stream) on layers.dropout's cheaper random bits."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(self.make_rng("dropout"), x, self.rate)


def check_time_and_cond(x: jax.Array, t: jax.Array, cond, *, model: str, num_classes: int) -> None:
  """The time and conditioning checks the pixel backbones share: t scalar or [B]; cond's keys "label"
  (only for a class-conditional model) and "concat" (x's batch and spatial shape)."""
  if t.shape not in ((), (x.shape[0],)):
    raise ValueError(f"t must be a scalar or have shape [B]=({x.shape[0]},), got {t.shape}.")
  unknown = sorted(set(cond) - {"label", "concat"})
  if unknown:
    raise ValueError(f"Unknown conditioning keys {unknown}; {model} reads 'label' and 'concat'.")
  if "label" in cond and num_classes == 0:
    raise ValueError("Labels were given but config.model.num_classes=0 (unconditional model).")
  if "concat" in cond and cond["concat"].shape[:3] != x.shape[:3]:
    raise ValueError(f"cond['concat'] of shape {cond['concat'].shape} does not match x {x.shape}.")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] of (float) times t [B]: sin half then cos half (DDPM)."""
  half = dim // 2
  # DDPM divides by half - 1 (diffusers' downscale_freq_shift=1); ADM divides by half.
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """Residual block conditioned on an embedding: added (DDPM) or as scale and shift (ADM FiLM)."""

  out_ch: Optional[int] = None
  dropout: float = 0.0
  scale_shift: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    # train is positional so that nn.remat can mark it static (UNet.remat).
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = group_norm(in_ch, self.dtype, name="norm_0", silu=True)(x)
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init(), dtype=self.dtype, name="conv_0")(h)

    emb_out = nn.Dense(
        2 * out_ch if self.scale_shift else out_ch,
        kernel_init=default_init(), dtype=self.dtype, name="emb_proj")(nn.silu(emb))
    emb_out = emb_out[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = nn.silu(group_norm(out_ch, self.dtype, name="norm_1")(h) * (1 + scale) + shift)
    else:
      h = group_norm(out_ch, self.dtype, name="norm_1", silu=True)(h + emb_out)
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init(0.0), dtype=self.dtype, name="conv_1")(h)

    if in_ch != out_ch:
      x = nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual connection."""

  num_heads: int = 1
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention's implementation.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(
          f"config.model.unet.num_heads={self.num_heads} does not divide the {c} channels of an "
          "attention block; pick num_heads dividing ch * ch_mult[i] at every attention level.")
    head_dim = c // self.num_heads
    h = group_norm(c, self.dtype, name="norm")(x)
    qkv = nn.Dense(3 * c, kernel_init=fused_init(3), dtype=self.dtype, name="qkv")(h)
    q, k, v = jnp.split(qkv.reshape(b, height * width, 3 * self.num_heads, head_dim), 3, axis=2)
    # [B, T, N, H], scaled by 1/sqrt(H).
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention)
    h = h.reshape(b, height, width, c)
    h = nn.Dense(c, kernel_init=default_init(0.0), dtype=self.dtype, name="proj_out")(h)
    return x + h


class Downsample(nn.Module):
  """Halves H and W: 3x3 convolution with stride 2, or 2x2 average pooling."""

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), kernel_init=default_init(),
                     dtype=self.dtype, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 convolution."""

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = nn.Conv(x.shape[-1], (3, 3), kernel_init=default_init(), dtype=self.dtype, name="conv")(x)
    return x
