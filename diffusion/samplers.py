"""Samplers: from noise x_T to data, each run one compiled program (the loop is a lax.scan).

Every sampler has one signature, sample_<name>(denoise_fn, x_T, timesteps, rng, *, schedule, **options):
- denoise_fn(x_t, t) -> (x0_hat, eps_hat), t a scalar time in [0, 1]. Guidance, the network and its
  parameterisation (eps, x0 or v) hide inside it (guidance.make_denoise_fn), so every sampler works
  with every model, on discrete and continuous schedules alike.
- timesteps: a decreasing 1-D array t_0 > t_1 > ... > t_N (grids.py). The sampler takes the N steps
  t_i -> t_{i+1}, calls denoise_fn only at t_0 .. t_{N-1} (Heun also at t_{i+1} > 0) and returns x at
  t_N; grids end at t_N = 0, so the result is clean data.
- rng: a stochastic sampler's noise of step i is normal(split(rng, N)[i], x.shape), the same draws for
  every sampler, so DDIM with eta = 1 and DDPM with the small variance walk the same path.
- schedule: alpha(t), sigma(t), logSNR(t) of the forward process x_t = alpha x0 + sigma eps. logSNR is
  clipped below at grids.LOGSNR_MIN so a zero-terminal-SNR start (alpha = 0) stays finite.

DPM-Solver++ and UniPC work in lambda = log(alpha / sigma) = logSNR / 2, as their papers do. Euler,
Euler ancestral and Heun (Karras et al. 2022) work in the variance-exploding variables of Karras et al.,
Table 1: sigma = sigma_t / alpha_t = exp(-logSNR / 2) and x = x_t / alpha_t, where the probability-flow
ODE reads dx / dsigma = (x - D(x; sigma)) / sigma = eps_hat; they convert back with alpha at the end.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import grids
from diffusion import learned_variance
from diffusion import schedules

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array], tuple[Array, Array]]


def noise_level(schedule: schedules.Schedule, t: Array) -> tuple[Array, Array, Array]:
  """(logSNR, alpha, sigma) at time t, logSNR clipped below at grids.LOGSNR_MIN."""
  logsnr = jnp.maximum(schedule.logsnr(t), grids.LOGSNR_MIN)
  return logsnr, jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def _scan(body, carry, timesteps: Array, rng: Array):
  """Runs body(carry, (i, t_i, t_{i+1}, key_i)) over the N steps of the grid under one lax.scan."""
  n = timesteps.shape[0] - 1
  xs = (jnp.arange(n, dtype=jnp.int32), timesteps[:-1], timesteps[1:], jax.random.split(rng, n))
  carry, _ = lax.scan(lambda c, xs_: (body(c, xs_), None), carry, xs)
  return carry


# ----------------------------------------------------------------------------------------------------
# DDPM and DDIM.


def ddpm_variances(*, logsnr_t: Array, logsnr_s: Array) -> tuple[Array, Array]:
  """Ho et al. 2020, Eq. 7 and Sec. 3.2, for a step t -> s < t: beta~ = sigma_s^2 / sigma_t^2 beta and beta.

  beta = 1 - alpha_t^2 / alpha_s^2 is the variance of the (possibly skipped) forward step s -> t.
  """
  log_ratio = jax.nn.softplus(-logsnr_s) - jax.nn.softplus(-logsnr_t)  # log(alpha_t^2 / alpha_s^2).
  beta = -jnp.expm1(log_ratio)
  return jax.nn.sigmoid(-logsnr_s) / jax.nn.sigmoid(-logsnr_t) * beta, beta


def ddpm_posterior_mean(*, x0: Array, x_t: Array, logsnr_t: Array, logsnr_s: Array) -> Array:
  """Ho et al. 2020, Eq. 7: E[x_s | x_t, x0] = (alpha_s beta x0 + alpha_t|s sigma_s^2 x_t) / sigma_t^2."""
  log_ratio = jax.nn.softplus(-logsnr_s) - jax.nn.softplus(-logsnr_t)
  var_t, var_s = jax.nn.sigmoid(-logsnr_t), jax.nn.sigmoid(-logsnr_s)
  alpha_s = jnp.sqrt(jax.nn.sigmoid(logsnr_s))
  return (alpha_s * -jnp.expm1(log_ratio) / var_t) * x0 + (jnp.exp(0.5 * log_ratio) * var_s / var_t) * x_t


def ddpm_step(denoise_fn: DenoiseFn, x: Array, t: Array, t_next: Array, noise: Array, *,
              schedule: schedules.Schedule, variance: str = "small") -> Array:
  """Ho et al. 2020, Alg. 2: x_s ~ N(mean, var) with var beta~ ("small") or beta ("large"); none at s = 0.

  "learned": the network's own variance between the two (Nichol & Dhariwal 2021, Eq. 15; skipped
  steps interpolate between the skipped step's beta~ and beta, as their respacing); denoise_fn then
  returns (x0_hat, eps_hat, v) (guidance.make_denoise_fn's return_variance).
  """
  out = denoise_fn(x, t)
  x0 = out[0]
  logsnr_t, _, _ = noise_level(schedule, t)
  logsnr_s, _, sigma_s = noise_level(schedule, t_next)
  mean = ddpm_posterior_mean(x0=x0, x_t=x, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  small, beta = ddpm_variances(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  if variance == "learned":
    var = learned_variance.interpolated_variance(v=out[2], small=small, large=beta)
  else:
    var = small if variance == "small" else beta
  var = jnp.where(sigma_s > 0, var, 0.0)
  return (mean + jnp.sqrt(var) * noise).astype(x.dtype)


def ddim_update(*, x0: Array, eps: Array, noise: Array, logsnr_t: Array, logsnr_s: Array,
                eta: float | Array) -> Array:
  """Song et al. 2021, Eq. 12, 16: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, c = eta sqrt(beta~)."""
  small, _ = ddpm_variances(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  # At eta = 0 no sqrt: its infinite slope at the step to t = 0 would make the gradient in t NaN.
  c = 0.0 if isinstance(eta, (int, float)) and eta == 0 else eta * jnp.sqrt(small)
  var_s = jax.nn.sigmoid(-logsnr_s)
  return jnp.sqrt(jax.nn.sigmoid(logsnr_s)) * x0 + jnp.sqrt(jnp.maximum(var_s - c**2, 0.0)) * eps + c * noise


def ddim_step(denoise_fn: DenoiseFn, x: Array, t: Array, t_next: Array, noise: Array, *,
              schedule: schedules.Schedule, eta: float | Array = 0.0) -> Array:
  """One DDIM step t -> t_next (eta = 0 deterministic, eta = 1 the DDPM posterior)."""
  x0, eps = denoise_fn(x, t)
  logsnr_t, _, _ = noise_level(schedule, t)
  logsnr_s, _, _ = noise_level(schedule, t_next)
  return ddim_update(x0=x0, eps=eps, noise=noise, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
                     eta=eta).astype(x.dtype)


DDPM_VARIANCES = ("small", "large", "learned")  # "learned" needs a network with learned variances.


def sample_ddpm(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                schedule: schedules.Schedule, variance: str = "small") -> Array:
  """Ancestral sampling (Ho et al. 2020, Alg. 2) on any grid, skipped steps as in Nichol & Dhariwal 2021."""
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"variance={variance!r} is not one of {', '.join(DDPM_VARIANCES)}.")

  def body(x, xs):
    _, t, t_next, key = xs
    return ddpm_step(denoise_fn, x, t, t_next, jax.random.normal(key, x.shape, x.dtype),
                     schedule=schedule, variance=variance)
  return _scan(body, x_T, timesteps, rng)


def sample_ddim(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                schedule: schedules.Schedule, eta: float | Array = 0.0) -> Array:
  """DDIM (Song et al. 2021): deterministic at eta = 0; eta = 1 equals sample_ddpm(variance="small")."""
  deterministic = isinstance(eta, (int, float)) and eta == 0

  def body(x, xs):
    _, t, t_next, key = xs
    noise = jnp.zeros_like(x) if deterministic else jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(denoise_fn, x, t, t_next, noise, schedule=schedule, eta=eta)
  return _scan(body, x_T, timesteps, rng)


# ----------------------------------------------------------------------------------------------------
# The phi functions of exponential integrators, shared by DPM-Solver++ and UniPC.

_PHI_SERIES_BELOW = 2.0  # |z| below which phi_k is summed as its series (the recursion cancels there).
_PHI_SERIES_TERMS = 24  # 2^24 / 24! < 3e-17: the truncation is below float64 rounding.


def phi(k: int, z: Array) -> Array:
  """phi_k(z) = sum_{j >= 0} z^j / (j + k)! = int_0^1 e^((1 - s) z) s^(k-1) / (k-1)! ds, k >= 1

  (Hochbruck & Ostermann 2010, Eq. 2.10): the series for |z| < 2, else phi_1 = expm1(z) / z and
  phi_{k+1} = (phi_k - 1 / k!) / z, whose cancellation for small z loses all of float32's digits.
  """
  z = jnp.asarray(z)
  series = jnp.full_like(z, 1.0 / math.factorial(_PHI_SERIES_TERMS + k - 1))
  for j in reversed(range(_PHI_SERIES_TERMS - 1)):
    series = series * z + 1.0 / math.factorial(j + k)
  z_large = jnp.where(jnp.abs(z) < _PHI_SERIES_BELOW, 1.0, z)  # Keeps the unused branch finite.
  recursion = jnp.expm1(z_large) / z_large
  for i in range(1, k):
    recursion = (recursion - 1.0 / math.factorial(i)) / z_large
  return jnp.where(jnp.abs(z) < _PHI_SERIES_BELOW, series, recursion)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022b), multistep, data prediction, in lambda = logSNR / 2.


def dpmpp_1_update(*, x: Array, m: Array, lam_s: Array, lam_t: Array, alpha_t: Array,
                   sigma_t: Array, sigma_s: Array) -> Array:
  """Lu et al. 2022b, Eq. 9 to first order (= DDIM): x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) x0."""
  h = lam_t - lam_s
  return (sigma_t / sigma_s) * x - (alpha_t * jnp.expm1(-h)) * m[0]


def dpmpp_2m_update(*, x: Array, m: Array, lam: Array, lam_t: Array, alpha_t: Array,
                    sigma_t: Array, sigma_s: Array) -> Array:
  """Lu et al. 2022b, Alg. 2 (midpoint): D = m0 + 1 / (2 r) (m0 - m1), r = h_prev / h."""
  h, h_0 = lam_t - lam[0], lam[0] - lam[1]
  d1 = (h / h_0) * (m[0] - m[1])
  return (sigma_t / sigma_s) * x - (alpha_t * jnp.expm1(-h)) * (m[0] + 0.5 * d1)


def dpmpp_3m_update(*, x: Array, m: Array, lam: Array, lam_t: Array, alpha_t: Array,
                    sigma_t: Array, sigma_s: Array) -> Array:
  """Lu et al. 2022b, App. B: third-order multistep; x0 ~ m0 + D1 u/h + D2 (u/h)^2 / 2, u = lambda - lambda_s.

  D1 ~ h x0' and D2 ~ h^2 x0''. diffusers (multistep_dpm_solver_third_order_update), k-diffusion and
  the DPM-Solver reference code take D2 half as large, (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2,
  which leaves their "3M" second order; with the factor 2 it is third order (tests/test_samplers.py).
  """
  h, h_0, h_1 = lam_t - lam[0], lam[0] - lam[1], lam[1] - lam[2]
  r0, r1 = h_0 / h, h_1 / h
  d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
  d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
  d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
  phi_1, phi_2, phi_3 = dpmpp_3m_coefficients(h)
  return (sigma_t / sigma_s) * x - (alpha_t * phi_1) * m[0] + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2


def dpmpp_3m_coefficients(h: Array) -> tuple[Array, Array, Array]:
  """Lu et al. 2022b, App. B: e^-h - 1, (e^-h - 1 + h) / h and (e^-h - 1 + h) / h^2 - 1/2, i.e.

  -h phi_1(-h), h phi_2(-h) and -h phi_3(-h), exact in float32 however small the step h.
  """
  return jnp.expm1(-h), h * phi(2, -h), -h * phi(3, -h)


def dpmpp_sde_update(*, x: Array, m: Array, lam: Array, lam_t: Array, alpha_t: Array, sigma_t: Array,
                     sigma_s: Array, noise: Array, order: int) -> Array:
  """Lu et al. 2022b, App. (SDE-DPM-Solver++(2M), midpoint): the multistep update of the reverse SDE.

  x_t = sigma_t / sigma_s e^-h x + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z.
  """
  h = lam_t - lam[0]
  d = m[0]
  if order == 2:
    d = d + 0.5 * (h / (lam[0] - lam[1])) * (m[0] - m[1])
  return ((sigma_t / sigma_s) * jnp.exp(-h) * x - (alpha_t * jnp.expm1(-2.0 * h)) * d
          + sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise)


def _push(history: Array, value: Array) -> Array:
  """history with value in front, the oldest entry dropped."""
  return jnp.concatenate([value[None].astype(history.dtype), history[:-1]])


def multistep_order(*, i: Array, n: int, order: int, sigma_next: Array,
                    lower_order_final: bool) -> Array:
  """The order of DPM-Solver++ step i of n, as diffusers': warm-up from first order; a step to sigma = 0

  (lambda = inf) is first order; with lower_order_final and fewer than 15 steps the last two steps
  are first and at most second order (Lu et al. 2022b, Sec. 5: stabler at few steps).
  """
  k = jnp.minimum(order, i + 1)
  if lower_order_final and n < 15:
    k = jnp.where(i == n - 1, 1, k)
    k = jnp.where(i == n - 2, jnp.minimum(k, 2), k)
  return jnp.where(sigma_next == 0, 1, k)


def _dpmpp_multistep(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                     schedule: schedules.Schedule, order: int, lower_order_final: bool,
                     sde: bool) -> Array:
  n = timesteps.shape[0] - 1
  lam_dtype = schedule.logsnr(timesteps[0]).dtype
  history = (jnp.zeros((order,) + x_T.shape, x_T.dtype), jnp.zeros((order,), lam_dtype))

  def body(carry, xs):
    x, m, lam = carry
    i, t, t_next, key = xs
    logsnr_s, _, sigma_s = noise_level(schedule, t)
    logsnr_t, alpha_t, sigma_t = noise_level(schedule, t_next)
    x0, _ = denoise_fn(x, t)
    m, lam = _push(m, x0), _push(lam, 0.5 * logsnr_s)
    k = multistep_order(i=i, n=n, order=order, sigma_next=sigma_t, lower_order_final=lower_order_final)
    common = dict(x=x, m=m, lam_t=0.5 * logsnr_t, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)
    if sde:
      noise = jax.random.normal(key, x.shape, x.dtype)
      branches = [functools.partial(dpmpp_sde_update, lam=lam, noise=noise, order=o, **common)
                  for o in range(1, order + 1)]
    else:
      updates = [dpmpp_1_update, dpmpp_2m_update, dpmpp_3m_update][:order]
      branches = [functools.partial(dpmpp_1_update, lam_s=lam[0], **common)]
      branches += [functools.partial(u, lam=lam, **common) for u in updates[1:]]
    x = lax.switch(k - 1, branches)
    return x.astype(x_T.dtype), m, lam

  return _scan(body, (x_T,) + history, timesteps, rng)[0]


def sample_dpmpp_2m(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                    schedule: schedules.Schedule, lower_order_final: bool = True) -> Array:
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): second order, one model call per step."""
  return _dpmpp_multistep(denoise_fn, x_T, timesteps, rng, schedule=schedule, order=2,
                          lower_order_final=lower_order_final, sde=False)


def sample_dpmpp_3m(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                    schedule: schedules.Schedule, lower_order_final: bool = True) -> Array:
  """DPM-Solver++(3M) (Lu et al. 2022b, App. B): third order, one model call per step."""
  return _dpmpp_multistep(denoise_fn, x_T, timesteps, rng, schedule=schedule, order=3,
                          lower_order_final=lower_order_final, sde=False)


def sample_dpmpp_2m_sde(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                        schedule: schedules.Schedule, lower_order_final: bool = True) -> Array:
  """SDE-DPM-Solver++(2M) (Lu et al. 2022b): a multistep solver of the reverse SDE (stochastic)."""
  return _dpmpp_multistep(denoise_fn, x_T, timesteps, rng, schedule=schedule, order=2,
                          lower_order_final=lower_order_final, sde=True)


# ----------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), data prediction, in lambda = logSNR / 2.


def unipc_coefficients(*, rks: list[Array], h: Array) -> tuple[Array, Array]:
  """Zhao et al. 2023, Alg. 2-3 (bh2): R_p = [r_k^(i-1)] and b_i = i! phi_{i+1}(-h) / phi_1(-h).

  b_i is their h phi_i(-h) i! / B(h) with B(h) = e^-h - 1 = -h phi_1(-h), as the series of phi keeps
  it: diffusers' recursion from expm1 loses float32's digits for h below about 1e-2.
  """
  phi_1 = phi(1, -h)
  rows, b = [], []
  r = jnp.stack(rks)
  for i in range(1, len(rks) + 1):
    rows.append(r ** (i - 1))
    b.append(math.factorial(i) * phi(i + 1, -h) / phi_1)
  return jnp.stack(rows), jnp.stack(b)


def _unipc_base(*, x: Array, m0: Array, h: Array, alpha_t: Array, sigma_t: Array, sigma_s: Array) -> Array:
  return (sigma_t / sigma_s) * x - (alpha_t * jnp.expm1(-h)) * m0


def _unipc_differences(*, m: Array, lam: Array, h: Array, order: int) -> tuple[list, list]:
  """r_k = (lambda_k - lambda_0) / h and D1_k = (m_k - m_0) / r_k over the last `order` predictions."""
  rks = [(lam[k] - lam[0]) / h for k in range(1, order)]
  return rks, [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]


def unipc_predictor(*, x: Array, m: Array, lam: Array, lam_t: Array, alpha_t: Array, sigma_t: Array,
                    sigma_s: Array, order: int) -> Array:
  """Zhao et al. 2023, Alg. 2 (UniP-p, bh2): x_t from x_s and the last `order` data predictions."""
  h = lam_t - lam[0]
  x_t = _unipc_base(x=x, m0=m[0], h=h, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)
  if order == 1:
    return x_t
  rks, d1s = _unipc_differences(m=m, lam=lam, h=h, order=order)
  if order == 2:
    rhos = [0.5]
  else:
    r, b = unipc_coefficients(rks=rks + [jnp.ones_like(h)], h=h)
    rhos = list(jnp.linalg.solve(r[:-1, :-1], b[:-1]))
  res = sum(rho * d for rho, d in zip(rhos, d1s))
  return x_t - (alpha_t * jnp.expm1(-h)) * res


def unipc_corrector(*, x_prev: Array, model_t: Array, m: Array, lam: Array, lam_t: Array, alpha_t: Array,
                    sigma_t: Array, sigma_s: Array, order: int) -> Array:
  """Zhao et al. 2023, Alg. 3 (UniC-p, bh2): corrects x_t with the data prediction model_t made at x_t."""
  h = lam_t - lam[0]
  x_t = _unipc_base(x=x_prev, m0=m[0], h=h, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)
  rks, d1s = _unipc_differences(m=m, lam=lam, h=h, order=order)
  if order == 1:
    rhos = [0.5]
  else:
    r, b = unipc_coefficients(rks=rks + [jnp.ones_like(h)], h=h)
    rhos = list(jnp.linalg.solve(r, b))
  res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m[0])
  return x_t - (alpha_t * jnp.expm1(-h)) * res


