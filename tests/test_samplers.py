"""Samplers, grids, guidance and inpainting against an analytic denoiser.

The data is a mixture of isotropic Gaussians in 2-D, so E[x0 | x_t] under x_t = alpha x0 + sigma eps
is known in closed form, and the probability-flow ODE can be solved to 1e-10 with SciPy (DOP853,
float64) from the same starting noise.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import functools  # pylint: disable=g-import-not-at-top
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.integrate import quad
from scipy.integrate import solve_ivp
from scipy.stats import norm

from diffusion import grids
from diffusion import guidance
from diffusion import inpaint
from diffusion import samplers
from diffusion import schedules

# The mixture: weights, means [K, 2], standard deviations (isotropic) of its components.
W = np.array([0.5, 0.3, 0.2])
MU = np.array([[-1.5, -1.0], [1.5, 1.0], [0.5, -1.5]])
S = np.array([0.3, 0.5, 0.2])
K = len(W)
NULL = K  # The null label: the whole mixture; label k < K: component k alone.


def posterior(x, alpha, sigma, *, weights=W, xp=jnp):
  """(E[x0 | x_t], E[eps | x_t]) of the mixture; weights [K] or per example [B, K]."""
  v = alpha**2 * S**2 + sigma**2  # Variance of x_t per component.
  diff = x[..., None, :] - alpha * MU  # [..., K, 2]
  with np.errstate(divide="ignore"):
    logr = xp.log(weights) - xp.log(v) - 0.5 * xp.sum(diff**2, -1) / v
  r = xp.exp(logr - logr.max(-1, keepdims=True))
  r = r / r.sum(-1, keepdims=True)
  x0 = xp.sum(r[..., None] * (MU + (alpha * S**2 / v)[:, None] * diff), -2)
  eps = xp.sum(r[..., None] * ((sigma / v)[:, None] * diff), -2)
  return x0, eps


def analytic_denoise_fn(schedule):
  def denoise_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    x0, eps = posterior(x, alpha.astype(x.dtype), sigma.astype(x.dtype))
    return x0.astype(x.dtype), eps.astype(x.dtype)
  return denoise_fn


def null(labels):
  """The unconditional half of classifier-free guidance: every label the null class."""
  return {"label": jnp.full_like(labels, NULL)}


def analytic_apply_fn(schedule, prediction):
  """A "network" apply_fn(x, model_time, cond) giving the exact eps, x0 or v of the (class) mixture."""
  def apply_fn(x, model_time, cond):
    labels = None if cond is None else cond["label"]
    alpha, sigma = schedule.alpha_sigma(model_time[0] / 1000.0)
    alpha, sigma = alpha.astype(x.dtype), sigma.astype(x.dtype)
    weights = W if labels is None else jnp.where((labels == NULL)[:, None], W, jax.nn.one_hot(labels, K))
    x0, eps = posterior(x, alpha, sigma, weights=weights)
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
  return apply_fn


def ode_reference(x_T, *, logsnr_start, logsnr_end):
  """x at logsnr_end (inf: data) on the probability-flow ODE from x_T at logsnr_start, in float64.

  Solved in Karras et al.'s variables: u = log(sigma / alpha), y = x / alpha, dy / du = sigma~ eps_hat.
  """
  x_T = np.asarray(x_T, np.float64)
  alpha_of = lambda u: 1.0 / np.sqrt(1.0 + np.exp(2 * u))
  u0 = -0.5 * logsnr_start
  u1 = np.log(1e-6) if np.isinf(logsnr_end) else -0.5 * logsnr_end

  def f(u, y):
    a = alpha_of(u)
    _, eps = posterior(a * y.reshape(x_T.shape), a, a * np.exp(u), xp=np)
    return (np.exp(u) * eps).ravel()

  sol = solve_ivp(f, (u0, u1), (x_T / alpha_of(u0)).ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
  assert sol.success
  a = alpha_of(u1)
  y = sol.y[:, -1].reshape(x_T.shape)
  if np.isinf(logsnr_end):  # At sigma~ = 1e-6 one exact denoising step is 1e-12 from the data.
    return posterior(a * y, a, a * 1e-6, xp=np)[0]
  return a * y


def mixture_stats(x):
  """Weights, means and (per-coordinate) spreads of the components, assigning points by likelihood."""
  x = np.asarray(x, np.float64)
  loglik = np.log(W) - 2 * np.log(S) - 0.5 * ((x[:, None, :] - MU) ** 2).sum(-1) / S**2
  k = loglik.argmax(-1)
  weights = np.bincount(k, minlength=K) / len(x)
  means = np.stack([x[k == j].mean(0) for j in range(K)])
  spreads = np.array([np.sqrt(((x[k == j] - means[j]) ** 2).mean()) for j in range(K)])
  return weights, means, spreads


DISCRETE = schedules.create_schedule(schedule="linear", num_timesteps=1000)
CONTINUOUS = schedules.create_schedule(schedule="linear", num_timesteps=0)
COSINE = schedules.create_schedule(schedule="cosine", num_timesteps=0)
ALL_SCHEDULES = {
    "discrete_linear": DISCRETE,
    "discrete_cosine": schedules.create_schedule(schedule="cosine", num_timesteps=1000),
    "discrete_ztsnr": schedules.create_schedule(schedule="linear", num_timesteps=1000,
                                                zero_terminal_snr=True),
    "continuous_linear": CONTINUOUS,
    "continuous_cosine": COSINE,
}


def _run(name, schedule, x_T, *, steps, seed=1, grid=None, denoise_fn=None, **options):
  denoise_fn = denoise_fn or analytic_denoise_fn(schedule)
  fn = jax.jit(lambda x, rng: samplers.sample(name, denoise_fn, x, rng, schedule=schedule, steps=steps,
                                              grid=grid, **options))
  return np.asarray(fn(x_T, jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------------
# Names and grids.


def test_unknown_names_are_refused_with_the_allowed_values():
  x = jnp.zeros((2, 2))
  allowed = "ddpm, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc, euler, euler_a, heun."
  with pytest.raises(ValueError, match=r"^config\.sample\.sampler='dpm\+\+' is not one of " + allowed):
    samplers.sample("dpm++", analytic_denoise_fn(DISCRETE), x, jax.random.key(0), schedule=DISCRETE, steps=4)
  with pytest.raises(ValueError, match=r"config.sample.grid='uniform' is not one of leading, trailing, "):
    grids.make_grid("uniform", DISCRETE, 4)
  with pytest.raises(ValueError, match="needs a discrete schedule"):
    grids.make_grid("leading", CONTINUOUS, 4)
  with pytest.raises(ValueError, match="for inpainting"):
    inpaint.inpaint("heun", analytic_denoise_fn(DISCRETE), x, jax.random.key(0), known=x, mask=x,
                    schedule=DISCRETE, steps=4)
  assert set(samplers.SAMPLERS) == set(samplers.DEFAULT_GRIDS)


@pytest.mark.parametrize("schedule_name", sorted(ALL_SCHEDULES))
@pytest.mark.parametrize("grid", sorted(grids.GRIDS))
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_grids_are_decreasing_from_t_max_to_zero(schedule_name, grid, steps):
  schedule = ALL_SCHEDULES[schedule_name]
  if grid in ("leading", "linspace") and not schedule.num_timesteps:
    pytest.skip("discrete spacing")
  t = np.asarray(grids.make_grid(grid, schedule, steps))
  assert t.shape == (steps + 1,)
  assert np.all(np.diff(t) < 0), t
  assert t[-1] == 0.0 and t[-2] > 0.0 and t[0] <= 1.0
  if grid != "leading" and (grid != "linspace" or steps > 1):  # linspace(0, T - 1, 1) is [0].
    assert t[0] == pytest.approx(1.0)
  if grid in ("logsnr", "karras") and steps > 1:
    assert t[-2] == pytest.approx(schedule.t_min)
  if grid in ("leading", "trailing", "linspace") and schedule.num_timesteps:
    np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-6)  # Trained times only.


def test_discrete_grids_match_diffusers_spacings():
  # diffusers' timestep index k is our time (k + 1) / T.
  np.testing.assert_allclose(grids.make_grid("trailing", DISCRETE, 10),
                             np.r_[np.arange(999, 0, -100) + 1, 0] / 1000)
  np.testing.assert_allclose(grids.make_grid("leading", DISCRETE, 10),
                             np.r_[np.arange(900, -1, -100) + 1, 0] / 1000)
  np.testing.assert_allclose(grids.make_grid("linspace", DISCRETE, 4), np.r_[1000, 667, 334, 1, 0] / 1000)
  np.testing.assert_allclose(grids.make_grid("trailing", CONTINUOUS, 4), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_karras_and_logsnr_grids_are_uniform_in_their_variables():
  t = grids.make_grid("karras", CONTINUOUS, 12)[:-1]
  sigma = np.exp(-0.5 * np.asarray(CONTINUOUS.logsnr(t), np.float64))
  np.testing.assert_allclose(np.diff(sigma ** (1 / 7)), np.diff(sigma ** (1 / 7))[0], rtol=1e-3)
  t = grids.make_grid("logsnr", COSINE, 12)[:-1]
  np.testing.assert_allclose(np.diff(COSINE.logsnr(t)), np.diff(COSINE.logsnr(t))[0], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------
# Convergence of the deterministic samplers to the probability-flow ODE.

ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}
ORDER_STEPS = (32, 64, 128, 256)


@functools.lru_cache(maxsize=None)
def _order_problem():
  """x_T, the float64 grid end t_min (logSNR 4) and the ODE solution there."""
  with jax.enable_x64(True):
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2), jnp.float64))
    t_min = float(CONTINUOUS.t_from_logsnr(4.0))
    ref = ode_reference(x_T, logsnr_start=float(CONTINUOUS.logsnr(1.0)),
                        logsnr_end=float(CONTINUOUS.logsnr(t_min)))
  return x_T, t_min, ref


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_deterministic_samplers_converge_at_their_order(name):
  """Error against the ODE on logSNR-uniform grids from t = 1 to logSNR 4, in float64.

  The grids stop short of t = 0 (where the last step is a jump to the data), so the error is the
  solver's own. lower_order_final is off: a first-order last step would cap the order at 2. The
  median over 64 starting points leaves out the odd point that sits on a ridge between modes.
  """
  x_T, t_min, ref = _order_problem()
  options = {"lower_order_final": False} if name in ("dpmpp_2m", "dpmpp_3m", "unipc") else {}
  errors = []
  with jax.enable_x64(True):
    denoise_fn = analytic_denoise_fn(CONTINUOUS)
    run = jax.jit(lambda x, t: samplers.SAMPLERS[name](denoise_fn, x, t, jax.random.key(0),
                                                       schedule=CONTINUOUS, **options))
    for steps in ORDER_STEPS:
      t = grids.logsnr_grid(schedule=CONTINUOUS, steps=steps + 1, t_min=t_min)[:-1]
      assert t.dtype == jnp.float64
      out = np.asarray(run(jnp.asarray(x_T), t))
      errors.append(np.median(np.linalg.norm(out - ref, axis=-1)))
  slope = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
  assert abs(slope - ORDERS[name]) <= 0.3, (name, slope, errors)
  assert errors[-1] < 0.01


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_runs_every_parameterisation(name):
  """eps, x0 and v networks give the same samples (same noise); the ODE samplers reach the ODE's data."""
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  outs = {}
  for prediction in ("eps", "x0", "v"):
    denoise_fn = guidance.make_denoise_fn(analytic_apply_fn(DISCRETE, prediction), schedule=DISCRETE,
                                          prediction=prediction)
    outs[prediction] = _run(name, DISCRETE, x_T, steps=50, denoise_fn=denoise_fn)
  assert np.all(np.isfinite(outs["eps"]))
  np.testing.assert_allclose(outs["x0"], outs["eps"], atol=2e-3)
  np.testing.assert_allclose(outs["v"], outs["eps"], atol=2e-3)
  if name in ORDERS:
    ref = ode_reference(x_T, logsnr_start=float(DISCRETE.logsnr(1.0)), logsnr_end=np.inf)
    assert np.median(np.linalg.norm(outs["eps"] - ref, axis=-1)) < 0.05


