"""Where x0 comes from and where samples go: pixels as they are, or a frozen autoencoder's latents.

Latent diffusion (Rombach et al. 2022, Sec. 3-4) trains the same diffusion model on z = s E(x) and
samples x = D(z / s). Here that is a pair of functions at the edges: the train step receives
`encode(frozen, images, rng)`, the sampler `decode(frozen, x0)`; everything between them (losses,
samplers, guidance, inpainting) sees arrays of `space.shape` and does not know which space it is in.
The train step encodes with `encode_batch`: the same as `encode`, except that with a latent cache
(config.latent.cache, training/latent_cache.py) a batch holds posterior moments instead of images.
`frozen` is the space's fixed parameters (the autoencoder's; {} for pixels), passed to the compiled
programs as an argument rather than baked into them as constants.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import inpaint
from models import autoencoder as autoencoder_lib
from models import pretrained
from training import config_check

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class PixelSpace:
  """Images in [-1, 1] are the diffusion's x0 (identity encode and decode)."""

  data_shape: tuple[int, int, int]
  params: Any = dataclasses.field(default_factory=dict)
  factor: int = 1
  bounded: bool = True  # x0 lies in [-1, 1], so config.sample.clip_x0 applies.
  description: str = "pixels"

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.data_shape

  def encode(self, frozen: Any, images: Array, rng: Array | None = None) -> Array:
    del frozen, rng
    return images

  def encode_batch(self, frozen: Any, images: Array, rng: Array | None = None) -> Array:
    return self.encode(frozen, images, rng)

  def decode(self, frozen: Any, x0: Array) -> Array:
    del frozen
    return x0


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
  """z = scale_factor * (a sample of q(z | x)) of a frozen KL autoencoder; decode(z) = D(z / scale_factor).

  Training encodes with a posterior sample (rng given; as latent diffusion's get_first_stage_encoding),
  the known region of an inpainting and the masked image of an inpainting model with the mode (rng
  None), which is deterministic. cached: training batches hold the posterior moments [mean, logvar]
  of a latent cache rather than images; encode_batch draws from them without the encoder.
  """

  data_shape: tuple[int, int, int]
  autoencoder: nn.Module
  params: Any
  scale_factor: float
  path: str
  cached: bool = False
  bounded: bool = False  # Latents are not confined to [-1, 1]: x0 is never clipped in latent space.

  @property
  def factor(self) -> int:
    return self.autoencoder.downsampling_factor

  @property
  def shape(self) -> tuple[int, int, int]:
    h, w, _ = self.data_shape
    return (h // self.factor, w // self.factor, self.autoencoder.latent_channels)

  @property
  def description(self) -> str:
    return f"latents of {self.path} (scale factor {self.scale_factor:g})"

  def encode(self, frozen: Any, images: Array, rng: Array | None = None) -> Array:
    ae = self.autoencoder
    posterior = ae.apply({"params": frozen}, images, method=ae.encode)
    return self._draw(posterior, rng).astype(images.dtype)

  def encode_batch(self, frozen: Any, inputs: Array, rng: Array | None = None) -> Array:
    """x0 of a training batch's "image": encoded images, or a draw from its cached moments."""
    if not self.cached:
      return self.encode(frozen, inputs, rng)
    posterior = autoencoder_lib.DiagonalGaussian.from_moments(inputs)
    return self._draw(posterior, rng).astype(inputs.dtype)

  def _draw(self, posterior: autoencoder_lib.DiagonalGaussian, rng: Array | None) -> Array:
    """scale_factor times a sample of the posterior (its mode where rng is None)."""
    return (posterior.mode() if rng is None else posterior.sample(rng)) * self.scale_factor

  def decode(self, frozen: Any, x0: Array) -> Array:
    ae = self.autoencoder
    return ae.apply({"params": frozen}, x0 / self.scale_factor, method=ae.decode)


Space = PixelSpace | LatentSpace


def load_autoencoder(path: str) -> tuple[nn.Module, Any]:
  """The autoencoder of config.latent.autoencoder, or a ValueError naming the key and the path."""
  try:
    module, params, _ = pretrained.load_autoencoder(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"config.latent.autoencoder={path!r} is not an autoencoder: {e}") from e
  return module, params


def create_space(config: ml_collections.ConfigDict, *, channels: int,
                 scale_factor: float | None = None,
                 autoencoder: tuple[nn.Module, Any] | None = None) -> Space:
  """The space of config.latent for images of config.data.image_size with the given channels.

  Pixel space if config.latent.autoencoder is None. scale_factor overrides config.latent.scale_factor
  (e.g. an estimate); with neither, the latent space has scale 1 (for estimate_scale_factor).
  autoencoder: (module, params) already loaded from config.latent.autoencoder.
  """
  size = config.data.image_size
  data_shape = (size, size, channels)
  if config.latent.autoencoder is None:
    return PixelSpace(data_shape=data_shape)
  module, params = autoencoder or load_autoencoder(config.latent.autoencoder)
  config_check.validate_autoencoder(config, latent_channels=module.latent_channels,
                                    factor=module.downsampling_factor, out_channels=module.out_channels,
                                    data_channels=channels)
  scale = scale_factor if scale_factor is not None else config.latent.scale_factor
  return LatentSpace(data_shape=data_shape, autoencoder=module, params=jax.device_put(params),
                     scale_factor=float(scale or 1.0), path=config.latent.autoencoder,
                     cached=config.latent.get("cache") is not None)


def space_for_run(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> Space:
  """The space of a trained run: its saved config and the shape [h, w, c] its model was built for."""
  if config.latent.autoencoder is None:
    return PixelSpace(data_shape=tuple(image_shape))
  if config.latent.scale_factor is None:
    raise ValueError("The run's config has config.latent.scale_factor=None; training saves the "
                     "estimated one with every checkpoint. Pass --config.latent.scale_factor=S.")
  module, params = load_autoencoder(config.latent.autoencoder)
  config_check.validate_autoencoder(config, latent_channels=module.latent_channels,
                                    factor=module.downsampling_factor, out_channels=module.out_channels,
                                    model_channels=image_shape[-1], model_size=image_shape[0])
  return create_space(config, channels=module.out_channels, autoencoder=(module, params))


def estimate_scale_factor(space: LatentSpace, batches) -> float:
  """1 / std of the posterior samples of the given batches (Rombach et al. 2022, Sec. 4.3.2).

  A batch is what the train step encodes: images, or the moments of a latent cache.
  space must have scale_factor 1. Each batch is encoded with its own key, fixed, so the estimate is
  the same on every process and every start.
  """
  encode = jax.jit(space.encode_batch)
  total, total_sq, count = 0.0, 0.0, 0
  for i, images in enumerate(batches):
    z = np.asarray(jax.device_get(encode(space.params, images, jax.random.key(i))), np.float64)
    total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"The latents of config.latent.autoencoder have std {std}; pass "
                     "--config.latent.scale_factor.")
  return 1.0 / std


def saved_scale_factor(workdir: str, autoencoder: str) -> float | None:
  """The scale factor a previous start in workdir used with the same autoencoder (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    latent = json.load(f).get("latent") or {}
  if latent.get("autoencoder") != autoencoder:
    return None
  return latent.get("scale_factor")


def concat_channels(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> int:
  """Extra input channels of an inpainting model (config.diffusion.inpaint_training): mask + masked image.

  image_shape is the diffusion model's [h, w, c]: the masked image adds c channels, the mask one.
  """
  return image_shape[-1] + 1 if config.diffusion.get("inpaint_training", False) else 0


def inpaint_concat(space: Space, frozen: Any, *, images: Array, mask: Array) -> Array:
  """cond["concat"] of an inpainting model: [fill mask on the space's grid, encode(masked image)].

  mask [B, H, W, 1] is 1 where known; as in SD-inpainting the concatenated mask is 1 where to fill
  and the masked image keeps the known pixels, 0 elsewhere (Rombach et al. 2022, Sec. 4.5).
  """
  known = inpaint.reduce_mask(mask, factor=space.factor)
  masked = space.encode(frozen, images * mask, None)
  return jnp.concatenate([1.0 - known, masked], axis=-1).astype(images.dtype)


def make_condition(config: ml_collections.ConfigDict,
                   space: Space) -> Callable[[Any, dict[str, Array], Array], dict[str, Array]]:
  """condition(frozen, batch, rng) -> cond of the train step: labels, a text model's caption tokens
  (training/text.py turns them into cond["context"]), and random masks if inpainting."""
  num_classes = config.model.num_classes
  inpainting = config.diffusion.inpaint_training
  text = config.get("text") is not None and config.text.encoder is not None

  def condition(frozen, batch, rng):
    cond = {"label": batch["label"]} if num_classes else {}
    if text:
      cond["tokens"] = batch["tokens"]
    if inpainting:
      images = batch["image"]
      b, h, w, _ = images.shape
      mask = inpaint.random_masks(rng, batch_size=b, height=h, width=w)
      cond["concat"] = inpaint_concat(space, frozen, images=images, mask=mask)
    return cond

  return condition