def sample_unipc(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                 schedule: schedules.Schedule, order: int = 2, lower_order_final: bool = True,
                 use_corrector: bool = True) -> Array:
  """UniPC-p (Zhao et al. 2023), bh2: UniP-p predictor, UniC-p corrector, order p + 1, one call per step.

  As diffusers: warm-up from first order; with lower_order_final the step i of n has order at most
  n - i; a step to sigma = 0 is first order; the corrector reuses the next step's model call, so the
  last step goes uncorrected.
  """
  if order not in (1, 2, 3):
    raise ValueError(f"UniPC order={order} is not one of 1, 2, 3.")
  n = timesteps.shape[0] - 1
  lam_dtype = schedule.logsnr(timesteps[0]).dtype
  m_hist, lam_hist = jnp.zeros((order,) + x_T.shape, x_T.dtype), jnp.zeros((order,), lam_dtype)

  def body(carry, xs):
    x, x_prev, t_prev, m, lam, last_order = carry
    i, t, t_next, _ = xs
    logsnr_s, alpha_s, sigma_s = noise_level(schedule, t)
    logsnr_t, alpha_t, sigma_t = noise_level(schedule, t_next)
    model_t, _ = denoise_fn(x, t)
    # Correct x at t with the call just made (UniC), using the history up to the previous time.
    _, _, sigma_prev = noise_level(schedule, t_prev)
    corr = dict(x_prev=x_prev, model_t=model_t, m=m, lam=lam, lam_t=0.5 * logsnr_s, alpha_t=alpha_s,
                sigma_t=sigma_s, sigma_s=sigma_prev)
    branches = [lambda: x] + [functools.partial(unipc_corrector, order=o, **corr)
                              for o in range(1, order + 1)]
    ci = jnp.where((i > 0) & use_corrector, last_order, 0)
    x = lax.switch(ci, branches).astype(x_T.dtype)
    m, lam = _push(m, model_t), _push(lam, 0.5 * logsnr_s)
    k = jnp.minimum(order, i + 1)
    if lower_order_final:
      k = jnp.minimum(k, n - i)
    k = jnp.where(sigma_t == 0, 1, k)
    pred = dict(x=x, m=m, lam=lam, lam_t=0.5 * logsnr_t, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)
    x_next = lax.switch(k - 1, [functools.partial(unipc_predictor, order=o, **pred)
                                for o in range(1, order + 1)])
    return x_next.astype(x_T.dtype), x, t, m, lam, k

  carry = (x_T, x_T, timesteps[0], m_hist, lam_hist, jnp.ones((), jnp.int32))
  return _scan(body, carry, timesteps, rng)[0]  # Deterministic: the keys go unused.


