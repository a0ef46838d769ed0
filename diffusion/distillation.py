"""Progressive distillation (Salimans & Ho 2022, Alg. 2): the student's grid, its target and weighting.

A student sampled by deterministic DDIM in N steps learns, for each of its steps t -> t'', the x whose
one DDIM step from z_t lands where two DDIM steps of the teacher, t -> t' -> t'', land. Each round
halves N; the student of one round is the teacher of the next.

The grids are the "trailing" ones (grids.py): t_i = 1 - i / N in continuous time, Alg. 2's t = i / N
counted from the other end; on a discrete schedule the trained times nearest to it. The student's grid
of N steps is every other time of the teacher's grid of 2N steps, so t' is the midpoint step.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion import grids
from diffusion import samplers
from diffusion import schedules

Array = jnp.ndarray

# config.distill.weighting: the weight of the squared error in x-space (x_loss_weight).
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def student_grid(*, schedule: schedules.Schedule, steps: int) -> Array:
  """The N + 1 times, from 1 to 0, of a student sampled in N DDIM steps (the trailing grid)."""
  return grids.trailing_grid(schedule=schedule, steps=steps)


def teacher_grid(*, schedule: schedules.Schedule, steps: int) -> Array:
  """The 2N + 1 times of the teacher's two steps per student step: student_grid(steps) at even indices."""
  return grids.trailing_grid(schedule=schedule, steps=2 * steps)


def two_teacher_steps(denoise_fn: samplers.DenoiseFn, z_t: Array, *, t: Array, t_mid: Array,
                      t_next: Array, schedule: schedules.Schedule) -> Array:
  """Salimans & Ho 2022, Alg. 2: z_t'' from z_t by two deterministic DDIM steps t -> t' -> t''.

  Times may be per example (shape [B, 1, ..., 1]); denoise_fn(z, t) -> (x0_hat, eps_hat) is the teacher.
  """
  no_noise = jnp.zeros_like(z_t)
  z_mid = samplers.ddim_step(denoise_fn, z_t, t, t_mid, no_noise, schedule=schedule)
  return samplers.ddim_step(denoise_fn, z_mid, t_mid, t_next, no_noise, schedule=schedule)


def ddim_x_target(*, z_t: Array, z_next: Array, alpha_t: Array, sigma_t: Array, alpha_next: Array,
                  sigma_next: Array) -> Array:
  """Salimans & Ho 2022, Alg. 2: x~ = (z_t'' - sigma_t''/sigma_t z_t) / (alpha_t'' - sigma_t''/sigma_t alpha_t),

  the x0 prediction whose one DDIM step t -> t'' from z_t gives z_t''.
  """
  ratio = sigma_next / sigma_t
  return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)


def x_loss_weight(weighting: str, *, logsnr: Array) -> Array:
  """Salimans & Ho 2022, Sec. 4: "truncated SNR" max(SNR, 1) or "SNR+1" 1 + SNR, times ||x - x_hat||^2.

  With v prediction, SNR+1 in x-space is the plain squared error of v (x - x_hat = sigma (v_hat - v)).
  """
  snr = jnp.exp(logsnr)
  if weighting == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr_plus_one":
    return snr + 1.0
  raise ValueError(f"config.distill.weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}.")
