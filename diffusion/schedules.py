"""Noise schedules of the Gaussian forward process x_t = alpha(t) x_0 + sigma(t) eps, t in [0, 1].

The internal currency is continuous time t with alpha(t), sigma(t) and logSNR(t) = log(alpha^2 /
sigma^2). A schedule only has to provide these three (and the inverse of logSNR) for every sampler and
the train step to work, so variance-exploding (EDM, alpha = 1) or flow-matching (alpha = 1 - t,
sigma = t) processes can be added beside the variance-preserving ones here.

The discrete T-step DDPM schedule is the special case whose table of alpha-bar is read at t = i / T,
i = 1..T, exactly; between grid points log(alpha-bar) is interpolated linearly. The continuous ones
compute log(alpha-bar) in closed form, so sigma^2 = -expm1(log alpha-bar) and logSNR keep float32's
relative precision down to t = 1e-5, where alpha-bar rounds to 1.

The network's time input (Schedule.model_time) is 1000 t: step i of a 1000-step schedule, the one with
alpha-bar_i, is fed as i = 1..T. DDPM's code (diffusion_tf) and diffusers number the same step from
zero and feed i - 1; a converted checkpoint sets config.diffusion.model_time="index_from_zero" to see
exactly the values its training used.

Besides the variance-preserving schedules (config.diffusion.process = "vp"), two processes live in
the same currency, each given by its logSNR(t) alone; x_t stays the VP variable alpha x0 + sigma eps
with alpha^2 + sigma^2 = 1, and what the network sees is the parameterisation's business
(parameterization.network_input), as Karras et al. 2022 (Table 1, Eq. 4) separate the ODE's scale
s(t) from the network's preconditioning:
- "edm" (Karras et al. 2022): the variance-exploding x = x0 + sigma n, sigma = sigma_t / alpha_t =
  exp(-logSNR / 2) on their rho = 7 ramp (Eq. 5) in t: sigma(t_min) = sigma_min, sigma(1) = sigma_max,
  and sigma(0) = 0 (clean data). VP's x_t is x / sqrt(1 + sigma^2) (alpha = 1 / sqrt(1 + sigma^2),
  sigma_t = sigma alpha). With it the uniform time grid ("trailing") is Karras's grid.
- "flow" (rectified flow, Liu et al. 2023; flow matching, Lipman et al. 2023): x = (1 - t) x0 + t eps,
  logSNR = 2 log((1 - t) / t); VP's x_t is x / sqrt((1 - t)^2 + t^2), i.e. x = x_t / (alpha + sigma).
  SNR is 0 at t = 1 (as with zero terminal SNR).
Schedule.sigma_data is the data's standard deviation that the "edm" parameterisation's
preconditioning assumes; it travels with the schedule so every caller of the network has it.
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
  time_input: str = "index"  # The network's time input, one of MODEL_TIMES (see model_time).
  sigma_data: float = 0.5  # The data's standard deviation, for the "edm" parameterisation.

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
    """The smallest time trained, sampled and where the likelihood ODE starts: 1 / T, or T_MIN_CONTINUOUS."""
    return 1.0 / self.num_timesteps if self.num_timesteps else T_MIN_CONTINUOUS

  def model_time(self, t: Array) -> Array:
    """The network's time input: 1000 t ("index", step i fed as i), T t - 1 ("index_from_zero", i - 1)

    or c_noise = ln(sigma) / 4 = -logSNR / 8 ("c_noise", Karras et al. 2022, Table 1), logSNR clipped
    below at LOGSNR_MIN so an SNR-0 start stays finite.
    """
    t = jnp.asarray(t, jnp.float32)
    if self.time_input == "index_from_zero":
      return self.num_timesteps * t - 1.0
    if self.time_input == "c_noise":
      return -0.125 * jnp.maximum(self.logsnr(t), LOGSNR_MIN)
    return 1000.0 * t


# Continuous-time training draws t from [T_MIN_CONTINUOUS, 1] and the likelihood ODE starts there
# (Song et al. 2021, App. D.2: epsilon = 1e-5 for both).
T_MIN_CONTINUOUS = 1e-5

# The network's time input: "index" feeds 1000 t (step i of a 1000-step schedule as i, this codebase's
# convention), "index_from_zero" feeds T t - 1 (step i as i - 1: DDPM's code and diffusers), "c_noise"
# feeds ln(sigma) / 4 of Karras's sigma = sigma_t / alpha_t (EDM's c_noise).
MODEL_TIMES = ("index", "index_from_zero", "c_noise")

# Samplers, grids and the c_noise time input never go below this logSNR: a zero-terminal-SNR schedule
# or the flow has logSNR(1) = -inf, where sigma / alpha is infinite. diffusers clips alpha-bar(1) at
# 2^-24 (logSNR -16.6) for the same reason; -24 leaves every finite schedule here (cosine is clipped at
# -20) untouched.
LOGSNR_MIN = -24.0


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


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Stable Diffusion's "scaled_linear" (Rombach et al. 2022): sqrt(beta) linear, beta_start to beta_end."""
  return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


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