def sample_unipc3(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                  schedule: schedules.Schedule, lower_order_final: bool = True,
                  use_corrector: bool = True) -> Array:
  """UniPC-3 (Zhao et al. 2023, Alg. 2-3, bh2): UniP-3 with UniC-3, order 4 (3 without the corrector)."""
  return sample_unipc(denoise_fn, x_T, timesteps, rng, schedule=schedule, order=3,
                      lower_order_final=lower_order_final, use_corrector=use_corrector)


# ----------------------------------------------------------------------------------------------------
# Euler, Euler ancestral and Heun in Karras et al.'s variables sigma = sigma_t / alpha_t, x = x_t / alpha_t.


def karras_sigma(schedule: schedules.Schedule, t: Array) -> Array:
  """Karras et al. 2022, Table 1 (VP): sigma(t) = sigma_t / alpha_t = exp(-logSNR / 2); 0 at t = 0."""
  return jnp.exp(-0.5 * noise_level(schedule, t)[0])


def _ve_denoised(denoise_fn: DenoiseFn, x: Array, t: Array, sigma: Array) -> Array:
  """Karras et al. 2022's D(x; sigma) in their x = x_t / alpha: the network's x0_hat.

  The network sees the VP input alpha x, alpha = 1 / sqrt(sigma^2 + 1) (Table 1, s(t)). The samplers
  step with D, dx / dsigma = (x - D) / sigma (Eq. 3), not with eps_hat: where a process reaches SNR 0
  (the flow at t = 1) sigma is clipped at schedules.LOGSNR_MIN, and only x0_hat is consistent with that
  sigma (eps_hat is SNR 0's, x_t itself, which would drop x0_hat from the first step).
  """
  x0, _ = denoise_fn(x * jax.lax.rsqrt(1.0 + sigma**2).astype(x.dtype), t)
  return x0


