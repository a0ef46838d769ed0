"""Negative log-likelihood in bits/dim: the probability-flow ODE, and the discrete variational bound.

PF-ODE (Song et al. 2021, Sec. 4.3 and App. D.2): x follows dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat
from t0 to 1, and log p_{t0}(x) = log N(x_1; 0, I) + int div(dx/dt) dt (instantaneous change of
variables, Chen et al. 2018). t0 = schedule.t_min, the smallest time the network was trained at: 1 / T
for a discrete T-step model, 1e-5 in continuous time (where Song et al. train and integrate from); the
network is never asked below it.

The noise left at t0 (sigma0 = sigma(t0), 1.3 pixel levels for DDPM's linear schedule at T = 1000) is
accounted for by a Gaussian encoder q(x | y) = N(alpha0 y, sigma0^2 I) and decoder p(y | x) =
N(x / alpha0, (sigma0 / alpha0)^2 I): the model's density of data y is p(y) = int p_{t0}(x) p(y | x) dx,
and with x = alpha0 y + sigma0 e the ELBO's log p(y | x) - log q(x | y) = D log alpha0 (the |e|^2 and
sigma0 terms cancel), so
  log p(y) >= E_e[log p_{t0}(alpha0 y + sigma0 e)] + D log alpha0,  e ~ N(0, I),
estimated with one e per image; the gap is KL(q(x | y) || p(x | y)). For data of density p_data and the
exact p_{t0}, p(y) is p_data convolved with N(0, sigma0^2 / alpha0^2 I). The divergence is exact (D Jacobian-vector products) or the unbiased
Hutchinson-Skilling estimate eps^T J eps with one Rademacher or Gaussian probe per image, fixed along
the path. The ODE is solved in u = log t, where every schedule here is smooth down to t -> 0 (logSNR ~
-log t), with adaptive Dormand-Prince 5(4) (scipy's RK45, which Song et al. use, rtol = atol = 1e-5) or
fixed-step RK4, each one compiled loop.

Bits/dim of 8-bit images in [-1, 1] (uniform dequantisation, Theis et al. 2016; Song et al. App. D.2):
pixel k in 0..255 becomes y = (k + u) / 128 - 1, u ~ U[0, 1), a bin of width 1 / 128. Then
P(k) = int_bin p(y) dy >= (1/128)^D exp(E_u log p(y)) (Jensen), so
  bpd = (-log p(y) / D + log 128) / log 2,
i.e. -log2 p(y) / D + 7 (score_sde's offset 7 - inverse_scaler(-1) for centred data; 8 for [0, 1]).

Variational bound (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, Sec. 2 and calc_bpd_loop), for
discrete T-step schedules: L_T = KL(q(x_T | x_0) || N(0, I)), L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
p(x_{t-1} | x_t)) for t = 2..T, each at one x_t ~ q(x_t | x_0), and L_0 = -log p(x_0 | x_1) under the
discretised Gaussian decoder (Ho et al. Eq. 13). A bound on -log P(x_0) of the 8-bit image itself, so
no dequantisation and no offset: bpd = sum / (D log 2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import grids
from diffusion import learned_variance
from diffusion import samplers
from diffusion import schedules

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array], tuple[Array, Array]]

DIVERGENCES = ("rademacher", "gaussian", "exact")
SOLVERS = ("dopri5", "rk4")


def _per_example_sum(x: Array) -> Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def dequantize(images: Array, rng: Array) -> Array:
  """Uniform dequantisation of uint8 pixels k to y = (k + u) / 128 - 1 in [-1, 1), u ~ U[0, 1)."""
  u = jax.random.uniform(rng, images.shape, jnp.float32)
  return (images.astype(jnp.float32) + u) / 128.0 - 1.0


def bits_per_dim(log_likelihood: Array, num_dims: int) -> Array:
  """bpd of dequantised 8-bit data in [-1, 1] from its log-density in nats: (-log p / D + log 128) / log 2."""
  return (-log_likelihood / num_dims + math.log(128.0)) / math.log(2.0)


def standard_normal_logpdf(z: Array) -> Array:
  """log N(z; 0, I) per example: the prior at t = 1 (Song et al. 2021, VP SDE prior_logp)."""
  d = math.prod(z.shape[1:])
  return -0.5 * d * math.log(2 * math.pi) - 0.5 * _per_example_sum(jnp.square(z))


def pf_ode_velocity(denoise_fn: DenoiseFn, x: Array, t: Array, *, schedule: schedules.Schedule) -> Array:
  """Song et al. 2021, Eq. 13 for x_t = alpha x0 + sigma eps: dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat.

  With alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda): alpha' = alpha sigma^2 lambda' / 2 and
  sigma' = -sigma alpha^2 lambda' / 2, so dx/dt = lambda'(t) alpha sigma (sigma x0_hat - alpha eps_hat) / 2.
  """
  logsnr, dlogsnr = jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
  x0, eps = denoise_fn(x, t)
  return (0.5 * dlogsnr * alpha * sigma).astype(x.dtype) * (sigma * x0 - alpha * eps).astype(x.dtype)


def exact_divergence(fn: Callable[[Array], Array], x: Array) -> Array:
  """Tr(d fn / dx) per example, from D Jacobian-vector products with the basis vectors.

  fn acts on each example separately, so probing every example with the same e_j gives all diagonals.
  """
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d,) + x.shape[1:])

  def diagonal(e):
    _, jv = jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),))
    return _per_example_sum(jv * e)
  return jnp.sum(lax.map(diagonal, basis, batch_size=min(d, 64)), axis=0)


def hutchinson_probe(rng: Array, shape: tuple[int, ...], kind: str, dtype=jnp.float32) -> Array:
  """Hutchinson 1990 / Skilling 1989 probe: E[eps eps^T] = I, Rademacher or Gaussian."""
  if kind == "rademacher":
    return jax.random.rademacher(rng, shape, dtype)
  if kind == "gaussian":
    return jax.random.normal(rng, shape, dtype)
  raise ValueError(f"divergence={kind!r} is not one of {', '.join(DIVERGENCES)}.")


# ----------------------------------------------------------------------------------------------------
# Explicit Runge-Kutta in one compiled loop: the stages run under fori_loop, so fn appears once.

_RK4 = ([[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]],
        [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0, 0.5, 0.5, 1])

# Dormand & Prince 1980 (scipy's RK45): row 7 is the 5th-order solution (FSAL); E = b5 - b4.
_DOPRI5_A = [
    [0, 0, 0, 0, 0, 0, 0],
    [1 / 5, 0, 0, 0, 0, 0, 0],
    [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
    [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
]
_DOPRI5_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DOPRI5_E = [71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]


def _combine(y, ks, h, weights):
  """y + h sum_i weights_i k_i, leaf by leaf (ks stacked on a leading stage axis)."""
  return jax.tree.map(lambda y_, k_: y_ + h * jnp.tensordot(weights.astype(k_.dtype), k_, axes=1), y, ks)


def _stages(fn, t, y, h, ks, a, c, first: int):
  """Fills ks[first:] with fn(t + c_i h, y + h sum_j a_ij k_j)."""
  def stage(i, ks):
    k = fn(t + c[i] * h, _combine(y, ks, h, a[i]))
    return jax.tree.map(lambda k_, v: k_.at[i].set(v), ks, k)
  return lax.fori_loop(first, a.shape[0], stage, ks)


def _finite(tree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def solve_rk4(fn, y0, t0: float, t1: float, *, num_steps: int) -> tuple[Any, Array, Array]:
  """Classical RK4 with num_steps equal steps from t0 to t1: (y(t1), number of fn calls, y finite)."""
  a, b, c = (jnp.asarray(v, jnp.float32) for v in _RK4)
  h = (t1 - t0) / num_steps

  def step(y, i):
    ks = jax.tree.map(lambda y_: jnp.zeros((4,) + y_.shape, y_.dtype), y)
    ks = _stages(fn, t0 + i * h, y, h, ks, a, c, first=0)
    return _combine(y, ks, h, b), None
  y, _ = lax.scan(step, y0, jnp.arange(num_steps, dtype=jnp.float32))
  return y, jnp.asarray(4 * num_steps), _finite(y)


def _rms(tree) -> Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves) / sum(x.size for x in leaves))


def solve_dopri5(fn, y0, t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5,
                 max_steps: int = 10_000) -> tuple[Any, Array, Array]:
  """Adaptive Dormand-Prince 5(4) as scipy's RK45: RMS error norm over all components, safety 0.9,

  step factors in [0.2, 10], local extrapolation, FSAL. Returns (y, number of fn calls, success):
  success is False when max_steps steps (accepted or not) end before t1, or y is not finite; y is
  then the state at some earlier time and must not be used.
  """
  a, c, e = (jnp.asarray(v, jnp.float32) for v in (_DOPRI5_A, _DOPRI5_C, _DOPRI5_E))
  direction = 1.0 if t1 >= t0 else -1.0
  k0 = fn(jnp.float32(t0), y0)
  scale0 = jax.tree.map(lambda y_: atol + rtol * jnp.abs(y_), y0)
  d0 = _rms(jax.tree.map(jnp.divide, y0, scale0))
  d1 = _rms(jax.tree.map(jnp.divide, k0, scale0))
  h0 = jnp.where((d0 > 1e-5) & (d1 > 1e-5), 0.01 * d0 / d1, 1e-6)  # Hairer et al.'s first guess.
  h0 = jnp.minimum(h0, abs(t1 - t0))

  def cond(carry):
    t, _, _, _, nfe, n = carry
    return (direction * (t1 - t) > 1e-7 * abs(t1 - t0)) & (n < max_steps)

  def body(carry):
    t, y, k_first, h_abs, nfe, n = carry
    h = direction * jnp.minimum(h_abs, direction * (t1 - t))
    ks = jax.tree.map(lambda k_: jnp.zeros((7,) + k_.shape, k_.dtype).at[0].set(k_), k_first)
    ks = _stages(fn, t, y, h, ks, a, c, first=1)
    y_new = _combine(y, ks, h, a[6])
    err = _combine(jax.tree.map(jnp.zeros_like, y), ks, h, e)
    scale = jax.tree.map(lambda p, q: atol + rtol * jnp.maximum(jnp.abs(p), jnp.abs(q)), y, y_new)
    err_norm = _rms(jax.tree.map(jnp.divide, err, scale))
    accept = err_norm <= 1.0
    factor = 0.9 * jnp.where(err_norm > 0, err_norm, 1e-10) ** -0.2
    factor = jnp.where(accept, jnp.clip(factor, 0.2, 10.0), jnp.clip(factor, 0.2, 1.0))
    pick = lambda new, old: jax.tree.map(lambda p, q: jnp.where(accept, p, q), new, old)
    return (jnp.where(accept, t + h, t), pick(y_new, y), pick(jax.tree.map(lambda k_: k_[6], ks), k_first),
            jnp.abs(h) * factor, nfe + 6, n + 1)

  carry = (jnp.float32(t0), y0, k0, h0.astype(jnp.float32), jnp.asarray(1), jnp.asarray(0))
  t, y, _, _, nfe, _ = lax.while_loop(cond, body, carry)
  reached = direction * (t1 - t) <= 1e-7 * abs(t1 - t0)
  return y, nfe, reached & _finite(y)


# ----------------------------------------------------------------------------------------------------
# The probability-flow ODE likelihood.


def ode_end_time(schedule: schedules.Schedule) -> float:
  """1, or where logSNR reaches grids.LOGSNR_MIN on a zero-terminal-SNR schedule (logSNR(1) = -inf)."""
  with jax.ensure_compile_time_eval():  # Concrete even when called under jit.
    if float(schedule.logsnr(1.0)) >= grids.LOGSNR_MIN:
      return 1.0
    return float(schedule.t_from_logsnr(grids.LOGSNR_MIN))


def ode_log_likelihood(denoise_fn: DenoiseFn, x: Array, rng: Array, *, schedule: schedules.Schedule,
                       divergence: str = "rademacher", solver: str = "dopri5", rtol: float = 1e-5,
                       atol: float = 1e-5, num_steps: int = 100, max_steps: int = 10_000,
                       t_start: float | None = None) -> tuple[Array, Array, Array, Array]:
  """(log p_{t0}(x) in nats [B], z = x(1) [B, ...], model calls, success) of x at t0 under the PF-ODE.

  t0 = t_start, by default schedule.t_min. divergence: "rademacher" or "gaussian" (Hutchinson, one
  probe per image from rng) or "exact". solver: "dopri5" (adaptive, rtol/atol, at most max_steps
  steps) or "rk4" (num_steps steps in log t). success is False if the solver did not reach t = 1; the
  log-density is then NaN, never a number from the wrong time. Jittable.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}.")
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r} is not one of {', '.join(SOLVERS)}.")
  t_start = schedule.t_min if t_start is None else t_start
  probe = None if divergence == "exact" else hutchinson_probe(rng, x.shape, divergence, x.dtype)

  def fn(u, state):  # d/du [x, log-density change] in u = log t.
    x_u, _ = state
    t = jnp.exp(u)
    velocity = lambda y: t.astype(y.dtype) * pf_ode_velocity(denoise_fn, y, t, schedule=schedule)
    if probe is None:
      return velocity(x_u), exact_divergence(velocity, x_u)
    v, jv = jax.jvp(velocity, (x_u,), (probe,))
    return v, _per_example_sum(probe * jv)

  state0 = (x, jnp.zeros((x.shape[0],), x.dtype))
  u0, u1 = math.log(t_start), math.log(ode_end_time(schedule))
  if solver == "dopri5":
    (z, delta), nfe, success = solve_dopri5(fn, state0, u0, u1, rtol=rtol, atol=atol, max_steps=max_steps)
  else:
    (z, delta), nfe, success = solve_rk4(fn, state0, u0, u1, num_steps=num_steps)
  logp = jnp.where(success, standard_normal_logpdf(z) + delta, jnp.nan)
  return logp, z, nfe, success