def test_zero_terminal_snr_start():
  """alpha(1) = 0 (Lin et al. 2023) with a v network: every sampler stays finite (logSNR is clipped at
  grids.LOGSNR_MIN) and the ODE solvers reach the ODE's data from that clipped start."""
  schedule = ALL_SCHEDULES["discrete_ztsnr"]
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  denoise_fn = guidance.make_denoise_fn(analytic_apply_fn(schedule, "v"), schedule=schedule, prediction="v")
  ref = ode_reference(x_T, logsnr_start=grids.LOGSNR_MIN, logsnr_end=np.inf)
  for name in samplers.SAMPLERS:
    out = _run(name, schedule, x_T, steps=50, denoise_fn=denoise_fn)
    assert np.all(np.isfinite(out)), name
    if name in ("dpmpp_2m", "dpmpp_3m", "unipc", "heun", "ddim"):
      assert np.median(np.linalg.norm(out - ref, axis=-1)) < 0.06, name


# ----------------------------------------------------------------------------------------------------
# Coefficients of the exponential integrators in float32, against float64 quadrature.

SMALL_STEPS = np.geomspace(1e-4, 1.0, 9)


def _phi_reference(k, z):
  """phi_k(z) = int_0^1 e^((1 - s) z) s^(k-1) / (k-1)! ds by quadrature, in float64."""
  f = lambda s: np.exp((1 - s) * z) * s ** (k - 1) / math.factorial(k - 1)
  return quad(f, 0.0, 1.0, epsabs=0.0, epsrel=1e-13)[0]