def _euler_to(x: Array, denoised: Array, *, sigma: Array, sigma_to: Array) -> Array:
  """x + (sigma_to - sigma) (x - D) / sigma, as (sigma_to / sigma) x + (1 - sigma_to / sigma) D: exactly D
  at sigma_to = 0, without the cancellation of x ~ sigma_max z against itself."""
  ratio = sigma_to / sigma
  return ratio * x + (1.0 - ratio) * denoised


def _churn(*, x: Array, t: Array, sigma: Array, n: int, key: Array, schedule: schedules.Schedule,
           s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[Array, Array, Array]:
  """Karras et al. 2022, Alg. 2 lines 4-6: raise sigma to sigma_hat = (1 + gamma) sigma with fresh noise."""
  if isinstance(s_churn, (int, float)) and s_churn == 0:
    return x, t, sigma
  gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / n, math.sqrt(2.0) - 1.0), 0.0)
  sigma_hat = sigma * (1.0 + gamma)
  noise = jax.random.normal(key, x.shape, x.dtype)
  x = x + (s_noise * jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0))) * noise
  t_hat = jnp.where(gamma > 0, schedule.t_from_logsnr(-2.0 * jnp.log(sigma_hat)), t)
  return x, t_hat.astype(t.dtype), sigma_hat