def data_log_likelihood(denoise_fn: DenoiseFn, y: Array, rng: Array, *, schedule: schedules.Schedule,
                        start_noise: bool = True, t_start: float | None = None,
                        **options) -> tuple[Array, Array, Array]:
  """(bound on log p(y) in nats [B], model calls, success) of data y: the module docstring's bound

  log p(y) >= log p_{t0}(alpha0 y + sigma0 e) + D log alpha0 with one e ~ N(0, I) per image, t0 =
  t_start (default schedule.t_min). start_noise=False scores y itself as a sample of p_{t0} instead
  (Song et al. 2021's approximation, exact only as t0 -> 0). options: those of ode_log_likelihood.
  """
  t_start = schedule.t_min if t_start is None else t_start
  noise_rng, probe_rng = jax.random.split(rng)
  x, log_jacobian = y, 0.0
  if start_noise:
    alpha0, sigma0 = (a.astype(y.dtype) for a in schedule.alpha_sigma(jnp.float32(t_start)))
    x = alpha0 * y + sigma0 * jax.random.normal(noise_rng, y.shape, y.dtype)
    log_jacobian = math.prod(y.shape[1:]) * jnp.log(alpha0)
  logp, _, nfe, success = ode_log_likelihood(denoise_fn, x, probe_rng, schedule=schedule, t_start=t_start,
                                             **options)
  return logp + log_jacobian, nfe, success