def test_phi_functions_keep_float32_precision_for_small_steps():
  for h in list(SMALL_STEPS) + [1.5, 2.0, 5.0]:
    for k in (1, 2, 3, 4):
      got = float(samplers.phi(k, jnp.float32(-h)))
      assert got == pytest.approx(_phi_reference(k, -h), rel=1e-6), (k, h)


def test_dpmpp_3m_and_unipc_coefficients_keep_float32_precision():
  """Lu et al. 2022b's phi_2, phi_3 and Zhao et al. 2023's rhos (their R rhos = b) at h = 1e-4 .. 1;

  with the recursion from expm1, float32 gave UniC-2 rhos [0.27, 0.23] at h = 1e-3 against [0.083, 0.417].
  """
  for h in SMALL_STEPS:
    phis = samplers.dpmpp_3m_coefficients(jnp.float32(h))
    expected = (math.expm1(-h), h * _phi_reference(2, -h), -h * _phi_reference(3, -h))
    np.testing.assert_allclose(np.asarray(phis, np.float64), expected, rtol=1e-5, err_msg=f"h={h}")
    for rks in ([-1.0, 1.0], [-1.0, -2.0, 1.0], [-0.7, -1.9, 1.0]):  # UniC-2, UniC-3 (uniform, not).
      r, b = samplers.unipc_coefficients(rks=[jnp.float32(v) for v in rks], h=jnp.float32(h))
      rhos = np.linalg.solve(np.asarray(r, np.float64), np.asarray(b, np.float64))
      r_ref = np.stack([np.asarray(rks) ** i for i in range(len(rks))])
      b_ref = [math.factorial(i) * _phi_reference(i + 1, -h) / _phi_reference(1, -h)
               for i in range(1, len(rks) + 1)]
      np.testing.assert_allclose(np.asarray(b, np.float64), b_ref, rtol=1e-5, err_msg=f"h={h}")
      np.testing.assert_allclose(rhos, np.linalg.solve(r_ref, b_ref), rtol=1e-4, atol=1e-5,
                                 err_msg=f"h={h}, rks={rks}")


