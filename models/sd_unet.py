"""Stable Diffusion's conditional UNet (Rombach et al. 2022): ResNet blocks and spatial transformers.

Layer for layer it is diffusers' `UNet2DConditionModel` with SD 1.x / 2.x options
(`diffusers/models/unets/unet_2d_condition.py`, the CrossAttnDownBlock2D / DownBlock2D /
UNetMidBlock2DCrossAttn / UpBlock2D / CrossAttnUpBlock2D blocks of `unet_2d_blocks.py`, Transformer2DModel
and BasicTransformerBlock), and its modules are named as diffusers names them with `.N` written `_N`
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_q`), so that
scripts/convert_diffusers_unet.py maps SD's weights one to one. Latents are NHWC; the text context is
[B, L, cross_attention_dim].
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import dit
from models import layers

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")  # config.model.sd_unet.down_block_types' values.
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")  # config.model.sd_unet.up_block_types' values.
# diffusers' module lists, whose items it names `list.N` and we `list_N`.
_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|"
                    r"upsamplers|to_out|net)_(\d+)$")


def diffusers_name(path: str) -> str:
  """Our path 'down_blocks_0/attentions_1/proj_in' -> diffusers' 'down_blocks.0.attentions.1.proj_in'."""
  return ".".join(_LISTS.sub(r"\1.\2", part) for part in path.split("/"))


RESNET_EPS = 1e-5  # diffusers' norm_eps: the ResNet blocks' and the output GroupNorm's epsilon.


def heads_per_block(attention_head_dim: Union[int, Sequence[int]], num_blocks: int) -> tuple[int, ...]:
  """Attention heads of each down block, from diffusers' `attention_head_dim` (an int or per block).

  diffusers' historical naming: UNet2DConditionModel passes `attention_head_dim` on as the number of
  heads (`num_attention_heads = num_attention_heads or attention_head_dim`), so SD 1.x's 8 means 8
  heads, and SD 2.x's (5, 10, 20, 20) means heads of 64 channels at widths (320, 640, 1280, 1280).
  """
  if isinstance(attention_head_dim, int):
    return (attention_head_dim,) * num_blocks
  heads = tuple(attention_head_dim)
  if len(heads) != num_blocks:
    raise ValueError(f"config.model.sd_unet.attention_head_dim={heads} needs one entry per block of "
                     f"block_out_channels ({num_blocks}).")
  return heads


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D: norm, SiLU, conv, + projected time embedding, norm, SiLU, conv, + shortcut.

  models/layers.ResBlock computes the same function, but its GroupNorm has epsilon 1e-6 and fewer
  groups at narrow widths (SD: 32 groups at every width, epsilon 1e-5), so it is not reused here.
  """

  out_ch: int
  groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    # train is positional so that nn.remat can mark it static.
    norm = lambda name: nn.GroupNorm(self.groups, epsilon=RESNET_EPS, dtype=self.dtype, name=name)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv1")(nn.silu(norm("norm1")(x)))
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(norm("norm2")(h)))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention of x [B, T, C] to context [B, S, D] (x itself if None), as diffusers' Attention."""

  heads: int
  upcast: bool = False  # Scores in float32 for 16-bit compute dtypes (diffusers' upcast_attention).
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention's implementation.

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    b, t, c = x.shape
    context = x if context is None else context
    q, k, v = (nn.Dense(c, use_bias=False, dtype=self.dtype, name=name)(source)
               for name, source in (("to_q", x), ("to_k", context), ("to_v", context)))
    q, k, v = (a.reshape(a.shape[0], a.shape[1], self.heads, c // self.heads) for a in (q, k, v))
    # jax's XLA implementation already forms the logits of 16-bit inputs in float32, and cuDNN's fused
    # kernels keep scores and softmax in float32 (and take only 16-bit inputs); upcasting makes sure of
    # it for any other implementation jax may pick.
    if self.upcast and self.attention != "cudnn":
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    # [B, T, N, H], scaled by 1/sqrt(H).
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention).astype(self.dtype)
    return nn.Dense(c, dtype=self.dtype, name="to_out_0")(h.reshape(b, t, c))


class GEGLU(nn.Module):
  """Shazeer 2020's GEGLU: a Dense to 2 * features, split into h and gate, h * GELU(gate) (exact GELU)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers' FeedForward with activation_fn="geglu": GEGLU to 4 C, then a Dense back to C."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(4 * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention to the context and GEGLU feed-forward, each residual."""

  heads: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.heads, self.upcast, self.dtype, self.attention, name=name)
    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel (one block): GroupNorm, proj_in, the block on H * W tokens, proj_out, +x.

  The projections are 1x1 convolutions (SD 1.x) or Dense layers on the tokens (SD 2.x,
  use_linear_projection): the same function, stored with different shapes.
  """

  heads: int
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    if c % self.heads:
      raise ValueError(f"config.model.sd_unet.attention_head_dim: {self.heads} heads do not divide the "
                       f"{c} channels of a transformer block.")
    proj = ((lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.use_linear_projection
            else (lambda name: nn.Conv(c, (1, 1), dtype=self.dtype, name=name)))
    h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    h = proj("proj_in")(h).reshape(b, height * width, c)
    h = BasicTransformerBlock(self.heads, self.upcast, self.dtype, self.attention,
                              name="transformer_blocks_0")(h, context)
    return x + proj("proj_out")(h.reshape(b, height, width, c))


class Downsample2D(nn.Module):
  """3x3 convolution with stride 2 and one pixel of padding on every side (diffusers' Downsample2D).

  models/layers.Downsample pads only right and bottom ('SAME'), which shifts the sampling grid.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   name="conv")(x)


