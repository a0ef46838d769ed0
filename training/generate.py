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

import models
from diffusion import grids
from diffusion import guidance
from diffusion import inpaint
from diffusion import samplers
from diffusion import schedules
from training import sharding
from training import spaces
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
  s_tmin: float = 0.0
  s_tmax: float | None = None  # None: no upper bound.
  s_noise: float = 1.0
  preset: str | None = None  # A name in samplers.PRESETS, already applied to the fields above.
  guidance_scale: float = 1.0
  guidance_rescale: float = 0.0
  dynamic_threshold: float | None = None
  clip_x0: bool = True
  batch_size: int = 64
  prediction: str = "eps"
  learned_variance: bool = False  # The network outputs its variances too (config.model.dit.learn_sigma).
  steps_offset: int = 0  # Shifts the "leading" grid (a diffusers scheduler's steps_offset).
  set_alpha_to_one: bool = True  # False: the last step ends at t = 1 / T (diffusers' DDIM of SD).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SampleOptions":
    """config.sample's settings, those of config.sample.preset (samplers.PRESETS) replacing its own."""
    s = config.sample
    karras = dict(sampler=s.sampler, grid=s.grid, s_churn=s.s_churn, s_tmin=s.s_tmin, s_tmax=s.s_tmax,
                  s_noise=s.s_noise)
    if s.preset is not None:
      if s.preset not in samplers.PRESETS:
        raise ValueError(f"config.sample.preset={s.preset!r} is not one of {', '.join(samplers.PRESETS)}.")
      karras.update(samplers.PRESETS[s.preset])
    learned = models.learns_variance(config.model)
    if s.ddpm_variance == "learned" and not learned:
      raise ValueError("config.sample.ddpm_variance='learned' needs a model with learned variances "
                       "(config.model.dit.learn_sigma=True).")
    if (config.diffusion.prediction == "consistency") != (karras["sampler"] == "consistency"):
      raise ValueError(f"config.sample.sampler={karras['sampler']!r} with config.diffusion.prediction="
                       f"{config.diffusion.prediction!r}: a consistency model is sampled by the "
                       "'consistency' sampler, and only it samples one.")
    timesteps = None
    if s.get("grid_file") is not None:
      timesteps = grids.read_grid_file(s.grid_file, steps=s.steps)
    return cls(steps=s.steps, timesteps=timesteps, eta=s.eta, ddpm_variance=s.ddpm_variance,
               preset=s.preset,
               guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
               dynamic_threshold=s.dynamic_threshold, clip_x0=s.clip_x0, batch_size=s.batch_size,
               prediction=config.diffusion.prediction, learned_variance=learned,
               steps_offset=s.get("steps_offset", 0), set_alpha_to_one=s.get("set_alpha_to_one", True),
               **karras)

  def timesteps_array(self, schedule: schedules.Schedule | None = None) -> jax.Array | None:
    """The time grid of config.sample.grid_file or of a scheduler's settings; None: the named grid."""
    if self.timesteps is not None:
      return jnp.asarray(self.timesteps)
    if schedule is None or (self.steps_offset == 0 and self.set_alpha_to_one):
      return None
    return grids.scheduler_grid(self.grid or samplers.default_grid(self.sampler, schedule), schedule,
                                self.steps, steps_offset=self.steps_offset,
                                set_alpha_to_one=self.set_alpha_to_one)

  def sampler_options(self) -> dict[str, Any]:
    """The keyword options of the chosen sampler (the others' knobs do not apply to it)."""
    if self.sampler == "ddim":
      return {"eta": self.eta}
    if self.sampler == "ddpm":
      return {"variance": self.ddpm_variance}
    if self.sampler in ("euler", "heun"):
      s_tmax = float("inf") if self.s_tmax is None else self.s_tmax
      return {"s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": s_tmax, "s_noise": self.s_noise}
    return {}