# ----------------------------------------------------------------------------------------------------
# Stochastic samplers reproduce the data distribution.

STOCHASTIC = [("ddpm", DISCRETE, {}), ("ddpm", DISCRETE, {"variance": "large"}),
              ("ddim", DISCRETE, {"eta": 1.0}), ("euler_a", COSINE, {}), ("dpmpp_2m_sde", COSINE, {}),
              ("heun", COSINE, {"s_churn": 40.0})]


@pytest.mark.parametrize("name,schedule,options", STOCHASTIC,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, _, o in STOCHASTIC])
def test_stochastic_samplers_reproduce_the_mixture(name, schedule, options):
  """4000 points at 250 steps: weights within 0.03, means within 0.06, spreads within 8%."""
  x_T = jax.random.normal(jax.random.key(0), (4000, 2))
  weights, means, spreads = mixture_stats(_run(name, schedule, x_T, steps=250, **options))
  np.testing.assert_allclose(weights, W, atol=0.03)
  np.testing.assert_allclose(means, MU, atol=0.06)
  np.testing.assert_allclose(spreads, S, rtol=0.08)


def test_ddim_eta_one_is_ddpm_with_the_same_noise():
  """Equal up to rounding: 1e-10 in float64; in float32 a few 1e-5 after 20 steps of amplification."""
  cases = ((jnp.float64, 1e-10, DISCRETE, "leading"), (jnp.float64, 1e-10, COSINE, "logsnr"),
           (jnp.float32, 1e-4, DISCRETE, "trailing"))
  for dtype, atol, schedule, grid in cases:
    with jax.enable_x64(dtype == jnp.float64):
      x_T = jax.random.normal(jax.random.key(0), (256, 2), dtype)
      ddim = _run("ddim", schedule, x_T, steps=20, grid=grid, eta=1.0)
      ddpm = _run("ddpm", schedule, x_T, steps=20, grid=grid)
      assert ddim.dtype == dtype
      np.testing.assert_allclose(ddim, ddpm, atol=atol)
  assert not np.allclose(ddim, _run("ddpm", DISCRETE, x_T, steps=20, grid="trailing", seed=2), atol=1e-2)


