"""The DDPM UNet (Ho et al. 2020, `diffusion_tf/models/unet.py`), with optional ADM conditioning."""

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

Dtype = Any


class UNet(nn.Module):
  """Noise-prediction UNet: NHWC images, float times t [B] (or scalar), conditioning dict cond or None

  cond keys: "label" int [B] (num_classes = the null label, the default), "concat" [B, H, W, K] extra
  input channels (SD-inpainting's mask and masked-image latents) concatenated to x; the output has x's
  channels.
  """

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int = 1
  dropout: float = 0.0
  scale_shift: bool = False
  resamp_with_conv: bool = True
  num_classes: int = 0
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.
  attention: Optional[str] = "xla"  # jax.nn.dot_product_attention implementation: None, "xla", "cudnn".
  remat: bool = False  # Recompute each residual block in the backward pass instead of storing it.

  def _check_inputs(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> None:
    if x.ndim != 4:
      raise ValueError(f"UNet expects NHWC images, got shape {x.shape}.")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"Image size {x.shape[1]}x{x.shape[2]} (config.data.image_size) is not divisible by "
          f"2**(len(config.model.unet.ch_mult) - 1) = {factor} for "
          f"config.model.unet.ch_mult={tuple(self.ch_mult)}.")
    layers.check_time_and_cond(x, t, cond, model=type(self).__name__, num_classes=self.num_classes)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None, *,
               train: bool) -> jax.Array:
    """Returns a tensor shaped like x (e.g. the predicted noise)."""
    t = jnp.asarray(t)
    cond = dict(cond or {})
    self._check_inputs(x, t, cond)
    y = cond.get("label")
    t = jnp.broadcast_to(t, (x.shape[0],))
    num_levels = len(self.ch_mult)
    # nn.remat keeps only each block's inputs for the backward pass; argument 3 (train) is static.
    res_cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat else layers.ResBlock
    res_block = functools.partial(
        res_cls, dropout=self.dropout, scale_shift=self.scale_shift, dtype=self.dtype)
    attn_block = functools.partial(layers.AttnBlock, self.num_heads, dtype=self.dtype,
                                   attention=self.attention)

    # Time (and label) embedding.
    emb = layers.timestep_embedding(t, self.ch)
    emb = nn.Dense(4 * self.ch, kernel_init=layers.default_init(), dtype=self.dtype,
                   name="temb_dense_0")(emb)
    emb = nn.Dense(4 * self.ch, kernel_init=layers.default_init(), dtype=self.dtype,
                   name="temb_dense_1")(nn.silu(emb))
    if self.num_classes > 0:
      if y is None:  # All "null" labels: the unconditional model of classifier-free guidance.
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                           name="label_embed")(y)

    # Down path; every output is kept as a skip for the up path.
    hs = [nn.Conv(self.ch, (3, 3), kernel_init=layers.default_init(), dtype=self.dtype,
                  name="conv_in")(_with_concat(x, cond).astype(self.dtype))]
    for level in range(num_levels):
      for i in range(self.num_res_blocks):
        h = res_block(self.ch * self.ch_mult[level], name=f"down_{level}_res_{i}")(
            hs[-1], emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"down_{level}_attn_{i}")(h)
        hs.append(h)
      if level != num_levels - 1:
        hs.append(layers.Downsample(self.resamp_with_conv, dtype=self.dtype,
                                    name=f"down_{level}_downsample")(hs[-1]))

    # Middle.
    h = hs[-1]
    h = res_block(name="mid_res_0")(h, emb, train)
    h = attn_block(name="mid_attn")(h)
    h = res_block(name="mid_res_1")(h, emb, train)

    # Up path.
    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(self.ch * self.ch_mult[level], name=f"up_{level}_res_{i}")(
            h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = layers.Upsample(self.resamp_with_conv, dtype=self.dtype,
                            name=f"up_{level}_upsample")(h)
    assert not hs, len(hs)

    h = layers.group_norm(h.shape[-1], self.dtype, name="norm_out", silu=True)(h)
    h = nn.Conv(x.shape[-1], (3, 3), kernel_init=layers.default_init(0.0), dtype=self.dtype,
                name="conv_out")(h)
    return h.astype(x.dtype)


def _with_concat(x: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
  """x with cond["concat"] appended along the channels (SD-inpainting's 9-channel input), if given."""
  if "concat" not in cond:
    return x
  return jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)