def _continuous_schedule(log_ab_fn, t_from_log_ab_fn, *, zero_terminal_snr: bool,
                         logsnr_min: float) -> Schedule:
  """A continuous-time VP schedule from log alpha-bar(t) in closed form and its inverse.

  Without zero_terminal_snr, logSNR is clipped below at logsnr_min so x_0 stays recoverable at t = 1.
  """
  if zero_terminal_snr:  # Lin et al. 2023, Alg. 1: sqrt(ab) -> (sqrt(ab) - e) / (1 - e), e = sqrt(ab)(1).
    end = math.exp(0.5 * float(log_ab_fn(1.0)))

    def fwd(t):
      half = 0.5 * log_ab_fn(t)  # log sqrt(ab).
      # log1p(expm1(half) / (1 - e)) keeps the precision where sqrt(ab) rounds to 1; where the ratio
      # nears 0 (t -> 1) the direct log is the accurate one. Each branch sees only inputs it can take.
      near_zero = jnp.log1p(jnp.expm1(jnp.maximum(half, -1.0)) / (1.0 - end))
      direct = jnp.log(jnp.clip(jnp.exp(half) - end, 1e-30, 1.0)) - math.log1p(-end)
      return 2.0 * jnp.where(half > -1.0, near_zero, direct)

    def inv(log_ab):  # sqrt(ab) = sqrt(ab_z) (1 - e) + e, i.e. expm1(log sqrt(ab)) = expm1(log sqrt(ab_z)) (1 - e).
      return t_from_log_ab_fn(2.0 * jnp.log1p(jnp.expm1(0.5 * log_ab) * (1.0 - end)))
    floor = -jnp.inf
  else:
    fwd, inv, floor = log_ab_fn, t_from_log_ab_fn, logsnr_min

  def logsnr_fn(t):
    return jnp.maximum(_log_ab_to_logsnr(jnp.minimum(fwd(t), 0.0)), floor)

  def t_from_logsnr_fn(logsnr):
    log_ab = -jnp.logaddexp(-jnp.maximum(logsnr, floor), 0.0)  # log sigmoid(logSNR).
    return jnp.clip(inv(log_ab), 0.0, 1.0)

  return Schedule(logsnr_fn, t_from_logsnr_fn, num_timesteps=0)


def continuous_linear(beta_start: float, beta_end: float, *, zero_terminal_snr: bool = False,
                      scale: int = 1000) -> Schedule:
  """The T -> infinity limit of the linear-beta schedule with betas given per 1/scale of time.

  log alpha-bar(t) = -scale (b0 t + (b1 - b0) t^2 / 2): the VP SDE of Song et al. 2021 (Eq. 33) with
  beta_min = scale b0, beta_max = scale b1.
  """
  b0, db = scale * beta_start, scale * (beta_end - beta_start)
  log_ab = lambda t: -(b0 * t + 0.5 * db * t**2)

  def t_from_log_ab(log_ab):  # The root t >= 0 of db/2 t^2 + b0 t - c = 0, c = -log ab, without cancellation.
    c = -log_ab
    return 2.0 * c / (b0 + jnp.sqrt(b0**2 + 2.0 * db * c))
  return _continuous_schedule(log_ab, t_from_log_ab, zero_terminal_snr=zero_terminal_snr,
                              logsnr_min=-jnp.inf)