def test_euler_is_ddim_in_sigma_space():
  """Euler in sigma = sigma_t / alpha_t on x / alpha_t is DDIM (Karras et al. 2022, Sec. 3)."""
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  for grid in ("karras", "trailing"):
    np.testing.assert_allclose(_run("euler", DISCRETE, x_T, steps=20, grid=grid),
                               _run("ddim", DISCRETE, x_T, steps=20, grid=grid), atol=1e-4)


def test_heun_calls_the_model_twice_per_step_but_the_last():
  calls = []

  def counting_denoise_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return analytic_denoise_fn(DISCRETE)(x, t)

  x_T = jax.random.normal(jax.random.key(0), (4, 2))
  for name in ("heun", "dpmpp_3m", "unipc"):
    calls.clear()
    jax.block_until_ready(_run(name, DISCRETE, x_T, steps=10, denoise_fn=counting_denoise_fn))
    jax.effects_barrier()
    assert len(calls) == samplers.num_evaluations(name, 10), name


# ----------------------------------------------------------------------------------------------------
# Guidance.


def test_guidance_scale_one_is_conditional_sampling_and_zero_unconditional():
  labels = jnp.arange(64) % K
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  apply_fn = analytic_apply_fn(DISCRETE, "eps")
  shapes = []

  def counting_apply_fn(x, model_time, cond):
    shapes.append(x.shape)
    return apply_fn(x, model_time, cond)

  def make(**kwargs):
    return guidance.make_denoise_fn(counting_apply_fn, schedule=DISCRETE, prediction="eps", **kwargs)

  cond = _run("dpmpp_2m", DISCRETE, x_T, steps=20, denoise_fn=make(cond={'label': labels}))
  assert shapes[-1] == (64, 2)  # A Python w = 1 runs the conditional half only.
  # A traced w = 1 runs the guided path: one forward pass of the doubled batch.
  cfg = _run("dpmpp_2m", DISCRETE, x_T, steps=20,
             denoise_fn=make(cond={'label': labels}, uncond=null(labels), guidance_scale=jnp.float32(1.0)))
  assert shapes[-1] == (128, 2)
  np.testing.assert_allclose(cfg, cond, atol=1e-5)
  uncond = _run("dpmpp_2m", DISCRETE, x_T, steps=20, denoise_fn=make(cond={'label': jnp.full((64,), NULL)}))
  cfg0 = _run("dpmpp_2m", DISCRETE, x_T, steps=20,
              denoise_fn=make(cond={'label': labels}, uncond=null(labels), guidance_scale=0.0))
  np.testing.assert_allclose(cfg0, uncond, atol=1e-5)
  # Conditional samples come from their class's component.
  np.testing.assert_allclose([cond[np.asarray(labels) == k].mean(0) for k in range(K)], MU, atol=0.25)
  with pytest.raises(ValueError, match="null label"):
    make(cond={'label': labels}, guidance_scale=3.0)