class Sampler:
  """Draws num images with given params: x_T and labels from the seed, batches over every device.

  The params may be sharded (config.mesh.fsdp): the jitted sampler takes them as they lie.
  The samplers run in space.shape (pixels, or an autoencoder's latents: training/spaces.py) and the
  result is decoded to pixels; x0 is clipped to [-1, 1] at each step (config.sample.clip_x0) only in
  pixel space. concat_channels > 0 is an inpainting model (cond["concat"]), sampled with inpaint().
  More conditioning (a text model's cond["context"]) and its unconditional value come as arrays, and
  so does the guidance scale: changing prompts, seed or scale never recompiles (w = 1 without rescale,
  which skips the unconditional half, is a second program).
  """

  def __init__(self, *, model: nn.Module, schedule: schedules.Schedule, options: SampleOptions,
               mesh: jax.sharding.Mesh, image_shape: tuple[int, ...], num_classes: int,
               space: spaces.Space | None = None, concat_channels: int = 0):
    self.options = options
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.space = space or spaces.PixelSpace(data_shape=self.image_shape)
    if tuple(self.space.shape) != self.image_shape:
      raise ValueError(f"The model's input shape {self.image_shape} is not the shape "
                       f"{tuple(self.space.shape)} of its space, {self.space.description}.")
    self.concat_channels = concat_channels
    self._model, self._schedule = model, schedule
    # Each compiled batch is padded to a multiple of the devices; the extra rows are dropped. The
    # rows kept are the same whatever the padding: with jax's partitionable threefry a draw of shape
    # [n + k, ...] begins with the draw of shape [n, ...].
    self._padded_batch = -(-options.batch_size // mesh.size) * mesh.size
    self._batch_sharding = sharding.batch_sharding(mesh)  # Along "data" and "fsdp".
    self._replicated = NamedSharding(mesh, P())
    self._frozen = jax.device_put(self.space.params, self._replicated)
    self._timesteps = options.timesteps_array(schedule)
    self._sample_batch = jax.jit(self._draw, out_shardings=self._batch_sharding,
                                 static_argnames=("guided",))
    self._inpaint_batch = jax.jit(self._draw_inpainted, out_shardings=self._batch_sharding,
                                  static_argnames=("guided",))

  def guided(self, guidance_scale: float) -> bool:
    """Whether a run with this scale needs the unconditional half (w != 1 or a rescale)."""
    return guidance_scale != 1.0 or bool(self.options.guidance_rescale)

  def _denoise_fn(self, params, labels, scale, extra=None, null=None):
    """extra: more cond entries [B, ...]; null: their unconditional values, one example's, for guidance."""
    options, num_classes = self.options, self.num_classes

    def apply_fn(x, model_time, cond):
      return self._model.apply({"params": params}, x, model_time, cond, train=False)

    cond = {"label": labels} if num_classes else {}
    cond.update(extra or {})
    nulls = guidance.null_cond(num_classes=num_classes, batch_size=labels.shape[0])
    nulls.update({k: jnp.broadcast_to(v, (labels.shape[0], *v.shape)) for k, v in (null or {}).items()})
    return guidance.make_denoise_fn(
        apply_fn, schedule=self._schedule, prediction=options.prediction, cond=cond or None,
        uncond={**cond, **nulls} if nulls else None, guidance_scale=scale,
        guidance_rescale=options.guidance_rescale, dynamic_threshold=options.dynamic_threshold,
        clip_x0=options.clip_x0 and self.space.bounded, learned=options.learned_variance,
        return_variance=options.sampler == "ddpm" and options.ddpm_variance == "learned")

  def _x_T(self, labels, rng):
    x_T = jax.random.normal(rng, (labels.shape[0], *self.image_shape))
    return jax.lax.with_sharding_constraint(x_T, self._batch_sharding)

  def _draw(self, params, frozen, labels, rng, extra, null, scale, *, guided):
    noise_rng, sampler_rng = jax.random.split(rng)
    options = self.options
    denoise_fn = self._denoise_fn(params, labels, scale if guided else 1.0, extra, null)
    x0 = samplers.sample(options.sampler, denoise_fn, self._x_T(labels, noise_rng),
                         sampler_rng, schedule=self._schedule, steps=options.steps, grid=options.grid,
                         timesteps=self._timesteps, **options.sampler_options())
    return jnp.clip(self.space.decode(frozen, x0), -1.0, 1.0)

  def _draw_inpainted(self, params, frozen, labels, rng, extra, null, scale, image, mask, *, guided):
    """image [H, W, C] in [-1, 1] and mask [H, W, 1] (1 keep) at pixel resolution, for every row."""
    noise_rng, sampler_rng = jax.random.split(rng)
    options, space = self.options, self.space
    images = jnp.broadcast_to(image, (labels.shape[0], *image.shape))
    masks = jnp.broadcast_to(mask, (labels.shape[0], *mask.shape))
    x_T = self._x_T(labels, noise_rng)
    scale = scale if guided else 1.0
    if self.concat_channels:  # An inpainting model sees the mask and the masked image (SD-inpainting).
      extra = {**(extra or {}), "concat": spaces.inpaint_concat(space, frozen, images=images, mask=masks)}
      x0 = samplers.sample(options.sampler, self._denoise_fn(params, labels, scale, extra, null), x_T,
                           sampler_rng, schedule=self._schedule, steps=options.steps, grid=options.grid,
                           timesteps=self._timesteps, **options.sampler_options())
    else:  # Any other model: the known region follows its forward process (RePaint).
      x0 = inpaint.inpaint(options.sampler, self._denoise_fn(params, labels, scale, extra, null), x_T,
                           sampler_rng, known=space.encode(frozen, images, None),
                           mask=inpaint.reduce_mask(masks, factor=space.factor),
                           schedule=self._schedule, steps=options.steps, grid=options.grid,
                           **options.sampler_options())
    return jnp.clip(space.decode(frozen, x0), -1.0, 1.0)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, model: nn.Module,
                  schedule: schedules.Schedule, mesh: jax.sharding.Mesh,
                  image_shape: tuple[int, ...], space: spaces.Space | None = None) -> "Sampler":
    return cls(model=model, schedule=schedule, options=SampleOptions.from_config(config), mesh=mesh,
               image_shape=image_shape, num_classes=config.model.num_classes, space=space,
               concat_channels=spaces.concat_channels(config, image_shape))

  def _pad(self, rows: np.ndarray) -> np.ndarray:
    """rows [n <= padded batch, ...] padded with zeros to the compiled batch."""
    return np.concatenate([rows, np.zeros((self._padded_batch - len(rows), *rows.shape[1:]), rows.dtype)])

  def default_labels(self, num: int) -> np.ndarray:
    """Classes 0, 1, ..., num_classes - 1, repeated: each row of a grid shows every class."""
    return (np.arange(num) % max(self.num_classes, 1)).astype(np.int32)

  def sample(self, params: Any, *, seed: int, num: int | None = None, labels: np.ndarray | None = None,
             image: np.ndarray | None = None, mask: np.ndarray | None = None,
             cond: dict[str, Any] | None = None, null: dict[str, Any] | None = None,
             guidance_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images [num, H, W, C], int32 labels [num]) on every process.

    cond: more conditioning, arrays [num, ...] (a text model's {"context": [num, T, D]}); null: the
    unconditional value of each of its keys, one example's ([T, D]: the empty or negative prompt's
    context), for classifier-free guidance; guidance_scale replaces config.sample.guidance_scale.

    With image ([H, W, C] in [-1, 1]) and mask ([H, W, 1], 1 = keep, 0 = fill) at pixel resolution,
    every image is an inpainting of image: by the model itself if it has the inpainting channels,
    else by RePaint (config.sample.sampler ddpm or ddim) with the mask reduced to the latent grid
    (inpaint.reduce_mask) and the known region encoded with the autoencoder's mode.
    """
    if (image is None) != (mask is None):
      raise ValueError("image and mask go together (config.sample.image, config.sample.mask).")
    if image is not None and cond is not None:
      raise ValueError("Inpainting (config.sample.image) takes no cond: it is not for text models.")
    if image is None and self.concat_channels:
      raise ValueError("This model was trained for inpainting (config.diffusion.inpaint_training): "
                       "give config.sample.image and config.sample.mask.")
    if image is not None:
      if not self.concat_channels and self.options.sampler not in inpaint.STEPS:
        raise ValueError(f"config.sample.sampler={self.options.sampler!r} is not one of "
                         f"{', '.join(inpaint.STEPS)} for inpainting with a model without inpainting "
                         "channels (RePaint).")
      image = jax.device_put(np.asarray(image, np.float32), self._replicated)
      mask = jax.device_put(np.asarray(mask, np.float32), self._replicated)
    scale = self.options.guidance_scale if guidance_scale is None else float(guidance_scale)
    scale_array = jax.device_put(np.float32(scale), self._replicated)
    if null is not None:
      null = jax.device_put(null, self._replicated)
    num = num or self.options.batch_size
    labels = self.default_labels(num) if labels is None else np.asarray(labels, np.int32)
    batch = self.options.batch_size
    images = []
    for i, start in enumerate(range(0, num, batch)):
      chunk = np.zeros((self._padded_batch,), np.int32)
      chunk[:min(batch, num - start)] = labels[start:start + batch]
      chunk = jax.device_put(chunk, self._replicated)
      rng = jax.random.fold_in(jax.random.key(seed), i)
      extra = None
      if cond is not None:
        extra = {k: jax.device_put(self._pad(np.asarray(v)[start:start + batch]), self._batch_sharding)
                 for k, v in cond.items()}
      args = (params, self._frozen, chunk, rng, extra, null, scale_array)
      if image is None:
        x0 = self._sample_batch(*args, guided=self.guided(scale))
      else:
        x0 = self._inpaint_batch(*args, image, mask, guided=self.guided(scale))
      x0 = multihost_utils.process_allgather(x0, tiled=True) if jax.process_count() > 1 else x0
      images.append(np.asarray(jax.device_get(x0))[:batch])
    images = np.concatenate(images)[:num]
    return writers.to_uint8(images), labels
