"""Drawing images from a trained model: one compiled sampling program, sharded over all devices.

Used by the training loop's sample grids and by --mode=sample, so both draw the same images for the
same seed, whatever the number of devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import grids
from diffusion import guidance
from diffusion import samplers
from diffusion import schedules
from training import writers


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """The part of config.sample (and the model's training choices) a sampling run needs."""

  sampler: str = "ddim"
  steps: int = 100
  grid: str | None = None
  timesteps: tuple[float, ...] | None = None  # From config.sample.grid_file; replaces grid.
  eta: float = 0.0
  ddpm_variance: str = "small"
  s_churn: float = 0.0
  guidance_scale: float = 1.0
  guidance_rescale: float = 0.0
  dynamic_threshold: float | None = None
  clip_x0: bool = True
  batch_size: int = 64
  prediction: str = "eps"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SampleOptions":
    s = config.sample
    timesteps = None
    if s.get("grid_file") is not None:
      timesteps = grids.read_grid_file(s.grid_file, steps=s.steps)
    return cls(sampler=s.sampler, steps=s.steps, grid=s.grid, timesteps=timesteps, eta=s.eta, ddpm_variance=s.ddpm_variance,
               s_churn=s.s_churn, guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
               dynamic_threshold=s.dynamic_threshold, clip_x0=s.clip_x0, batch_size=s.batch_size,
               prediction=config.diffusion.prediction)

  def sampler_options(self) -> dict[str, Any]:
    """The keyword options of the chosen sampler (the others' knobs do not apply to it)."""
    if self.sampler == "ddim":
      return {"eta": self.eta}
    if self.sampler == "ddpm":
      return {"variance": self.ddpm_variance}
    if self.sampler in ("euler", "heun"):
      return {"s_churn": self.s_churn}
    return {}


class Sampler:
  """Draws num images with given params: x_T and labels from the seed, batches sharded on 'data'."""

  def __init__(self, *, model: nn.Module, schedule: schedules.Schedule, options: SampleOptions,
               mesh: jax.sharding.Mesh, image_shape: tuple[int, ...], num_classes: int):
    self.options = options
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    # Each compiled batch is padded to a multiple of the devices; the extra rows are dropped. The
    # rows kept are the same whatever the padding: with jax's partitionable threefry a draw of shape
    # [n + k, ...] begins with the draw of shape [n, ...].
    self._padded_batch = -(-options.batch_size // mesh.size) * mesh.size
    self._batch_sharding = NamedSharding(mesh, P("data"))
    self._replicated = NamedSharding(mesh, P())

    def sample_batch(params, labels, rng):
      noise_rng, sampler_rng = jax.random.split(rng)
      x_T = jax.random.normal(noise_rng, (labels.shape[0], *self.image_shape))
      x_T = jax.lax.with_sharding_constraint(x_T, self._batch_sharding)

      def apply_fn(x, model_time, y):
        return model.apply({"params": params}, x, model_time, y, train=False)

      denoise_fn = guidance.make_denoise_fn(
          apply_fn, schedule=schedule, prediction=options.prediction,
          labels=labels if num_classes else None, null_label=num_classes if num_classes else None,
          guidance_scale=options.guidance_scale, guidance_rescale=options.guidance_rescale,
          dynamic_threshold=options.dynamic_threshold, clip_x0=options.clip_x0)
      x0 = samplers.sample(options.sampler, denoise_fn, x_T, sampler_rng, schedule=schedule,
                           steps=options.steps, grid=options.grid,
                           timesteps=None if options.timesteps is None else jnp.asarray(options.timesteps),
                           **options.sampler_options())
      return jnp.clip(x0, -1.0, 1.0)

    self._sample_batch = jax.jit(sample_batch, out_shardings=self._batch_sharding)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, model: nn.Module,
                  schedule: schedules.Schedule, mesh: jax.sharding.Mesh,
                  image_shape: tuple[int, ...]) -> "Sampler":
    return cls(model=model, schedule=schedule, options=SampleOptions.from_config(config), mesh=mesh,
               image_shape=image_shape, num_classes=config.model.num_classes)

  def default_labels(self, num: int) -> np.ndarray:
    """Classes 0, 1, ..., num_classes - 1, repeated: each row of a grid shows every class."""
    return (np.arange(num) % max(self.num_classes, 1)).astype(np.int32)

  def sample(self, params: Any, *, seed: int, num: int | None = None,
             labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images [num, H, W, C], int32 labels [num]) on every process."""
    num = num or self.options.batch_size
    labels = self.default_labels(num) if labels is None else np.asarray(labels, np.int32)
    batch = self.options.batch_size
    images = []
    for i, start in enumerate(range(0, num, batch)):
      chunk = np.zeros((self._padded_batch,), np.int32)
      chunk[:min(batch, num - start)] = labels[start:start + batch]
      chunk = jax.device_put(chunk, self._replicated)
      rng = jax.random.fold_in(jax.random.key(seed), i)
      x0 = self._sample_batch(params, chunk, rng)
      x0 = multihost_utils.process_allgather(x0, tiled=True) if jax.process_count() > 1 else x0
      images.append(np.asarray(jax.device_get(x0))[:batch])
    images = np.concatenate(images)[:num]
    return writers.to_uint8(images), labels
