"""NLL on Gaussian data, whose log-density and exact denoiser E[x0 | x_t] are known in closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import schedules
from evaluation import likelihood

SHAPE = (2, 2, 3)
D = 12


class Gaussian:
  """x0 ~ N(mu, cov) with a full covariance, so the ODE's Jacobian is neither diagonal nor isotropic."""

  def __init__(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D, D))
    self.cov = 0.25 * a @ a.T / D + 0.02 * np.eye(D)
    self.mu = rng.normal(0.0, 0.2, D)
    lam, q = np.linalg.eigh(self.cov)
    self._lam, self._q = jnp.asarray(lam, jnp.float32), jnp.asarray(q, jnp.float32)
    self._rng = rng

  def sample(self, n: int) -> np.ndarray:
    x = self.mu + self._rng.normal(size=(n, D)) @ np.linalg.cholesky(self.cov).T
    return x.reshape((n,) + SHAPE).astype(np.float32)

  def logpdf(self, x, alpha: float = 1.0, sigma: float = 0.0) -> np.ndarray:
    """log p_t(x) of x_t = alpha x0 + sigma eps: N(alpha mu, alpha^2 cov + sigma^2 I); the data at t = 0."""
    cov = alpha**2 * self.cov + sigma**2 * np.eye(D)
    return stats.multivariate_normal(alpha * self.mu, cov).logpdf(np.asarray(x, np.float64).reshape(len(x), D))

  def denoiser(self, schedule):
    """E[x0 | x_t] = mu + cov alpha (alpha^2 cov + sigma^2 I)^-1 (x_t - alpha mu), and eps from it."""
    mu = jnp.asarray(self.mu, jnp.float32)

    def denoise_fn(x, t):
      alpha, sigma = schedule.alpha_sigma(t)
      gain = alpha * self._lam / (alpha**2 * self._lam + sigma**2)
      flat = x.reshape(x.shape[0], -1) - alpha * mu
      x0 = (mu + ((flat @ self._q) * gain) @ self._q.T).reshape(x.shape)
      return x0, (x - alpha * x0) / sigma
    return denoise_fn


