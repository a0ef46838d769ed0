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

  def logpdf(self, x) -> np.ndarray:
    return stats.multivariate_normal(self.mu, self.cov).logpdf(np.asarray(x, np.float64).reshape(len(x), D))

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
  schedule, gaussian = SCHEDULES[name](), Gaussian(0)
  x = gaussian.sample(4)
  fn = jax.jit(lambda x: likelihood.ode_log_likelihood(gaussian.denoiser(schedule), x, jax.random.key(0),
                                                       schedule=schedule, divergence="exact"))
  logp, z, nfe = fn(x)
  ours = likelihood.bits_per_dim(np.asarray(logp, np.float64), D)
  exact = likelihood.bits_per_dim(gaussian.logpdf(x), D)
  np.testing.assert_allclose(ours, exact, atol=1e-2)
  assert 20 < int(nfe) < 2000
  assert abs(float(np.std(z)) - 1.0) < 0.5  # x(1) is (close to) prior noise.


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
  schedule, gaussian = SCHEDULES["discrete_linear"](), Gaussian(1)
  x = gaussian.sample(1)
  n = 256
  fn = jax.jit(lambda x, div: likelihood.ode_log_likelihood(
      gaussian.denoiser(schedule), x, jax.random.key(3), schedule=schedule, divergence=div, solver="rk4",
      num_steps=40)[0], static_argnums=1)
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