def test_guidance_mixes_conditional_and_unconditional_predictions():
  """One call of the guided denoise_fn: x0 and eps are uncond + w (cond - uncond), any parameterisation;

  the rescale (phi) acts on x0_hat, whatever the network predicts (tests/test_guidance.py).
  """
  labels = jnp.array([0, 1, 2, 1])
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t = jnp.float32(0.4)
  apply_fn = analytic_apply_fn(DISCRETE, "v")
  make = lambda **kw: guidance.make_denoise_fn(apply_fn, schedule=DISCRETE, prediction="v", **kw)
  cond = make(cond={'label': labels})(x, t)
  uncond = make(cond={'label': jnp.full((4,), NULL)})(x, t)
  guided = make(cond={'label': labels}, uncond=null(labels), guidance_scale=3.0)(x, t)
  for c, u, g in zip(cond, uncond, guided):
    np.testing.assert_allclose(g, u + 3.0 * (c - u), atol=1e-5)
  rescaled = make(cond={'label': labels}, uncond=null(labels), guidance_scale=3.0, guidance_rescale=0.7)(x, t)
  alpha, sigma = DISCRETE.alpha_sigma(t)
  x0 = guidance.rescale_guidance(guided=guided[0], cond=cond[0], phi=0.7)
  np.testing.assert_allclose(rescaled[0], x0, atol=1e-5)
  np.testing.assert_allclose(alpha * rescaled[0] + sigma * rescaled[1], x, atol=1e-5)
  assert not np.allclose(rescaled[0], guided[0], atol=1e-3)
  # Dynamic thresholding clips x0 and keeps (x0, eps) consistent with x_t.
  x0, eps = make(cond={'label': labels}, uncond=null(labels), guidance_scale=3.0, dynamic_threshold=0.5)(4.0 * x, t)
  assert float(jnp.abs(x0).max()) <= 1.0 + 1e-6
  np.testing.assert_allclose(alpha * x0 + sigma * eps, 4.0 * x, atol=1e-5)
  # Static clipping (DDPM's clip_denoised): x0 clipped to [-1, 1], eps consistent with x_t.
  unclipped = make(cond={'label': labels}, uncond=null(labels), guidance_scale=3.0)(4.0 * x, t)[0]
  assert float(jnp.abs(unclipped).max()) > 1.0
  x0, eps = make(cond={'label': labels}, uncond=null(labels), guidance_scale=3.0, clip_x0=True)(4.0 * x, t)
  np.testing.assert_allclose(x0, jnp.clip(unclipped, -1.0, 1.0), atol=1e-6)
  np.testing.assert_allclose(alpha * x0 + sigma * eps, 4.0 * x, atol=1e-5)


