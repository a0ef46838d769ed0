"""LPIPS (Zhang et al. 2018) with VGG16 features, layer for layer the `lpips` package's LPIPS(net="vgg").

d(x0, x1) = sum_l mean_hw w_l . (f_l(x0) / ||f_l(x0)|| - f_l(x1) / ||f_l(x1)||)^2 (Eq. 1 of the paper):
f_l are the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, normalised to unit
length over channels, w_l the learned 1x1 "lin" layers; inputs in [-1, 1] are first shifted and scaled
as the package's ScalingLayer. Weights come from scripts/convert_lpips.py (an .npz); they are frozen.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The convolutions of VGG16's five blocks (conv<block>_<i>), torchvision's `vgg16().features`.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# lpips.ScalingLayer: (x - shift) / scale maps [-1, 1] inputs to the ImageNet statistics VGG saw.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def normalize_channels(features: jax.Array, eps: float = 1e-10) -> jax.Array:
  """f / (||f||_2 over channels + eps), the package's normalize_tensor."""
  return features / (jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """(x0, x1) images [B, H, W, C] in [-1, 1] -> distance [B]; one-channel images are repeated to RGB.

  H and W must be at least 16 (VGG16 pools four times before its last block).
  """

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    distance = 0.0
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
      if block > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, width in enumerate(widths, start=1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{block}_{i}")(x))
      f0, f1 = jnp.split(normalize_channels(x), 2, axis=0)
      lin = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{block - 1}")(jnp.square(f0 - f1))
      distance = distance + jnp.mean(lin, axis=(1, 2, 3))
    return distance


def save_params(path: str, params: Any) -> None:
  """Writes a parameter tree as an .npz of 'module/param' arrays (via a temporary file)."""
  flat = {f"{module}/{name}": np.asarray(value, np.float32)
          for module, leaves in params.items() for name, value in leaves.items()}
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **flat)
  os.replace(path + ".tmp", path)


def load_params(path: str) -> dict[str, dict[str, np.ndarray]]:
  """The parameter tree of LPIPS from an .npz written by scripts/convert_lpips.py."""
  path = os.path.expanduser(path)
  expected = jax.eval_shape(LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1, 16, 16, 3)))["params"]
  with np.load(path) as data:
    params = {}
    for module, leaves in expected.items():
      params[module] = {}
      for name, spec in leaves.items():
        key = f"{module}/{name}"
        if key not in data or data[key].shape != spec.shape:
          found = data[key].shape if key in data else "missing"
          raise ValueError(f"{path} is not an LPIPS VGG16 weight file (scripts/convert_lpips.py): {key} "
                           f"should have shape {spec.shape}, found {found}.")
        params[module][name] = data[key]
  return params
