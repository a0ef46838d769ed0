"""Consistency models (Song et al. 2023, "CM"; Song & Dhariwal 2023, "iCT"): the maths, as pure functions.

In Karras et al.'s variance-exploding variables x = x0 + sigma n, a consistency function f(x, sigma) maps
every point of a probability-flow ODE trajectory to its end at sigma_min. It is parameterised so that
f(x, sigma_min) = x holds exactly (CM, Eq. 5 and App. C):

  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),

c_skip, c_out, c_in in parameterization.consistency_scalings. Training compares f at two neighbouring
levels sigma_n < sigma_{n+1} of a Karras grid of N levels (CM, Eq. 7 / iCT, Eq. 4):

  loss = lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_n, sigma_n)),

x_{n+1} = x0 + sigma_{n+1} z, and x_n either one Heun step of a teacher's probability-flow ODE from
x_{n+1} (distillation, CM Alg. 2; heun_step) or x0 + sigma_n z with the same z (training without a
teacher, CM Alg. 3). iCT's recipe: the pseudo-Huber distance, lognormal sampling of n, the doubling
curriculum N(k) and lambda = 1 / (sigma_{n+1} - sigma_n).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion import grids
from diffusion import parameterization
from diffusion import schedules

Array = jnp.ndarray
Denoiser = Callable[[Array, Array], Array]  # D(x; sigma) in Karras's variables, sigma of shape [B].

# config.consistency.loss and config.consistency.weighting.
LOSSES = ("pseudo_huber", "l2")
WEIGHTINGS = ("inverse_gap", "uniform")
NOISE_SAMPLINGS = ("lognormal", "uniform")


def consistency_function(network: Callable[[Array, Array], Array], x: Array, sigma: Array, *,
                         sigma_min: float, sigma_data: float) -> Array:
  """CM, Eq. 5 and App. C: f(x, sigma) = c_skip x + c_out network(c_in x, sigma), sigma of shape [B].

  network(x_in, sigma) -> F; f(x, sigma_min) = x exactly.
  """
  b = lambda a: a.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  c_skip, c_out, c_in = parameterization.consistency_scalings(sigma=sigma, sigma_min=sigma_min,
                                                              sigma_data=sigma_data)
  return b(c_skip) * x + b(c_out) * network(b(c_in) * x, sigma)


def curriculum(step: Array, *, total_steps: int, s0: int, s1: int) -> Array:
  """iCT, Eq. 10: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)).

  With s0 = s1 the discretisation is fixed at N = s1 + 1 levels (CM's distillation: N = 18).
  """
  k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
  doublings = jnp.minimum(jnp.asarray(step) // k_prime, 30)  # 2^30 s0 is past any s1.
  return jnp.minimum(s0 * 2 ** doublings, s1) + 1


def discretisation(num_levels: Array, *, sigma_min: float, sigma_max: float, size: int,
                   rho: float = schedules.EDM_RHO) -> Array:
  """The N = num_levels Karras sigmas sigma_1 < ... < sigma_N (CM, Sec. 5; Karras et al. 2022, Eq. 5),

  padded to `size` entries with sigma_max, so a traced N (the curriculum) keeps a static shape.
  """
  i = jnp.arange(size, dtype=jnp.float32)
  ramp = jnp.minimum(i / (num_levels - 1).astype(jnp.float32), 1.0)
  a, b = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigmas = (a + ramp * (b - a)) ** rho
  return sigmas.at[0].set(sigma_min)  # Exactly sigma_min, where f is the identity.


def level_probabilities(sigmas: Array, num_levels: Array, *, distribution: str, p_mean: float,
                        p_std: float) -> Array:
  """p(n) of the pair (sigma_n, sigma_{n+1}), n = 0 .. N - 2 of `sigmas`; 0 beyond.

  "lognormal" (iCT, Sec. 3.5): p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt 2 P_std)) -
  erf((ln sigma_n - P_mean) / (sqrt 2 P_std)); "uniform": n uniform (CM, Alg. 2-3).
  """
  valid = jnp.arange(sigmas.shape[0] - 1) < num_levels - 1
  if distribution == "uniform":
    p = jnp.ones(sigmas.shape[0] - 1)
  elif distribution == "lognormal":
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
  else:
    raise ValueError(f"config.consistency.noise_sampling={distribution!r} is not one of "
                     f"{', '.join(NOISE_SAMPLINGS)}.")
  p = jnp.where(valid, p, 0.0)
  return p / jnp.sum(p)


def pseudo_huber_c(dim: int) -> float:
  """iCT, Sec. 3.3: c = 0.00054 sqrt(d) for data of dimension d."""
  return 0.00054 * math.sqrt(dim)


def pseudo_huber(x: Array, y: Array, *, c: float) -> Array:
  """iCT, Eq. 9: d(x, y) = sqrt(|x - y|^2 + c^2) - c per example."""
  sq = jnp.sum(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
  return jnp.sqrt(sq + c**2) - c


def distance(x: Array, y: Array, *, loss: str, c: float) -> Array:
  """d(x, y) per example: "pseudo_huber" (iCT) or "l2", the squared distance |x - y|^2 (CM)."""
  if loss == "pseudo_huber":
    return pseudo_huber(x, y, c=c)
  if loss == "l2":
    return jnp.sum(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
  raise ValueError(f"config.consistency.loss={loss!r} is not one of {', '.join(LOSSES)}.")


def weight(sigma: Array, sigma_next: Array, *, weighting: str) -> Array:
  """lambda(sigma_n): "inverse_gap" 1 / (sigma_{n+1} - sigma_n) (iCT, Sec. 3.4) or "uniform" 1 (CM)."""
  if weighting == "inverse_gap":
    return 1.0 / (sigma_next - sigma)
  if weighting == "uniform":
    return jnp.ones_like(sigma)
  raise ValueError(f"config.consistency.weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}.")


def heun_step(denoiser: Denoiser, x: Array, *, sigma: Array, sigma_next: Array) -> Array:
  """Karras et al. 2022, Alg. 1 lines 4-8: from sigma to sigma_next > 0 on dx / dsigma = (x - D) / sigma.

  CM, Alg. 2 takes one such step of the teacher from sigma_{n+1} to sigma_n.
  """
  b = lambda s: s.reshape((-1,) + (1,) * (x.ndim - 1))
  d = (x - denoiser(x, sigma)) / b(sigma)
  x_euler = x + b(sigma_next - sigma) * d
  d_next = (x_euler - denoiser(x_euler, sigma_next)) / b(sigma_next)
  return x + b(sigma_next - sigma) * (0.5 * (d + d_next))


def teacher_denoiser(denoise_fn: Callable[[Array, Array], tuple[Array, Array]], *,
                     schedule: schedules.Schedule) -> Denoiser:
  """D(x; sigma) of a model given as denoise_fn(x_t, t) -> (x0_hat, eps_hat) on any process.

  Every process here is one logSNR(t) (schedules.py): sigma = exp(-logSNR / 2) and x_t = x / sqrt(1 +
  sigma^2), so a VP, EDM or flow teacher is read as Karras's denoiser at its time t(sigma).
  """
  def denoiser(x, sigma):
    t = schedule.t_from_logsnr(-2.0 * jnp.log(sigma))
    scale = jax.lax.rsqrt(1.0 + sigma**2).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return denoise_fn(x * scale, t)[0]
  return denoiser


def grid_sigma_range(schedule: schedules.Schedule) -> tuple[float, float]:
  """(sigma at t_min, sigma at t = 1) of a process: the range of Karras's sigma it was trained on."""
  logsnr = jnp.maximum(schedule.logsnr(jnp.asarray([schedule.t_min, 1.0])), grids.LOGSNR_MIN)
  sigmas = jnp.exp(-0.5 * logsnr)
  return float(sigmas[0]), float(sigmas[1])