SCHEDULES = {
    "discrete_linear": lambda: schedules.create_schedule(schedule="linear", num_timesteps=1000),
    "continuous_cosine": lambda: schedules.create_schedule(schedule="cosine", num_timesteps=0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_pf_ode_with_exact_trace_matches_the_closed_form(name):
  """log p_{t0}(x) at the ODE's start t0 = schedule.t_min (1e-3 discrete, 1e-5 continuous)."""
  schedule, gaussian = SCHEDULES[name](), Gaussian(0)
  x = gaussian.sample(4)
  fn = jax.jit(lambda x: likelihood.ode_log_likelihood(gaussian.denoiser(schedule), x, jax.random.key(0),
                                                       schedule=schedule, divergence="exact"))
  logp, z, nfe, success = fn(x)
  assert bool(success)
  ours = likelihood.bits_per_dim(np.asarray(logp, np.float64), D)
  alpha0, sigma0 = (float(a) for a in schedule.alpha_sigma(schedule.t_min))
  exact = likelihood.bits_per_dim(gaussian.logpdf(x, alpha0, sigma0), D)
  np.testing.assert_allclose(ours, exact, atol=1e-2)
  assert 20 < int(nfe) < 2000
  assert abs(float(np.std(z)) - 1.0) < 0.5  # x(1) is (close to) prior noise.


# Data N(MU, S^2) per dimension at the scale of a few pixel levels (2 / 255 apart), where the noise left
# at t = 1e-3 (sigma0 = 0.01 for DDPM's linear schedule) matters.
MU, S, SMALL_SHAPE = 0.1, 0.02, (1, 1, 2)


def _restricted_denoiser(schedule, t_train):
  """The exact E[x0 | x_t] of N(MU, S^2) data for t >= t_train, where a model is trained; a wrong one

  (the data mean, whatever x_t) below, where it never was."""
  def denoise_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    exact = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
    x0 = jnp.where(t >= t_train * (1 - 1e-6), exact, jnp.full_like(x, MU))
    return x0, (x - alpha * x0) / sigma
  return denoise_fn


def _normal_logpdf(x, mean, var):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var, axis=1)


# Tighter than the default 1e-5: log alpha-bar of a discrete schedule is piecewise linear in t, and the
# kinks at every i / T cost dopri5 about 0.02 nats per image at 1e-5 here.
TIGHT = dict(rtol=1e-7, atol=1e-7)


def test_ode_starts_at_the_first_trained_time():
  """Integrated from schedule.t_min (1 / T), a model exact where it was trained gives log p_{t_min} in

  closed form; from 1e-5 (where the ODE used to start) the untrained times move it by nats per dim."""
  schedule = SCHEDULES["discrete_linear"]()
  t0 = schedule.t_min
  assert t0 == pytest.approx(1e-3)
  alpha0, sigma0 = (float(a) for a in schedule.alpha_sigma(t0))
  denoise_fn = _restricted_denoiser(schedule, t0)
  x = alpha0 * (MU + S * np.random.default_rng(0).normal(size=(16,) + SMALL_SHAPE)) + sigma0 * \
      np.random.default_rng(1).normal(size=(16,) + SMALL_SHAPE)
  fn = jax.jit(lambda x, t_start: likelihood.ode_log_likelihood(denoise_fn, x, jax.random.key(0),
                                                                schedule=schedule, divergence="exact",
                                                                t_start=t_start, **TIGHT), static_argnums=1)
  logp, _, _, success = fn(jnp.asarray(x, jnp.float32), None)
  assert bool(success)
  exact = _normal_logpdf(x, alpha0 * MU, alpha0**2 * S**2 + sigma0**2)
  np.testing.assert_allclose(np.asarray(logp, np.float64), exact, atol=0.01)
  logp_early, _, _, _ = fn(jnp.asarray(x, jnp.float32), 1e-5)
  assert np.mean(np.abs(np.asarray(logp_early) - exact)) > 1.0  # Nats per image, 2 dims.


def test_data_likelihood_is_the_gaussian_decoder_bound():
  """log p(y) >= E_e[log p_t0(alpha0 y + sigma0 e)] + D log alpha0; for N(MU, S^2) data and the exact

  p_t0 = N(alpha0 MU, v), v = alpha0^2 S^2 + sigma0^2, the right side is, per dimension,
  log N(y; MU, w) - sigma0^2 / (2 alpha0^2 w), w = S^2 + sigma0^2 / alpha0^2: the model's density (the
  data convolved with the decoder's N(0, sigma0^2 / alpha0^2)) less the KL gap. Mean over 2048 images.
  """
  schedule = SCHEDULES["discrete_linear"]()
  alpha0, sigma0 = (float(a) for a in schedule.alpha_sigma(schedule.t_min))
  y = MU + S * np.random.default_rng(2).normal(size=(2048,) + SMALL_SHAPE)
  fn = jax.jit(lambda y: likelihood.data_log_likelihood(_restricted_denoiser(schedule, schedule.t_min),
                                                        y, jax.random.key(5), schedule=schedule,
                                                        divergence="exact", **TIGHT))
  bound, _, success = fn(jnp.asarray(y, jnp.float32))
  assert bool(success)
  w = S**2 + (sigma0 / alpha0) ** 2
  d = math.prod(SMALL_SHAPE)
  expected = _normal_logpdf(y, MU, w) - d * sigma0**2 / (2 * alpha0**2 * w)
  diff = np.asarray(bound, np.float64) - expected
  assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(len(diff)) + 1e-3, (diff.mean(), diff.std())
  # The gap to the model's density is sigma0^2 / (2 alpha0^2 w) = 0.1 nats per dim here, resolved.
  assert d * sigma0**2 / (2 * alpha0**2 * w) > 10 * diff.std(ddof=1) / math.sqrt(len(diff))


def test_dopri5_reports_running_out_of_steps():
  """max_steps reached before t1 gives success False (and a NaN log-density), never a number."""
  fn = lambda t, y: -y
  y, nfe, success = solve = likelihood.solve_dopri5(fn, jnp.ones((3,)), 0.0, 1.0)
  assert bool(success)
  np.testing.assert_allclose(y, np.exp(-1.0), rtol=1e-4)
  y, _, success = likelihood.solve_dopri5(fn, jnp.ones((3,)), 0.0, 1.0, max_steps=2)
  assert not bool(success) and float(y[0]) > 0.5  # Stopped early, at some t < 1.
  schedule, gaussian = SCHEDULES["discrete_linear"](), Gaussian(0)
  logp, _, _, success = jax.jit(lambda x: likelihood.ode_log_likelihood(
      gaussian.denoiser(schedule), x, jax.random.key(0), schedule=schedule, max_steps=3))(gaussian.sample(2))
  assert not bool(success) and np.all(np.isnan(np.asarray(logp)))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
  schedule, gaussian = SCHEDULES["discrete_linear"](), Gaussian(1)
  x = gaussian.sample(1)
  n = 256
  fn = jax.jit(lambda x, div: likelihood.ode_log_likelihood(
      gaussian.denoiser(schedule), x, jax.random.key(3), schedule=schedule, divergence=div, solver="rk4",
      num_steps=40, t_start=1e-5)[0], static_argnums=1)
  estimates = np.asarray(fn(jnp.broadcast_to(x, (n,) + SHAPE), probe), np.float64)
  exact = float(fn(x, "exact")[0])
  standard_error = estimates.std(ddof=1) / math.sqrt(n)
  assert standard_error > 1e-3  # The probes do vary: the test compares a noisy mean.
  assert abs(estimates.mean() - exact) < 3 * standard_error


def test_bits_per_dim_of_the_uniform_density_is_8():
  """A uniform density on [-1, 1]^D spreads every pixel evenly over its 256 values: 8 bits."""
  d = 3 * 4 * 4
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.asarray([-d * math.log(2.0)]), d), [8.0], rtol=1e-6)