def ode_bits_per_dim(denoise_fn: DenoiseFn, images: Array, rng: Array, *, schedule: schedules.Schedule,
                     **options) -> tuple[Array, Array, Array]:
  """(bpd [B], model calls, success) of uint8 images [B, H, W, C]: dequantised, then data_log_likelihood

  (options as there); bpd is NaN where the solver failed.
  """
  dequant_rng, ode_rng = jax.random.split(rng)
  y = dequantize(images, dequant_rng)
  logp, nfe, success = data_log_likelihood(denoise_fn, y, ode_rng, schedule=schedule, **options)
  return bits_per_dim(logp, math.prod(images.shape[1:])), nfe, success


# ----------------------------------------------------------------------------------------------------
# The discrete-time variational bound.

normal_kl = learned_variance.normal_kl
discretized_gaussian_log_likelihood = learned_variance.discretized_gaussian_log_likelihood


def vlb_terms(denoise_fn: DenoiseFn, x0: Array, rng: Array, *, schedule: schedules.Schedule,
              variance: str = "small", clip_denoised: bool = True) -> dict[str, Array]:
  """Per-example terms of the bound in nats: {"prior": L_T, "kl": sum_{t=2}^T L_{t-1}, "decoder": L_0}.

  x0 in [-1, 1] on the 8-bit grid; variance "small" (beta-tilde) or "large" (beta), as
  config.sample.ddpm_variance; at t = 1 both use beta-tilde_2 (Nichol & Dhariwal's improved-diffusion,
  as beta-tilde_1 = 0). "learned": the network's (denoise_fn returns (x0_hat, eps_hat, v)), between
  those (learned_variance.interpolated_variance). clip_denoised clips x0_hat to [-1, 1] (their
  calc_bpd_loop default).
  """
  num = schedule.num_timesteps
  if num <= 0:
    raise ValueError("The variational bound needs a discrete schedule (config.diffusion.num_timesteps > 0); "
                     "use the PF-ODE likelihood for continuous-time models.")
  if variance not in samplers.DDPM_VARIANCES:
    raise ValueError(f"variance={variance!r} is not one of {', '.join(samplers.DDPM_VARIANCES)}.")
  t = lambda i: jnp.asarray(i, jnp.float32) / num
  alpha_T, sigma_T = schedule.alpha_sigma(t(num))
  prior = _per_example_sum(normal_kl(mean1=alpha_T * x0, var1=jnp.square(sigma_T) * jnp.ones_like(x0),
                                     mean2=jnp.zeros_like(x0), var2=jnp.ones_like(x0)))
  decoder_var, _ = samplers.ddpm_variances(logsnr_t=schedule.logsnr(t(2)), logsnr_s=schedule.logsnr(t(1)))
  large_1 = jnp.square(schedule.alpha_sigma(t(1))[1])  # beta_1 = 1 - alpha-bar_1.

  def term(i, key):
    alpha, sigma = schedule.alpha_sigma(t(i))
    x_t = alpha * x0 + sigma * jax.random.normal(key, x0.shape, x0.dtype)
    out = denoise_fn(x_t, t(i))
    x0_hat = out[0]
    if clip_denoised:
      x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    logsnr_t, logsnr_s = schedule.logsnr(t(i)), schedule.logsnr(t(i - 1))
    small, large = samplers.ddpm_variances(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    mean_q = samplers.ddpm_posterior_mean(x0=x0, x_t=x_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    mean_p = samplers.ddpm_posterior_mean(x0=x0_hat, x_t=x_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    var_p, var_0 = small if variance == "small" else large, decoder_var
    if variance == "learned":
      var_p = learned_variance.interpolated_variance(v=out[2], small=small, large=large)
      var_0 = learned_variance.interpolated_variance(v=out[2], small=decoder_var, large=large_1)
    kl = _per_example_sum(normal_kl(mean1=mean_q, var1=small * jnp.ones_like(x0), mean2=mean_p,
                                    var2=var_p * jnp.ones_like(x0)))
    # At t = 1 the posterior mean is x0_hat itself (alpha-bar_0 = 1); logSNR(0) = inf is avoided.
    nll0 = -_per_example_sum(discretized_gaussian_log_likelihood(x0, mean=x0_hat,
                                                                 var=var_0 * jnp.ones_like(x0)))
    return jnp.where(i > 1, kl, 0.0), jnp.where(i == 1, nll0, 0.0)

  def body(acc, i):
    kl, nll0 = term(i, jax.random.fold_in(rng, i))
    return (acc[0] + kl, acc[1] + nll0), None
  zeros = jnp.zeros((x0.shape[0],), jnp.float32)
  (kl, decoder), _ = lax.scan(body, (zeros, zeros), jnp.arange(1, num + 1))
  return {"prior": prior, "kl": kl, "decoder": decoder}


def vlb_bits_per_dim(denoise_fn: DenoiseFn, images: Array, rng: Array, *, schedule: schedules.Schedule,
                     variance: str = "small", clip_denoised: bool = True) -> dict[str, Array]:
  """The bound in bits/dim of uint8 images [B, H, W, C]: {"bpd", "prior_bpd", "kl_bpd", "decoder_bpd"}."""
  x0 = images.astype(jnp.float32) / 127.5 - 1.0
  terms = vlb_terms(denoise_fn, x0, rng, schedule=schedule, variance=variance, clip_denoised=clip_denoised)
  scale = 1.0 / (math.prod(images.shape[1:]) * math.log(2.0))
  out = {f"{k}_bpd": v * scale for k, v in terms.items()}
  out["bpd"] = sum(terms.values()) * scale
  return out
