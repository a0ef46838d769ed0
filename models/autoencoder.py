"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's AutoencoderKL).

A ResNet encoder (GroupNorm, SiLU, stride-2 downsampling, self-attention in the middle) maps an image
to the mean and log-variance of a diagonal Gaussian over latents downsampled 2^(len(ch_mult) - 1)
times; a mirrored decoder maps latents back to pixels. Layer for layer it is diffusers' AutoencoderKL
(Encoder, Decoder, DiagonalGaussianDistribution in `diffusers/models/autoencoders/vae.py`), so Stable
Diffusion's weights convert exactly (scripts/convert_diffusers_vae.py). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """q(z | x) = N(mean, exp(logvar)) per latent element (Kingma & Welling 2014; Rombach et al. 2022, Sec. 3)."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits [..., 2 * C] moments into mean and log-variance, the latter clipped to [-30, 20] as SD."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """z = mean + std * e, e ~ N(0, I) (the reparameterisation trick)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example, summed over the latent elements: 0.5 sum(mean^2 + var - 1 - logvar)."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, **kwargs) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), dtype=dtype, name=name, **kwargs)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding: norm, SiLU, conv, norm, SiLU, conv, + shortcut."""

  out_ch: int
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_ch, 3, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_ch, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """One-head self-attention over the H * W positions after a GroupNorm, with a residual connection."""

  groups: int = 32
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention's implementation.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, height * width, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(h) for name in ("to_q", "to_k", "to_v"))
    # SD upcasts the softmax to float32; dot_product_attention's softmax is float32 for 16-bit inputs.
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention).reshape(b, height, width, c)
    return x + nn.Dense(c, dtype=self.dtype, name="to_out")(h)


class _Middle(nn.Module):
  """ResNet block, attention (unless disabled), ResNet block: the middle of encoder and decoder."""

  groups: int
  attention_block: bool
  dtype: Dtype
  attention: Optional[str]

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = h.shape[-1]
    h = ResnetBlock(c, self.groups, self.dtype, name="res_0")(h)
    if self.attention_block:
      h = AttentionBlock(self.groups, self.dtype, self.attention, name="attn")(h)
    return ResnetBlock(c, self.groups, self.dtype, name="res_1")(h)


class Encoder(nn.Module):
  """Image [B, H, W, C] -> moments [B, H / f, W / f, 2 * latent_channels], f = 2^(len(ch_mult) - 1)."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  latent_channels: int
  groups: int = 32
  mid_attention: bool = True
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.ch * self.ch_mult[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.groups, self.dtype, name=f"down_{level}_res_{i}")(h)
      if level != len(self.ch_mult) - 1:
        # SD pads right and bottom by one, then a 3x3 stride-2 convolution without padding.
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = _conv(h.shape[-1], 3, self.dtype, f"down_{level}_downsample", strides=(2, 2),
                  padding="VALID")(h)
    h = _Middle(self.groups, self.mid_attention, self.dtype, self.attention, name="mid")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm_out")(h))
    return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> image [B, h f, w f, out_channels]."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  groups: int = 32
  mid_attention: bool = True
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    h = _Middle(self.groups, self.mid_attention, self.dtype, self.attention, name="mid")(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):  # One block more than the encoder, as SD's decoder.
        h = ResnetBlock(self.ch * self.ch_mult[level], self.groups, self.dtype,
                        name=f"up_{level}_res_{i}")(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # Nearest-neighbour, then a 3x3 convolution.
        h = _conv(h.shape[-1], 3, self.dtype, f"up_{level}_upsample")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm_out")(h))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """encode(x) -> DiagonalGaussian over latents; decode(z) -> image. __call__ reconstructs x."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  latent_channels: int = 4
  out_channels: int = 3
  groups: int = 32  # GroupNorm groups; they must divide ch * every multiplier.
  mid_attention: bool = True
  use_quant_conv: bool = True  # 1x1 convolutions between the moments and the latents, as SD 1.x-XL.
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.
  attention: Optional[str] = "xla"

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  groups=self.groups, mid_attention=self.mid_attention, dtype=self.dtype,
                  attention=self.attention)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    if self.use_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> tuple[jax.Array, DiagonalGaussian]:
    """(reconstruction, posterior): decodes a posterior sample (rng) or its mode (rng None)."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior
