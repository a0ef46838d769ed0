"""The PatchGAN discriminator of Isola et al. 2017 as taming-transformers' NLayerDiscriminator.

Convolutions 4x4 with stride 2 (stride 1 for the last two), LeakyReLU(0.2) and a normalisation after
every convolution but the first and the last; the output is one logit per overlapping patch. Weights
are drawn as the reference's `weights_init`: N(0, 0.02) for convolutions, N(1, 0.02) for norm scales.
The reference normalises with BatchNorm; here GroupNorm stands in, so the discriminator keeps no
running statistics and a step depends on its own batch alone (the same on any number of devices).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_conv_init = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """Image [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1] (h = H / 2^n_layers - 2)."""

  ch: int = 64  # Channels of the first convolution (taming's ndf).
  n_layers: int = 3  # Stride-2 convolutions; each doubles the channels, up to 8 * ch.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1))
    h = nn.Conv(self.ch, (4, 4), strides=(2, 2), padding=pad, kernel_init=_conv_init, name="conv_0")(x)
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.n_layers + 1):
      features = self.ch * min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = nn.Conv(features, (4, 4), strides=(stride, stride), padding=pad, use_bias=False,
                  kernel_init=_conv_init, name=f"conv_{n}")(h)
      h = nn.GroupNorm(num_groups=math.gcd(32, features), scale_init=_scale_init, name=f"norm_{n}")(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), padding=pad, kernel_init=_conv_init, name="conv_out")(h)