def _karras_sampler(body_fn, x_T: Array, timesteps: Array, rng: Array, schedule: schedules.Schedule):
  """Runs body_fn in the variables x / alpha and converts back: x_t = alpha(t_N) x at the end."""
  _, alpha_0, _ = noise_level(schedule, timesteps[0])
  _, alpha_n, _ = noise_level(schedule, timesteps[-1])
  x = _scan(body_fn, (x_T / alpha_0).astype(x_T.dtype), timesteps, rng)
  return (alpha_n * x).astype(x_T.dtype)


def _karras_ode(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                schedule: schedules.Schedule, heun: bool, s_churn: float, s_tmin: float, s_tmax: float,
                s_noise: float) -> Array:
  """Karras et al. 2022, Alg. 2: churn, an Euler step in sigma, and with heun its trapezoidal correction."""
  n = timesteps.shape[0] - 1

  def body(x, xs):
    _, t, t_next, key = xs
    sigma, sigma_next = karras_sigma(schedule, t), karras_sigma(schedule, t_next)
    x, t_hat, sigma_hat = _churn(x=x, t=t, sigma=sigma, n=n, key=key, schedule=schedule, s_churn=s_churn,
                                 s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    denoised = _ve_denoised(denoise_fn, x, t_hat, sigma_hat)
    x_euler = _euler_to(x, denoised, sigma=sigma_hat, sigma_to=sigma_next)
    if not heun:
      return x_euler.astype(x.dtype)

    def correct():  # x + (sigma_next - sigma) (d + d_next) / 2, as the Euler step plus a correction.
      d = (x - denoised) / sigma_hat
      d_next = (x_euler - _ve_denoised(denoise_fn, x_euler, t_next, sigma_next)) / sigma_next
      return x_euler + (sigma_next - sigma_hat) * (0.5 * (d_next - d))
    return lax.cond(sigma_next > 0, correct, lambda: x_euler).astype(x.dtype)
  return _karras_sampler(body, x_T, timesteps, rng, schedule)


def sample_euler(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                 schedule: schedules.Schedule, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Array:
  """Euler on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2 without line 9-11 correction).

  Deterministic with s_churn = 0, where it equals DDIM (eta = 0) step for step.
  """
  return _karras_ode(denoise_fn, x_T, timesteps, rng, schedule=schedule, heun=False, s_churn=s_churn,
                     s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


def sample_heun(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                schedule: schedules.Schedule, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Array:
  """Heun's second-order method (Karras et al. 2022, Alg. 1, and Alg. 2 with churn): two calls per step,

  one on the last step to sigma = 0, where the Euler step is kept (Alg. 1 line 7).
  """
  return _karras_ode(denoise_fn, x_T, timesteps, rng, schedule=schedule, heun=True, s_churn=s_churn,
                     s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


def sample_euler_a(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                   schedule: schedules.Schedule, eta: float = 1.0, s_noise: float = 1.0) -> Array:
  """Euler ancestral (k-diffusion's sample_euler_ancestral; Karras et al. 2022, Sec. 4's VE SDE): an Euler

  step down to sigma_down, then noise of sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2.
  """
  def body(x, xs):
    _, t, t_next, key = xs
    sigma, sigma_next = karras_sigma(schedule, t), karras_sigma(schedule, t_next)
    sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    # At least 0: compiled, sigma_next^2 - sigma_up^2 can round below 0 where sigma_up = sigma_next.
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    x = _euler_to(x, _ve_denoised(denoise_fn, x, t, sigma), sigma=sigma, sigma_to=sigma_down)
    return (x + (s_noise * sigma_up) * jax.random.normal(key, x.shape, x.dtype)).astype(x.dtype)
  return _karras_sampler(body, x_T, timesteps, rng, schedule)


# ----------------------------------------------------------------------------------------------------
# Consistency models (Song et al. 2023).


def sample_consistency(denoise_fn: DenoiseFn, x_T: Array, timesteps: Array, rng: Array, *,
                       schedule: schedules.Schedule) -> Array:
  """Song et al. 2023, Alg. 1: x = f(x_T, t_0), then for each later t_i > 0 of the grid re-noise to it,

  x_i = x + sqrt(sigma_i^2 - sigma_min^2) z (Karras's sigma; sigma_min that of schedule.t_min, where f is
  the identity), and x = f(x_i, t_i). f is denoise_fn's x0_hat; one call per step, and with one step
  it is the one-step f(sigma_max z, sigma_max) (x_T / alpha(1) = sqrt(1 + sigma_max^2) z).
  """
  sigma_min = karras_sigma(schedule, jnp.asarray(schedule.t_min))

  def body(x, xs):
    _, t, t_next, key = xs
    x0, _ = denoise_fn(x, t)
    _, alpha_next, _ = noise_level(schedule, t_next)
    sigma_next = karras_sigma(schedule, t_next)
    noise = jax.random.normal(key, x.shape, x.dtype)
    renoised = alpha_next * (x0 + jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_min**2, 0.0)) * noise)
    return jnp.where(t_next > 0, renoised, x0).astype(x.dtype)
  return _scan(body, x_T, timesteps, rng)


# ----------------------------------------------------------------------------------------------------
# Selection by name.

SAMPLERS: dict[str, Callable[..., Array]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "unipc3": sample_unipc3,
    "consistency": sample_consistency,
}

# The grid each sampler takes by default, on a discrete and on a continuous schedule, chosen by
# bench/samplers.py (error against the exact ODE solution on the analytic problem).
# - DDPM and DDIM: "trailing", which starts at t = 1 (Lin et al. 2023) and on a discrete schedule visits
#   trained times only; on a continuous one it is the time-uniform grid of Ho et al. and Song et al.
# - DPM-Solver++ and UniPC: logSNR-uniform (Lu et al. 2022, their choice at low resolution). On the
#   trailing grid the last steps stay a constant size in lambda however many steps are taken, which
#   leaves the multistep solvers near first order (3M at 100 steps: 5e-3 there, 2e-4 logSNR-uniform).
# - Euler, Euler ancestral, Heun: Karras et al.'s rho = 7 grid in sigma, their own choice.
# - Consistency: "trailing", on the EDM process the Karras grid of steps + 1 levels down to sigma = 0
#   (2 steps: sigma 80, 2.5); "karras" would spend the last step at sigma_min, where f is the identity.
# On discrete schedules the last two feed the network times between the trained ones, as the
# DPM-Solver reference code does for discrete-time models.
DEFAULT_GRIDS: dict[str, tuple[str, str]] = {
    "ddpm": ("trailing", "trailing"),
    "ddim": ("trailing", "trailing"),
    "dpmpp_2m": ("logsnr", "logsnr"),
    "dpmpp_3m": ("logsnr", "logsnr"),
    "dpmpp_2m_sde": ("logsnr", "logsnr"),
    "unipc": ("logsnr", "logsnr"),
    "euler": ("karras", "karras"),
    "euler_a": ("karras", "karras"),
    "heun": ("karras", "karras"),
    "unipc3": ("logsnr", "logsnr"),
    "consistency": ("trailing", "trailing"),
}


# Named settings of the Karras et al. 2022 samplers (config.sample.preset). Each replaces
# config.sample.sampler, grid, s_churn, s_tmin, s_tmax and s_noise; the number of steps stays
# config.sample.steps (the paper's: 18 on CIFAR-10, 35 model calls; 256 with edm_stochastic).
# - "edm": Alg. 1, deterministic Heun on the rho = 7 grid of Eq. 5 (Table 1, "Ours").
# - "edm_stochastic": Alg. 2 with the churn settings of the EDM code's ImageNet-64 command for its own
#   trained model (S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003); s_tmin, s_tmax in sigma.
PRESETS: dict[str, dict[str, object]] = {
    "edm": {"sampler": "heun", "grid": "karras", "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None,
            "s_noise": 1.0},
    "edm_stochastic": {"sampler": "heun", "grid": "karras", "s_churn": 40.0, "s_tmin": 0.05,
                       "s_tmax": 50.0, "s_noise": 1.003},
}


def get_sampler(name: str) -> Callable[..., Array]:
  """The sampler named by config.sample.sampler."""
  if name not in SAMPLERS:
    raise ValueError(f"config.sample.sampler={name!r} is not one of {', '.join(SAMPLERS)}.")
  return SAMPLERS[name]


def default_grid(name: str, schedule: schedules.Schedule) -> str:
  """The grid sampler `name` uses unless config.sample.grid names one (see DEFAULT_GRIDS)."""
  get_sampler(name)
  discrete, continuous = DEFAULT_GRIDS[name]
  return discrete if schedule.num_timesteps > 0 else continuous


def num_evaluations(name: str, steps: int) -> int:
  """Model calls of a run of `steps` steps on a grid ending at t = 0 (Heun: two per step but the last)."""
  get_sampler(name)
  return 2 * steps - 1 if name == "heun" else steps


def max_steps(name: str, nfe: int) -> int:
  """The most steps of sampler `name` within nfe model calls (Heun: (nfe + 1) // 2); at least 1."""
  get_sampler(name)
  return max([s for s in range(1, nfe + 1) if num_evaluations(name, s) <= nfe], default=1)


def sample(name: str, denoise_fn: DenoiseFn, x_T: Array, rng: Array, *, schedule: schedules.Schedule,
           steps: int, grid: str | None = None, timesteps: Array | None = None, **options) -> Array:
  """x_0 from x_T with the sampler and grid named by config.sample; jittable, name/steps/grid static.

  timesteps, where given (a grid read from config.sample.grid_file), replaces the named grid.
  """
  sampler = get_sampler(name)
  if timesteps is None:
    timesteps = grids.make_grid(grid or default_grid(name, schedule), schedule, steps)
  elif len(timesteps) != steps + 1:
    raise ValueError(f"a grid of {len(timesteps)} times does not have config.sample.steps={steps} steps.")
  return sampler(denoise_fn, x_T, timesteps, rng, schedule=schedule, **options)