def continuous_cosine(s: float = 0.008, *, zero_terminal_snr: bool = False,
                      logsnr_min: float = -20.0) -> Schedule:
  """Nichol & Dhariwal 2021's cosine schedule in continuous time, logSNR clipped below at logsnr_min.

  sqrt(alpha-bar)(t) = cos(a + d) / cos(a) = 1 - 2 sin^2(d / 2) - tan(a) sin(d), a = s / (1 + s) pi / 2,
  d = t / (1 + s) pi / 2: the right-hand form gives log alpha-bar without cancellation near t = 0.
  """
  a = s / (1 + s) * math.pi / 2
  f0 = math.cos(a)

  def log_ab(t):
    d = t / (1 + s) * math.pi / 2
    small = jnp.minimum(d, 0.5)
    near_zero = 2.0 * jnp.log1p(-2.0 * jnp.sin(0.5 * small) ** 2 - math.tan(a) * jnp.sin(small))
    direct = 2.0 * jnp.log(jnp.clip(jnp.cos(a + d) / f0, 1e-30, 1.0))
    return jnp.where(d < 0.5, near_zero, direct)

  def t_from_log_ab(log_ab):
    # a + d = arccos(x), x = f0 (1 - m), m = 1 - sqrt(ab), as atan2(sqrt((1 - x)(1 + x)), x) with
    # 1 - x = 2 sin^2(a / 2) + f0 m free of cancellation.
    m = -jnp.expm1(0.5 * log_ab)
    x = f0 * (1.0 - m)
    angle = jnp.arctan2(jnp.sqrt((2.0 * math.sin(0.5 * a) ** 2 + f0 * m) * (1.0 + x)), x)
    return angle * 2 / math.pi * (1 + s) - s
  return _continuous_schedule(log_ab, t_from_log_ab, zero_terminal_snr=zero_terminal_snr,
                              logsnr_min=logsnr_min)


# ----------------------------------------------------------------------------------------------------
# The EDM and flow processes (module docstring).

EDM_RHO = 7.0  # Karras et al. 2022, Eq. 5 and Table 1: the ramp of their time steps.


def edm_schedule(*, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> Schedule:
  """Karras et al. 2022, Eq. 5 in t: sigma(t) = (a + u (b - a))^rho, a = sigma_min^(1/rho),

  b = sigma_max^(1/rho), u = (t - t_min) / (1 - t_min), so sigma(t_min) = sigma_min and sigma(1) =
  sigma_max; sigma(0) = 0 (the data). logSNR = -2 log sigma.
  """
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"config.diffusion.sigma_min={sigma_min} and config.diffusion.sigma_max={sigma_max} "
                     "must satisfy 0 < sigma_min < sigma_max.")
  a, b, t_min = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho), T_MIN_CONTINUOUS

  def logsnr_fn(t):
    u = (t - t_min) / (1.0 - t_min)
    return jnp.where(t > 0, -2.0 * rho * jnp.log(a + u * (b - a)), jnp.inf)

  def t_from_logsnr_fn(logsnr):
    u = (jnp.exp(-0.5 / rho * logsnr) - a) / (b - a)
    return jnp.clip(t_min + u * (1.0 - t_min), 0.0, 1.0)

  return Schedule(logsnr_fn, t_from_logsnr_fn, num_timesteps=0)


