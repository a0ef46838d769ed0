"""Noise schedules of the Gaussian forward process x_t = alpha(t) x_0 + sigma(t) eps, t in [0, 1].

The internal currency is continuous time t with alpha(t), sigma(t) and logSNR(t) = log(alpha^2 /
sigma^2). A schedule only has to provide these three (and the inverse of logSNR) for every sampler and
the train step to work, so variance-exploding (EDM, alpha = 1) or flow-matching (alpha = 1 - t,
sigma = t) processes can be added beside the variance-preserving ones here.

The discrete T-step DDPM schedule is the special case whose table of alpha-bar is read at t = i / T,
i = 1..T, exactly; between grid points log(alpha-bar) is interpolated linearly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A forward process given by logSNR(t); alpha and sigma follow for the variance-preserving case."""

  logsnr_fn: Callable[[Array], Array]
  t_from_logsnr_fn: Callable[[Array], Array]
  num_timesteps: int = 0  # > 0: a discrete DDPM schedule, trained and sampled at t = i / T.
  variance_preserving: bool = True

  def logsnr(self, t: Array) -> Array:
    """log(alpha(t)^2 / sigma(t)^2), decreasing in t."""
    return self.logsnr_fn(_as_float(t))

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """alpha(t), sigma(t) of a VP process: alpha^2 = sigmoid(logSNR), sigma^2 = sigmoid(-logSNR)."""
    logsnr = self.logsnr(t)
    return jnp.sqrt(jax_sigmoid(logsnr)), jnp.sqrt(jax_sigmoid(-logsnr))

  def t_from_logsnr(self, logsnr: Array) -> Array:
    """The time at which the process reaches the given logSNR (for logSNR- and sigma-uniform grids)."""
    return self.t_from_logsnr_fn(_as_float(logsnr))

  @property
  def t_min(self) -> float:
    """The smallest time trained and sampled: the first discrete step, or 1e-3 in continuous time."""
    return 1.0 / self.num_timesteps if self.num_timesteps else 1e-3

  def model_time(self, t: Array) -> Array:
    """The network's time input: 1000 t, so step i of a 1000-step schedule is fed as i."""
    return 1000.0 * jnp.asarray(t, jnp.float32)