class _Blocks(nn.Module):
  """The settings every block of the UNet shares, and its ResNet and transformer layers."""

  groups: int = 32
  dropout: float = 0.0
  use_linear_projection: bool = False
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"
  remat: bool = False

  def resnet(self, out_ch: int, name: str) -> nn.Module:
    cls = nn.remat(ResnetBlock2D, static_argnums=(3,)) if self.remat else ResnetBlock2D
    return cls(out_ch, self.groups, self.dropout, self.dtype, name=name)

  def transformer(self, heads: int, name: str) -> nn.Module:
    cls = nn.remat(Transformer2D) if self.remat else Transformer2D
    return cls(heads, self.groups, self.use_linear_projection, self.upcast, self.dtype, self.attention,
               name=name)


class DownBlock(_Blocks):
  """CrossAttnDownBlock2D (heads > 0) or DownBlock2D (heads 0); returns h and the skips it leaves."""

  width: int = 0
  num_layers: int = 1
  heads: int = 0
  add_downsample: bool = True

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array,
               train: bool) -> tuple[jax.Array, list[jax.Array]]:
    skips = []
    for j in range(self.num_layers):
      h = self.resnet(self.width, f"resnets_{j}")(h, temb, train)
      if self.heads:
        h = self.transformer(self.heads, f"attentions_{j}")(h, context)
      skips.append(h)
    if self.add_downsample:
      h = Downsample2D(self.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class MidBlock(_Blocks):
  """UNetMidBlock2DCrossAttn: ResNet, transformer, ResNet."""

  heads: int = 1

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array, train: bool) -> jax.Array:
    h = self.resnet(h.shape[-1], "resnets_0")(h, temb, train)
    h = self.transformer(self.heads, "attentions_0")(h, context)
    return self.resnet(h.shape[-1], "resnets_1")(h, temb, train)


class UpBlock(_Blocks):
  """CrossAttnUpBlock2D (heads > 0) or UpBlock2D (heads 0); layer j joins skips[-1 - j] to its input."""

  width: int = 0
  num_layers: int = 1
  heads: int = 0
  add_upsample: bool = True

  @nn.compact
  def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
               train: bool) -> jax.Array:
    skips = list(skips)
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self.resnet(self.width, f"resnets_{j}")(h, temb, train)
      if self.heads:
        h = self.transformer(self.heads, f"attentions_{j}")(h, context)
    if self.add_upsample:  # Nearest-neighbour x2, then a 3x3 convolution: layers.Upsample is Upsample2D.
      h = layers.Upsample(True, self.dtype, name="upsamplers_0")(h)
    return h