def test_rescale_and_dynamic_threshold_formulas():
  cond = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  guided = 4.0 * cond + 1.0
  full = guidance.rescale_guidance(guided=guided, cond=cond, phi=1.0)
  np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(cond, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(guidance.rescale_guidance(guided=guided, cond=cond, phi=0.0), guided)
  x0 = jnp.stack([jnp.linspace(-0.5, 0.5, 64), jnp.linspace(-3.0, 3.0, 64)]).reshape(2, 8, 8)
  out = guidance.dynamic_threshold(x0, percentile=0.9)
  np.testing.assert_allclose(out[0], x0[0], atol=1e-6)  # Within [-1, 1]: s = 1, untouched.
  s = np.quantile(np.abs(np.asarray(x0[1])), 0.9)
  np.testing.assert_allclose(out[1], np.clip(x0[1], -s, s) / s, atol=1e-6)
  assert float(jnp.abs(out[1]).max()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# One compiled program, any sharding.


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_compiled_program_does_not_grow_with_steps(name):
  x_T = jax.ShapeDtypeStruct((8, 2), jnp.float32)
  denoise_fn = analytic_denoise_fn(DISCRETE)
  size = {}
  for steps in (10, 50):
    fn = jax.jit(lambda x, rng: samplers.sample(name, denoise_fn, x, rng, schedule=DISCRETE, steps=steps))
    size[steps] = len(fn.lower(x_T, jax.random.key(0)).as_text())
  assert size[50] < 1.05 * size[10], size


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_3m", "unipc", "heun"])
def test_sharded_batch_gives_the_unsharded_samples(name):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  denoise_fn = analytic_denoise_fn(CONTINUOUS)
  fn = lambda x, rng: samplers.sample(name, denoise_fn, x, rng, schedule=CONTINUOUS, steps=12)
  unsharded = np.asarray(jax.jit(fn)(x_T, jax.random.key(1)))
  sharding = NamedSharding(mesh, P("data"))
  out = jax.jit(fn, out_shardings=sharding)(jax.device_put(x_T, sharding), jax.random.key(1))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), unsharded, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Inpainting.


def test_inpainting_keeps_the_known_region():
  x_T = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
  known = jax.random.uniform(jax.random.key(1), (4, 8, 8, 2), minval=-1, maxval=1)
  mask = jnp.zeros((1, 8, 8, 1)).at[:, :, :4].set(1.0)

  def denoise_fn(x, t):  # Any denoiser: the known region must come out exact regardless.
    _, sigma = DISCRETE.alpha_sigma(t)
    return jnp.zeros_like(x), x / sigma

  for name, options, resample, jump in (("ddpm", {}, 3, 2), ("ddim", {"eta": 0.0}, 1, 1)):
    out = jax.jit(lambda x, rng: inpaint.inpaint(name, denoise_fn, x, rng, known=known, mask=mask,
                                                 schedule=DISCRETE, steps=10, resample=resample,
                                                 jump_length=jump, **options))(x_T, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(out)[:, :, :4], np.asarray(known)[:, :, :4])
    assert np.all(np.isfinite(out)) and not np.allclose(out[:, :, 4:], known[:, :, 4:])


def test_repaint_schedule():
  levels = inpaint.repaint_levels(steps=6, resample=3, jump_length=2)
  assert levels[0] == 6 and levels[-1] == 0
  assert np.all(np.isin(np.diff(levels), [-1, 2]))
  assert np.sum(np.diff(levels) == 2) == 2 * 2  # Jumps at levels 1 and 3, twice each.
  np.testing.assert_array_equal(inpaint.repaint_levels(steps=4, resample=1, jump_length=1), [4, 3, 2, 1, 0])


def test_inpainting_samples_the_conditional():
  """x[0] = 1.5 known: x[1] | x[0] is (to 1e-5) component 1's N(1.0, 0.5^2). RePaint's resampling

  harmonises the regions and lands within 0.1 of its mean and spread; plain replacement (resample = 1)
  commits too early at high noise (Lugmayr et al. 2022, Sec. 4.2) and misses it.
  """
  n, a = 4000, 1.5
  logw = np.log(W) + norm.logpdf(a, MU[:, 0], S)
  w = np.exp(logw - logw.max())
  w /= w.sum()
  mean = (w * MU[:, 1]).sum()
  std = np.sqrt((w * (S**2 + MU[:, 1] ** 2)).sum() - mean**2)
  known = jnp.broadcast_to(jnp.array([a, 0.0]), (n, 2))
  mask = jnp.array([1.0, 0.0])
  x_T = jax.random.normal(jax.random.key(0), (n, 2))

  def run(steps, resample):
    return np.asarray(jax.jit(lambda x, rng: inpaint.inpaint(
        "ddpm", analytic_denoise_fn(DISCRETE), x, rng, known=known, mask=mask, schedule=DISCRETE,
        steps=steps, resample=resample))(x_T, jax.random.key(1)))

  out = run(25, 40)
  np.testing.assert_array_equal(out[:, 0], a)
  assert abs(out[:, 1].mean() - mean) < 0.1 and abs(out[:, 1].std() - std) < 0.1
  plain = run(100, 1)
  assert abs(plain[:, 1].mean() - mean) > 0.3