def _as_float(x: Array) -> Array:
  """x as a float array of at least float32, so float64 times (under jax x64) keep their precision."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def jax_sigmoid(x: Array) -> Array:
  return 1.0 / (1.0 + jnp.exp(-x))


# ----------------------------------------------------------------------------------------------------
# Discrete tables (numpy, float64) and the continuous curves they come from.


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Ho et al. 2020, Sec. 4: betas linear from beta_start to beta_end over T steps."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray | Array, s: float = 0.008) -> np.ndarray | Array:
  """Nichol & Dhariwal 2021, Eq. 17: alpha-bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2)."""
  xp = jnp if isinstance(t, jnp.ndarray) else np
  f = lambda u: xp.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return f(t) / f(0.0)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021, Sec. 3.2: betas from the cosine alpha-bar, clipped at 0.999."""
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = cosine_alpha_bar(t, s)
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def rescale_zero_terminal_snr(alpha_bar: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Alg. 1: shift and scale sqrt(alpha-bar) so the last step has SNR 0, the first unchanged."""
  sqrt_ab = np.sqrt(alpha_bar)
  first, last = sqrt_ab[0], sqrt_ab[-1]
  return ((sqrt_ab - last) * first / (first - last)) ** 2


def _table_schedule(alpha_bar: np.ndarray) -> Schedule:
  """A discrete schedule from alpha-bar at t = i / T, i = 1..T; alpha-bar(0) = 1."""
  num_timesteps = len(alpha_bar)
  log_ab = np.concatenate([[0.0], np.log(np.maximum(alpha_bar, 1e-300))])
  log_ab = np.maximum(log_ab, -80.0)  # SNR 0 at the end under zero-terminal-SNR: clip for the interpolation.
  log_ab_table = jnp.asarray(log_ab, jnp.float32)
  grid = jnp.linspace(0.0, 1.0, num_timesteps + 1)

  def logsnr_fn(t):
    log_ab_t = jnp.interp(t, grid, log_ab_table)
    return _log_ab_to_logsnr(log_ab_t)

  # logSNR is monotone in t, so invert by interpolating the table the other way round.
  logsnr_table = jnp.asarray(log_ab[1:] - np.log(-np.expm1(log_ab[1:])), jnp.float32)

  def t_from_logsnr_fn(logsnr):
    return jnp.interp(-logsnr, -logsnr_table, grid[1:])

  return Schedule(logsnr_fn, t_from_logsnr_fn, num_timesteps=num_timesteps)


def discrete_schedule(betas: np.ndarray, *, zero_terminal_snr: bool = False) -> Schedule:
  """The DDPM schedule: alpha-bar_i = prod_{j <= i} (1 - beta_j) (Ho et al. 2020, Eq. 4)."""
  alpha_bar = np.cumprod(1.0 - betas)
  if zero_terminal_snr:
    alpha_bar = rescale_zero_terminal_snr(alpha_bar)
  return _table_schedule(alpha_bar)


def _log_ab_to_logsnr(log_ab: Array) -> Array:
  return log_ab - jnp.log(-jnp.expm1(log_ab))  # log(ab / (1 - ab)).


def _continuous_schedule(sqrt_ab_fn, t_from_sqrt_ab_fn, *, zero_terminal_snr: bool,
                         logsnr_min: float) -> Schedule:
  """A continuous-time VP schedule from sqrt(alpha-bar)(t) and its inverse.

  Without zero_terminal_snr, logSNR is clipped below at logsnr_min so x_0 stays recoverable at t = 1.
  """
  end = float(sqrt_ab_fn(jnp.float32(1.0)))
  if zero_terminal_snr:  # Lin et al. 2023, Alg. 1 with sqrt(alpha-bar)(0) = 1.
    fwd = lambda t: (sqrt_ab_fn(t) - end) / (1.0 - end)
    inv = lambda a: t_from_sqrt_ab_fn(a * (1.0 - end) + end)
    floor = -jnp.inf
  else:
    fwd, inv, floor = sqrt_ab_fn, t_from_sqrt_ab_fn, logsnr_min

  def logsnr_fn(t):
    log_ab = 2.0 * jnp.log(jnp.clip(fwd(t), 1e-30, 1.0))
    return jnp.maximum(_log_ab_to_logsnr(log_ab), floor)

  def t_from_logsnr_fn(logsnr):
    sqrt_ab = jnp.sqrt(jax_sigmoid(jnp.maximum(logsnr, floor)))
    return jnp.clip(inv(sqrt_ab), 0.0, 1.0)

  return Schedule(logsnr_fn, t_from_logsnr_fn, num_timesteps=0)


def continuous_linear(beta_start: float, beta_end: float, *, zero_terminal_snr: bool = False,
                      scale: int = 1000) -> Schedule:
  """The T -> infinity limit of the linear-beta schedule with betas given per 1/scale of time.

  log alpha-bar(t) = -scale (b0 t + (b1 - b0) t^2 / 2): the VP SDE of Song et al. 2021 (Eq. 33) with
  beta_min = scale b0, beta_max = scale b1.
  """
  b0, db = scale * beta_start, scale * (beta_end - beta_start)
  sqrt_ab = lambda t: jnp.exp(-0.5 * (b0 * t + 0.5 * db * t**2))
  def t_from_sqrt_ab(a):  # Solve db/2 t^2 + b0 t + 2 log(a) = 0 for t >= 0.
    c = -2.0 * jnp.log(a)
    return (-b0 + jnp.sqrt(b0**2 + 2.0 * db * c)) / db if db else c / b0
  return _continuous_schedule(sqrt_ab, t_from_sqrt_ab, zero_terminal_snr=zero_terminal_snr,
                              logsnr_min=-jnp.inf)


def continuous_cosine(s: float = 0.008, *, zero_terminal_snr: bool = False,
                      logsnr_min: float = -20.0) -> Schedule:
  """Nichol & Dhariwal 2021's cosine schedule in continuous time, logSNR clipped below at logsnr_min."""
  f0 = math.cos(s / (1 + s) * math.pi / 2)
  sqrt_ab = lambda t: jnp.cos((t + s) / (1 + s) * math.pi / 2) / f0
  t_from_sqrt_ab = lambda a: jnp.arccos(jnp.clip(a * f0, -1.0, 1.0)) * 2 / math.pi * (1 + s) - s
  return _continuous_schedule(sqrt_ab, t_from_sqrt_ab, zero_terminal_snr=zero_terminal_snr,
                              logsnr_min=logsnr_min)


SCHEDULES = ("linear", "cosine")


def create_schedule(*, schedule: str, num_timesteps: int, beta_start: float = 1e-4,
                    beta_end: float = 0.02, zero_terminal_snr: bool = False) -> Schedule:
  """The schedule named by config.diffusion.schedule, discrete if num_timesteps > 0."""
  if schedule not in SCHEDULES:
    raise ValueError(f"config.diffusion.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}.")
  if num_timesteps < 0:
    raise ValueError(f"config.diffusion.num_timesteps={num_timesteps} must be >= 0 (0 = continuous time).")
  if schedule == "linear" and not 0 < beta_start < beta_end < 1:
    raise ValueError(f"config.diffusion.beta_start={beta_start} and beta_end={beta_end} must satisfy "
                     "0 < beta_start < beta_end < 1.")
  if num_timesteps > 0:
    betas = (linear_betas(num_timesteps, beta_start, beta_end) if schedule == "linear"
             else cosine_betas(num_timesteps))
    return discrete_schedule(betas, zero_terminal_snr=zero_terminal_snr)
  if schedule == "linear":
    return continuous_linear(beta_start, beta_end, zero_terminal_snr=zero_terminal_snr)
  return continuous_cosine(zero_terminal_snr=zero_terminal_snr)