class SDUNet(nn.Module):
  """eps (or v) prediction for latents x [B, H, W, C] at model times t [B] (SD: 0..999), given cond.

  cond["context"] [B, L, cross_attention_dim] is required; cond["concat"] [B, H, W, C'] is joined to x
  along channels when given (SD-inpainting: in_channels = 4 + 5); cond["label"] [B] with num_classes > 0.
  """

  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  attention_head_dim: Union[int, Sequence[int]] = 8  # diffusers' name; the heads per block (see above).
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  in_channels: int = 4
  out_channels: int = 4
  norm_num_groups: int = 32
  dropout: float = 0.0
  num_classes: int = 0  # > 0: a label embedding added to the time embedding; label num_classes is "null".
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention implementation: None, "xla", "cudnn".
  remat: bool = False  # Recompute each ResNet and transformer block in the backward pass.

  def _inputs(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]]):
    """(x joined with cond["concat"], t [B], context, label), each checked against the config."""
    if cond is not None and not isinstance(cond, Mapping):
      raise TypeError("SDUNet takes cond as a dict {'context': [B, L, D], ...}, got "
                      f"{type(cond).__name__}.")
    cond = dict(cond or {})
    if "concat" in cond:
      x = jnp.concatenate([x, jnp.asarray(cond["concat"], x.dtype)], axis=-1)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"SDUNet expects NHWC latents with config.model.sd_unet.in_channels="
                       f"{self.in_channels} channels (with cond['concat'] if any), got {x.shape}.")
    factor = 2 ** (len(self.block_out_channels) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"Latent size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, the "
                       f"downsampling of config.model.sd_unet.block_out_channels="
                       f"{tuple(self.block_out_channels)}.")
    t = jnp.asarray(t)
    if t.shape not in ((), (x.shape[0],)):
      raise ValueError(f"t must be a scalar or have shape [B]=({x.shape[0]},), got {t.shape}.")
    context = cond.get("context")
    if context is None:
      raise ValueError("SDUNet needs cond['context'], the text embeddings [B, L, "
                       f"config.model.sd_unet.cross_attention_dim={self.cross_attention_dim}].")
    if context.ndim != 3 or context.shape[-1] != self.cross_attention_dim:
      raise ValueError(f"cond['context'] has shape {context.shape}; expected [B, L, "
                       f"config.model.sd_unet.cross_attention_dim={self.cross_attention_dim}].")
    label = cond.get("label")
    if label is not None and self.num_classes == 0:
      raise ValueError("cond['label'] was given but config.model.num_classes=0 (no label embedding).")
    return x, jnp.broadcast_to(t, (x.shape[0],)), context, label

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None, *,
               train: bool = False) -> jax.Array:
    """Returns a tensor [B, H, W, out_channels] (the prediction), in x's dtype."""
    out_dtype = x.dtype
    x, t, context, label = self._inputs(x, t, cond)
    levels = len(self.block_out_channels)
    for key, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                ("up_block_types", self.up_block_types, UP_BLOCKS)):
      if len(types) != levels or any(b not in allowed for b in types):
        raise ValueError(f"config.model.sd_unet.{key}={tuple(types)} must have one entry per block of "
                         f"block_out_channels ({levels}), each one of {', '.join(allowed)}.")
    heads = heads_per_block(self.attention_head_dim, levels)
    context = context.astype(self.dtype)
    common = dict(groups=self.norm_num_groups, dropout=self.dropout,
                  use_linear_projection=self.use_linear_projection, upcast=self.upcast_attention,
                  dtype=self.dtype, attention=self.attention, remat=self.remat)

    # Time embedding: SD's sinusoids (flip_sin_to_cos=True, freq_shift=0) are DiT's, cos half first.
    c0 = self.block_out_channels[0]
    temb = dit.timestep_embedding(t, c0).astype(self.dtype)
    temb = _TimestepEmbedding(4 * c0, self.dtype, name="time_embedding")(temb)
    if self.num_classes > 0:
      if label is None:  # All "null" labels: the unconditional model of classifier-free guidance.
        label = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * c0, dtype=self.dtype, name="label_embed")(label)

    # Down path; every output is kept as a skip for the up path.
    h = nn.Conv(c0, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for i, width in enumerate(self.block_out_channels):
      cross = self.down_block_types[i] == "CrossAttnDownBlock2D"
      h, outputs = DownBlock(width=width, num_layers=self.layers_per_block, heads=heads[i] if cross else 0,
                             add_downsample=i != levels - 1, **common, name=f"down_blocks_{i}")(
                                 h, temb, context, train)
      skips += outputs
    h = MidBlock(heads=heads[-1], **common, name="mid_block")(h, temb, context, train)
    # Up path, counted from the lowest resolution as diffusers counts it.
    for i, level in enumerate(reversed(range(levels))):
      cross = self.up_block_types[i] == "CrossAttnUpBlock2D"
      taken, skips = skips[-(self.layers_per_block + 1):], skips[:-(self.layers_per_block + 1)]
      h = UpBlock(width=self.block_out_channels[level], num_layers=self.layers_per_block + 1,
                  heads=heads[level] if cross else 0, add_upsample=level != 0, **common,
                  name=f"up_blocks_{i}")(h, taken, temb, context, train)
    assert not skips, len(skips)

    h = nn.GroupNorm(self.norm_num_groups, epsilon=RESNET_EPS, dtype=self.dtype, name="conv_norm_out")(h)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_out")(nn.silu(h))
    return h.astype(out_dtype)


class _TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: Dense, SiLU, Dense."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h)