def test_dequantize_fills_each_pixel_bin():
  images = jnp.asarray([[0, 255, 128]], jnp.uint8).reshape(1, 1, 3, 1)
  x = likelihood.dequantize(jnp.broadcast_to(images, (4096, 1, 3, 1)), jax.random.key(0))
  lo = np.array([0, 255, 128]) / 128 - 1
  x = np.asarray(x)[:, 0, :, 0]
  assert np.all(x >= lo) and np.all(x < lo + 1 / 128)
  np.testing.assert_allclose(x.mean(axis=0), lo + 0.5 / 128, atol=1e-4)


def test_discretized_gaussian_matches_scipy():
  k = np.array([0, 1, 100, 127, 200, 254, 255])
  x = k / 127.5 - 1
  mean, std = 0.05, 0.3
  ours = np.asarray(likelihood.discretized_gaussian_log_likelihood(
      jnp.asarray(x, jnp.float32), mean=jnp.float32(mean), var=jnp.float32(std**2)))
  upper = np.where(k == 255, 1.0, stats.norm.cdf(x + 1 / 255, mean, std))
  lower = np.where(k == 0, 0.0, stats.norm.cdf(x - 1 / 255, mean, std))
  np.testing.assert_allclose(ours, np.log(upper - lower), rtol=1e-4)
  bins = np.arange(256) / 127.5 - 1
  total = np.exp(np.asarray(likelihood.discretized_gaussian_log_likelihood(
      jnp.asarray(bins, jnp.float32), mean=jnp.float32(mean), var=jnp.float32(std**2)))).sum()
  np.testing.assert_allclose(total, 1.0, rtol=1e-4)  # The bins cover the line.


def test_discrete_vlb_bounds_the_true_nll():
  """E[VLB] >= the entropy of the quantised data (any model's cross-entropy is), and is close to it.

  The exact denoiser of the continuous Gaussian is used; the reverse variances are fixed, so the bound
  is not tight (Nichol & Dhariwal 2021 learn them to close the gap): ~0.25 bpd with beta ("large"),
  ~0.9 with beta-tilde ("small") here.
  """
  mu, s, b = 0.1, 0.5, 256
  schedule = SCHEDULES["discrete_linear"]()
  rng = np.random.default_rng(0)
  k = np.clip(np.round((mu + s * rng.normal(size=(b,) + SHAPE) + 1) * 127.5), 0, 255).astype(np.uint8)
  levels = np.arange(256) / 127.5 - 1
  mass = (np.where(levels > 0.999, 1.0, stats.norm.cdf(levels + 1 / 255, mu, s))
          - np.where(levels < -0.999, 0.0, stats.norm.cdf(levels - 1 / 255, mu, s)))
  entropy_bpd = -(mass * np.log2(mass)).sum()  # The true NLL in bits/dim, per pixel.

  def denoise_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    x0 = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)
    return x0, (x - alpha * x0) / sigma

  gaps = {}
  for variance in ("small", "large"):
    out = jax.jit(lambda k, v=variance: likelihood.vlb_bits_per_dim(denoise_fn, k, jax.random.key(1),
                                                                    schedule=schedule, variance=v))(k)
    bpd = np.asarray(out["bpd"], np.float64)
    np.testing.assert_allclose(bpd, np.asarray(out["prior_bpd"] + out["kl_bpd"] + out["decoder_bpd"]),
                               rtol=1e-5)
    assert float(np.mean(out["prior_bpd"])) < 1e-3  # alpha-bar_T ~ 4e-5: L_T is negligible.
    gap = bpd.mean() - entropy_bpd
    assert gap > 3 * bpd.std(ddof=1) / math.sqrt(b), (variance, gap)  # A bound, beyond the noise.
    gaps[variance] = gap
  assert gaps["large"] < 0.4, gaps
  assert gaps["small"] < 1.5, gaps


def test_vlb_needs_a_discrete_schedule():
  schedule = SCHEDULES["continuous_cosine"]()
  with pytest.raises(ValueError, match="num_timesteps"):
    likelihood.vlb_terms(lambda x, t: (x, x), jnp.zeros((1,) + SHAPE), jax.random.key(0), schedule=schedule)


class _StiffModel:
  """A stand-in network whose eps_hat oscillates 1e7 times per unit of t: dopri5 cannot reach t = 1."""

  def apply(self, variables, x, t, y, train):
    del variables, y, train
    return jnp.sin(1e4 * t)[:, None, None, None] * jnp.ones_like(x)


def test_nll_records_a_failed_solve_as_nan():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.nll_num, config.eval.batch_size = 8, 8
  schedule = train_lib.create_schedule(config.diffusion)
  record = evaluate.nll(config, params={}, model=_StiffModel(), schedule=schedule,
                        mesh=train_lib.create_mesh(), max_steps=100)
  assert record["nll_ode_failed_images"] == 8 and math.isnan(record["nll_ode_bpd"])
  assert record["nll_ode_solver"] == "dopri5 rtol=atol=1e-5 max_steps=100"
  assert record["nll_ode_t_start"] == pytest.approx(1e-3) and "alpha0" in record["nll_ode_start_noise"]
  assert np.isfinite(record["nll_vlb_bpd"])