def flow_schedule() -> Schedule:
  """Rectified flow (Liu et al. 2023, Eq. 1): x = (1 - t) x0 + t eps, logSNR = 2 log((1 - t) / t)."""
  logsnr_fn = lambda t: 2.0 * (jnp.log1p(-t) - jnp.log(t))
  t_from_logsnr_fn = lambda logsnr: jax_sigmoid(-0.5 * logsnr)  # (1 - t) / t = e^(logSNR / 2).
  return Schedule(logsnr_fn, t_from_logsnr_fn, num_timesteps=0)


SCHEDULES = ("linear", "scaled_linear", "cosine")
PROCESSES = ("vp", "edm", "flow")


def create_schedule(*, schedule: str, num_timesteps: int, beta_start: float = 1e-4,
                    beta_end: float = 0.02, zero_terminal_snr: bool = False,
                    model_time: str = "index", process: str = "vp", sigma_min: float = 0.002,
                    sigma_max: float = 80.0, sigma_data: float = 0.5) -> Schedule:
  """The process of config.diffusion.process: "vp" is the schedule named by config.diffusion.schedule,

  discrete if num_timesteps > 0; "edm" and "flow" are continuous-time (num_timesteps = 0).
  """
  if process not in PROCESSES:
    raise ValueError(f"config.diffusion.process={process!r} is not one of {', '.join(PROCESSES)}.")
  if sigma_data <= 0:
    raise ValueError(f"config.diffusion.sigma_data={sigma_data} must be > 0.")
  if process != "vp":
    if num_timesteps != 0:
      raise ValueError(f"config.diffusion.process={process!r} is a continuous-time process; it needs "
                       f"config.diffusion.num_timesteps=0, got {num_timesteps}.")
    if zero_terminal_snr:
      raise ValueError("config.diffusion.zero_terminal_snr=True rescales a 'vp' schedule; it does not "
                       f"apply to config.diffusion.process={process!r}.")
    if model_time not in MODEL_TIMES or model_time == "index_from_zero":
      raise ValueError(f"config.diffusion.model_time={model_time!r} is not one of index, c_noise "
                       f"(config.diffusion.process={process!r}).")
    out = edm_schedule(sigma_min=sigma_min, sigma_max=sigma_max) if process == "edm" else flow_schedule()
    return dataclasses.replace(out, time_input=model_time, sigma_data=sigma_data)
  if schedule not in SCHEDULES:
    raise ValueError(f"config.diffusion.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}.")
  if num_timesteps < 0:
    raise ValueError(f"config.diffusion.num_timesteps={num_timesteps} must be >= 0 (0 = continuous time).")
  if schedule in ("linear", "scaled_linear") and not 0 < beta_start < beta_end < 1:
    raise ValueError(f"config.diffusion.beta_start={beta_start} and beta_end={beta_end} must satisfy "
                     "0 < beta_start < beta_end < 1.")
  if model_time not in MODEL_TIMES:
    raise ValueError(f"config.diffusion.model_time={model_time!r} is not one of {', '.join(MODEL_TIMES)}.")
  if model_time == "index_from_zero" and num_timesteps <= 0:
    raise ValueError("config.diffusion.model_time='index_from_zero' numbers discrete steps; it needs "
                     f"config.diffusion.num_timesteps > 0, got {num_timesteps}.")
  if schedule == "scaled_linear" and num_timesteps <= 0:
    raise ValueError("config.diffusion.schedule='scaled_linear' is a discrete schedule; it needs "
                     f"config.diffusion.num_timesteps > 0, got {num_timesteps}.")
  if num_timesteps > 0:
    if schedule == "cosine":
      betas = cosine_betas(num_timesteps)
    else:
      beta_fn = linear_betas if schedule == "linear" else scaled_linear_betas
      betas = beta_fn(num_timesteps, beta_start, beta_end)
    out = discrete_schedule(betas, zero_terminal_snr=zero_terminal_snr)
  elif schedule == "linear":
    out = continuous_linear(beta_start, beta_end, zero_terminal_snr=zero_terminal_snr)
  else:
    out = continuous_cosine(zero_terminal_snr=zero_terminal_snr)
  return dataclasses.replace(out, time_input=model_time, sigma_data=sigma_data)
