"""Time grids for the samplers, kept apart from the solvers (as k-diffusion's get_sigmas_*).

A grid is a decreasing 1-D array of steps + 1 times: it starts at t_max (1, the start of sampling) and
ends at t = 0, clean data. A sampler takes one step between each pair of neighbours, so the last step
jumps from the smallest positive time to the data. Samplers also accept grids that end at some t > 0;
they then return x_t at that time (the convergence tests use this).

The discrete spacings follow diffusers' `timestep_spacing` (Lin et al. 2023, Table 2) with our time
convention: diffusers' timestep index k is our time t = (k + 1) / T, so its alphas_cumprod[k] is our
alpha(t)^2. The continuous ones (logSNR-uniform, Karras) run between t_max and schedule.t_min and then
append t = 0; on a discrete schedule they give times between the trained ones (the network sees a
fractional time, which its sinusoidal embedding takes as it is; diffusers rounds instead).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np

from diffusion import schedules

Array = jnp.ndarray

# Samplers and grids never go below this logSNR (see schedules.LOGSNR_MIN).
LOGSNR_MIN = schedules.LOGSNR_MIN


def _with_zero(t: np.ndarray | Array) -> Array:
  """The grid t followed by the final time 0 (clean data)."""
  t = jnp.asarray(t)
  return jnp.concatenate([t, jnp.zeros((1,), t.dtype)])


def _num_timesteps(schedule: schedules.Schedule, name: str, steps: int) -> int:
  num = schedule.num_timesteps
  if num <= 0:
    raise ValueError(f"config.sample.grid={name!r} needs a discrete schedule "
                     "(config.diffusion.num_timesteps > 0); use 'trailing', 'logsnr' or 'karras'.")
  if steps > num:
    raise ValueError(f"config.sample.steps={steps} is more than the {num} steps of the schedule.")
  return num


def leading_grid(*, schedule: schedules.Schedule, steps: int, steps_offset: int = 0) -> Array:
  """DDIM's spacing (Song et al. 2021): indices 0, r, 2r, ... (+ offset), r = T // steps, largest first."""
  num = _num_timesteps(schedule, "leading", steps)
  index = np.arange(steps)[::-1] * (num // steps) + steps_offset
  return _with_zero((index + 1) / num)


def trailing_grid(*, schedule: schedules.Schedule, steps: int) -> Array:
  """Lin et al. 2023, Table 2: indices T - 1, T - 1 - T / steps, ... rounded, so sampling starts at t = 1.

  On a continuous schedule this is the time-uniform grid t_k = 1 - k / steps.
  """
  if schedule.num_timesteps <= 0:
    return jnp.asarray(np.linspace(1.0, 0.0, steps + 1))
  num = _num_timesteps(schedule, "trailing", steps)
  index = np.round(np.arange(num, 0, -num / steps)).astype(np.int64) - 1
  return _with_zero((index + 1) / num)


def linspace_grid(*, schedule: schedules.Schedule, steps: int) -> Array:
  """The spacing of diffusers' DDPM/DDIM "linspace": indices linspace(0, T - 1, steps) rounded."""
  num = _num_timesteps(schedule, "linspace", steps)
  index = np.round(np.linspace(0, num - 1, steps))[::-1]
  return _with_zero((index + 1) / num)


def _logsnr_range(schedule: schedules.Schedule, t_max: float, t_min: float | None) -> tuple[Array, Array]:
  t_min = schedule.t_min if t_min is None else t_min
  if not 0.0 < t_min < t_max <= 1.0:
    raise ValueError(f"the grid needs 0 < t_min={t_min} < t_max={t_max} <= 1.")
  return jnp.maximum(schedule.logsnr(t_max), LOGSNR_MIN), schedule.logsnr(t_min)


def logsnr_grid(*, schedule: schedules.Schedule, steps: int, t_max: float = 1.0,
                t_min: float | None = None) -> Array:
  """Lu et al. 2022 (DPM-Solver), Sec. 3.3: times uniform in logSNR from t_max to t_min, then t = 0."""
  lo, hi = _logsnr_range(schedule, t_max, t_min)
  logsnr = lo + (hi - lo) * jnp.linspace(0.0, 1.0, steps, dtype=lo.dtype)
  t = schedule.t_from_logsnr(logsnr)
  t = t.at[0].set(t_max)  # Exact ends, not their round trip through t_from_logsnr.
  if steps > 1:
    t = t.at[-1].set(t_min if t_min is not None else schedule.t_min)
  return _with_zero(t)


def karras_sigmas(*, sigma_max: Array, sigma_min: Array, steps: int, rho: float = 7.0) -> Array:
  """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i / (N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
  ramp = jnp.linspace(0.0, 1.0, steps, dtype=sigma_max.dtype)
  inv_max, inv_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (inv_max + ramp * (inv_min - inv_max)) ** rho


def karras_grid(*, schedule: schedules.Schedule, steps: int, rho: float = 7.0, t_max: float = 1.0,
                t_min: float | None = None) -> Array:
  """Karras sigmas (sigma = sigma_t / alpha_t = exp(-logSNR / 2)) from t_max to t_min, mapped back to t."""
  lo, hi = _logsnr_range(schedule, t_max, t_min)
  sigmas = karras_sigmas(sigma_max=jnp.exp(-0.5 * lo), sigma_min=jnp.exp(-0.5 * hi), steps=steps, rho=rho)
  t = schedule.t_from_logsnr(-2.0 * jnp.log(sigmas))
  t = t.at[0].set(t_max)
  if steps > 1:
    t = t.at[-1].set(t_min if t_min is not None else schedule.t_min)
  return _with_zero(t)


GRIDS: dict[str, Callable[..., Array]] = {
    "leading": leading_grid,
    "trailing": trailing_grid,
    "linspace": linspace_grid,
    "logsnr": logsnr_grid,
    "karras": karras_grid,
}


def make_grid(name: str, schedule: schedules.Schedule, steps: int, **options) -> Array:
  """The grid named by config.sample.grid: steps + 1 decreasing times from 1 to 0."""
  if name not in GRIDS:
    raise ValueError(f"config.sample.grid={name!r} is not one of {', '.join(GRIDS)}.")
  if steps < 1:
    raise ValueError(f"config.sample.steps={steps} must be positive.")
  return GRIDS[name](schedule=schedule, steps=steps, **options)


def scheduler_grid(name: str, schedule: schedules.Schedule, steps: int, *, steps_offset: int = 0,
                   set_alpha_to_one: bool = True) -> Array:
  """The grid of diffusers' DDIMScheduler.set_timesteps with a checkpoint's scheduler_config.json.

  steps_offset shifts the "leading" indices only (as diffusers does); set_alpha_to_one=False ends the
  last step at alphas_cumprod[0], our t = 1 / T, instead of at the data (t = 0; alpha-bar 1).
  """
  if steps_offset and name != "leading":
    raise ValueError(f"config.sample.steps_offset={steps_offset} shifts the 'leading' grid only, not "
                     f"config.sample.grid={name!r}; set it to 0.")
  t = make_grid(name, schedule, steps, **({"steps_offset": steps_offset} if steps_offset else {}))
  if not set_alpha_to_one:
    if schedule.num_timesteps <= 0:
      raise ValueError("config.sample.set_alpha_to_one=False ends at the first step of a discrete "
                       "schedule; it needs config.diffusion.num_timesteps > 0.")
    t = t.at[-1].set(1.0 / schedule.num_timesteps)
  return t


def read_grid_file(path: str, *, steps: int) -> tuple[float, ...]:
  """The times of config.sample.grid_file, a JSON {"timesteps": [t_0, ..., t_N]} (scripts/optimize_grid.py).

  The grid must have steps + 1 strictly decreasing times from t_0 <= 1 to t_N = 0.
  """
  key = f"config.sample.grid_file={path!r}"
  if not os.path.isfile(path):
    raise ValueError(f"{key} is not a file.")
  try:
    with open(path) as f:
      times = json.load(f)["timesteps"]
    times = tuple(float(t) for t in times)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{key} is not a JSON object with a list of numbers "timesteps": {e}') from None
  if len(times) != steps + 1:
    raise ValueError(f"{key} holds {len(times) - 1} steps, not config.sample.steps={steps}; pass "
                     f"--config.sample.steps={len(times) - 1}.")
  t = np.asarray(times)
  if not (np.all(np.isfinite(t)) and t[0] <= 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0)):
    raise ValueError(f"{key}: the times must decrease strictly from t_0 <= 1 to 0; got {list(times)}.")
  return times
