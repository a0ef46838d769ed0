"""Inpainting: sample the unknown region while the known one follows its forward process.

At every step the known region (mask = 1) is replaced by the known image noised to the step's time
(Lugmayr et al. 2022, RePaint, Eq. 8-9); the unknown region takes a step of a one-step sampler (DDPM
or DDIM: a multistep solver's history would not survive the re-noising jumps). With resample > 1,
RePaint's schedule (Sec. 4.2) goes back jump_length steps by forward re-noising and samples them again,
resample - 1 times per jump, so the two regions can harmonise. The whole schedule runs under one
lax.scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion import grids
from diffusion import samplers
from diffusion import schedules

Array = jnp.ndarray

STEPS = {"ddpm": samplers.ddpm_step, "ddim": samplers.ddim_step}


def repaint_levels(*, steps: int, resample: int, jump_length: int) -> np.ndarray:
  """Lugmayr et al. 2022, Sec. 4.2 (get_schedule_jump): the visited levels, steps down to 0 (clean).

  Level u is grid index steps - u. Each time the walk reaches u = 1, 1 + j, 1 + 2j, ... (below
  steps - j + 1) it jumps back up j = jump_length levels, resample - 1 times in all.
  """
  if resample < 1 or jump_length < 1:
    raise ValueError(f"resample={resample} and jump_length={jump_length} must be >= 1.")
  jumps = {u: resample - 1 for u in range(1, steps - jump_length + 1, jump_length)}
  u, levels = steps, [steps]
  while u >= 1:
    u -= 1
    levels.append(u)
    if jumps.get(u, 0) > 0:
      jumps[u] -= 1
      u += jump_length
      levels.append(u)
  return np.asarray(levels)


def renoise(*, x_s: Array, noise: Array, logsnr_s: Array, logsnr_t: Array) -> Array:
  """Ho et al. 2020, Eq. 2 over a jump s -> t > s: x_t ~ N(a x_s, 1 - a^2), a = alpha_t / alpha_s."""
  log_ratio = jax.nn.softplus(-logsnr_s) - jax.nn.softplus(-logsnr_t)  # log(alpha_t^2 / alpha_s^2).
  return jnp.exp(0.5 * log_ratio) * x_s + jnp.sqrt(-jnp.expm1(log_ratio)) * noise


def inpaint(name: str, denoise_fn: samplers.DenoiseFn, x_T: Array, rng: Array, *, known: Array,
            mask: Array, schedule: schedules.Schedule, steps: int, grid: str | None = None,
            resample: int = 1, jump_length: int = 1, **options) -> Array:
  """Samples x_0 with x_0 = known where mask = 1 (mask broadcasts against x_T; 1 known, 0 to sample).

  name is "ddpm" (options: variance) or "ddim" (options: eta); the grid is as samplers.sample's.
  Jittable with name, steps, grid, resample and jump_length static.
  """
  if name not in STEPS:
    raise ValueError(f"config.sample.sampler={name!r} is not one of {', '.join(STEPS)} for inpainting.")
  step = STEPS[name]
  timesteps = grids.make_grid(grid or samplers.default_grid(name, schedule), schedule, steps)
  index = steps - repaint_levels(steps=steps, resample=resample, jump_length=jump_length)
  known = known.astype(x_T.dtype)
  mask = jnp.asarray(mask, x_T.dtype)

  def noised_known(t, key):
    _, alpha, sigma = samplers.noise_level(schedule, t)
    return alpha * known + sigma * jax.random.normal(key, x_T.shape, x_T.dtype)

  def body(x, xs):
    t, t_next, key = xs
    step_key, known_key = jax.random.split(key)
    noise = jax.random.normal(step_key, x.shape, x.dtype)

    def reverse():
      x_unknown = step(denoise_fn, x, t, t_next, noise, schedule=schedule, **options)
      return mask * noised_known(t_next, known_key) + (1.0 - mask) * x_unknown

    def forward():
      logsnr_s, _, _ = samplers.noise_level(schedule, t)
      logsnr_t, _, _ = samplers.noise_level(schedule, t_next)
      return renoise(x_s=x, noise=noise, logsnr_s=logsnr_s, logsnr_t=logsnr_t)

    return lax.cond(t_next < t, reverse, forward).astype(x.dtype), None

  init_key, rng = jax.random.split(rng)
  x = mask * noised_known(timesteps[0], init_key) + (1.0 - mask) * x_T
  xs = (timesteps[index[:-1]], timesteps[index[1:]], jax.random.split(rng, len(index) - 1))
  return lax.scan(body, x.astype(x_T.dtype), xs)[0]


def reduce_mask(mask: Array, *, factor: int) -> Array:
  """A pixel mask [B, H, W, 1] (1 known, 0 to sample) on the latent grid [B, H/f, W/f, 1].

  A latent cell is known only if every pixel of its f x f block is known: a cell is unknown if any
  of its pixels is unknown (a min-pool), so nothing to be filled is kept.
  """
  b, h, w, c = mask.shape
  if h % factor or w % factor:
    raise ValueError(f"A {h}x{w} mask does not split into {factor}x{factor} latent cells.")
  blocks = mask.reshape(b, h // factor, factor, w // factor, factor, c)
  return jnp.min(blocks, axis=(2, 4))


def random_masks(rng: Array, *, batch_size: int, height: int, width: int) -> Array:
  """Random training masks [B, H, W, 1] (1 known, 0 to fill) for inpainting models, one per example.

  Half are one axis-aligned rectangle (sides uniform in [H/4, 3H/4]), half a brush stroke: a
  thick line (width H/8) between two uniform points; SD-inpainting trains on both kinds.
  """
  rect_rng, line_rng, kind_rng = jax.random.split(rng, 3)
  ys = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
  xs = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
  u = jax.random.uniform(rect_rng, (4, batch_size, 1, 1))
  h_, w_ = (0.25 + 0.5 * u[0]) * height, (0.25 + 0.5 * u[1]) * width
  y0, x0 = u[2] * (height - h_), u[3] * (width - w_)
  rect = (ys >= y0) & (ys < y0 + h_) & (xs >= x0) & (xs < x0 + w_)
  p = jax.random.uniform(line_rng, (4, batch_size, 1, 1)) * jnp.array([height, width, height, width],
                                                                        jnp.float32)[:, None, None, None]
  dy, dx = p[2] - p[0], p[3] - p[1]
  s = jnp.clip(((ys - p[0]) * dy + (xs - p[1]) * dx) / jnp.maximum(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
  dist = jnp.hypot(ys - p[0] - s * dy, xs - p[1] - s * dx)
  line = dist <= max(height, width) / 8.0
  fill = jnp.where(jax.random.bernoulli(kind_rng, 0.5, (batch_size, 1, 1)), rect, line)
  return (~fill).astype(jnp.float32)[..., None]
