"""The forward process, schedules, parameterisations and loss weightings against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses
from diffusion import parameterization as param
from diffusion import schedules

ALL = [dict(schedule=s, num_timesteps=n, zero_terminal_snr=z)
       for s in ("linear", "cosine") for n in (1000, 0) for z in (False, True)]


def test_linear_alpha_bar_is_ddpm_formula():
  """Ho et al. 2020: alpha-bar_i = prod_{j<=i} (1 - beta_j), read off exactly at t = i / T."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alpha_bar = np.cumprod(1.0 - betas)
  schedule = schedules.create_schedule(schedule="linear", num_timesteps=1000)
  alpha, sigma = schedule.alpha_sigma(jnp.arange(1, 1001) / 1000.0)
  np.testing.assert_allclose(np.asarray(alpha) ** 2, alpha_bar, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(sigma) ** 2, 1.0 - alpha_bar, rtol=2e-6, atol=1e-7)
  assert schedule.num_timesteps == 1000 and schedule.t_min == pytest.approx(1e-3)


def test_continuous_linear_is_the_limit_of_the_discrete_one():
  discrete = schedules.create_schedule(schedule="linear", num_timesteps=1000)
  continuous = schedules.create_schedule(schedule="linear", num_timesteps=0)
  t = jnp.linspace(0.05, 1.0, 20)
  # -log alpha-bar is sum_j -log(1 - beta_j) = sum_j beta_j (1 + beta_j / 2 + ...) against the
  # integral of beta: they agree to a relative beta_max / 2 = 1%, plus a half-step offset near t = 0.
  log_ab = lambda s: 2 * np.log(np.asarray(s.alpha_sigma(t)[0], np.float64))
  np.testing.assert_allclose(log_ab(discrete), log_ab(continuous), rtol=0.011, atol=1e-3)


@pytest.mark.parametrize("kwargs", ALL, ids=lambda k: "-".join(map(str, k.values())))
def test_vp_identities_and_monotone_logsnr(kwargs):
  schedule = schedules.create_schedule(**kwargs)
  t = jnp.linspace(0.0, 1.0, 2001)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  logsnr = np.asarray(schedule.logsnr(t))
  assert np.all(np.diff(logsnr) < 0), "logSNR must decrease strictly in t"
  np.testing.assert_allclose(np.log(alpha[1:-1] ** 2 / sigma[1:-1] ** 2), logsnr[1:-1], rtol=1e-4, atol=1e-3)
  # t_from_logsnr inverts logsnr on the interior of the grid.
  inner = t[10:-10]
  np.testing.assert_allclose(schedule.t_from_logsnr(schedule.logsnr(inner)), inner, atol=2e-4)


@pytest.mark.parametrize("num_timesteps", [1000, 0])
def test_cosine_end_points(num_timesteps):
  schedule = schedules.create_schedule(schedule="cosine", num_timesteps=num_timesteps)
  alpha0, sigma0 = schedule.alpha_sigma(jnp.float32(0.0))
  assert float(alpha0) == 1.0 and float(sigma0) == 0.0
  alpha1, _ = schedule.alpha_sigma(jnp.float32(1.0))
  assert float(alpha1) < 1e-4  # alpha-bar(1) = 0 up to Nichol & Dhariwal's beta clip / the logSNR floor.
  # The midpoint is the closed form cos^2((0.5 + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2).
  s = 0.008
  expected = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
  alpha_half, _ = schedule.alpha_sigma(jnp.float32(0.5))
  assert float(alpha_half) ** 2 == pytest.approx(expected, rel=2e-3 if num_timesteps else 1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_zero_terminal_snr(schedule_name):
  """Lin et al. 2023: SNR(T) = 0 after the rescale, the first step unchanged."""
  plain = schedules.create_schedule(schedule=schedule_name, num_timesteps=1000)
  rescaled = schedules.create_schedule(schedule=schedule_name, num_timesteps=1000, zero_terminal_snr=True)
  alpha_end, sigma_end = rescaled.alpha_sigma(jnp.float32(1.0))
  assert float(alpha_end) < 1e-15 and float(sigma_end) == 1.0
  first = jnp.float32(1e-3)
  assert float(rescaled.alpha_sigma(first)[0]) == pytest.approx(float(plain.alpha_sigma(first)[0]), rel=1e-6)
  assert float(plain.alpha_sigma(jnp.float32(1.0))[0]) > 1e-5  # Without the rescale SNR(T) > 0.


def test_bad_schedule_names_the_key():
  with pytest.raises(ValueError, match=r"config\.diffusion\.schedule='sqrt' is not one of linear, cosine"):
    schedules.create_schedule(schedule="sqrt", num_timesteps=1000)
  with pytest.raises(ValueError, match=r"config\.diffusion\.num_timesteps=-1"):
    schedules.create_schedule(schedule="linear", num_timesteps=-1)


def test_parameterisation_round_trips():
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 4, 5)).astype(np.float64)
  for alpha in (0.999, 0.6, 0.01):
    sigma = math.sqrt(1 - alpha**2)
    x_t = param.diffuse(x0=x0, noise=eps, alpha=alpha, sigma=sigma)
    v = param.v_target(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    np.testing.assert_allclose(param.eps_to_x0(x_t=x_t, eps=eps, alpha=alpha, sigma=sigma), x0, atol=1e-9 / alpha)
    np.testing.assert_allclose(param.x0_to_eps(x_t=x_t, x0=x0, alpha=alpha, sigma=sigma), eps, atol=1e-9 / sigma)
    np.testing.assert_allclose(param.v_to_x0(x_t=x_t, v=v, alpha=alpha, sigma=sigma), x0, atol=1e-12)
    np.testing.assert_allclose(param.v_to_eps(x_t=x_t, v=v, alpha=alpha, sigma=sigma), eps, atol=1e-12)
    for prediction, output in (("eps", eps), ("x0", x0), ("v", v)):
      got_x0, got_eps = param.to_x0_eps(prediction, output, x_t=x_t, alpha=alpha, sigma=sigma)
      np.testing.assert_allclose(got_x0, x0, atol=1e-8 / alpha)
      np.testing.assert_allclose(got_eps, eps, atol=1e-8 / sigma)
      np.testing.assert_allclose(param.target(prediction, x0=x0, eps=eps, alpha=alpha, sigma=sigma), output)
  with pytest.raises(ValueError, match=r"config\.diffusion\.prediction='score'"):
    param.to_x0_eps("score", eps, x_t=eps, alpha=1.0, sigma=0.0)


def test_min_snr_weights_are_one_weighting_in_three_spaces():
  """Hang et al. 2023: the eps, x0 and v forms weight the same x0-space error by min(SNR, gamma)."""
  logsnr = jnp.linspace(-8.0, 8.0, 33)
  snr = np.exp(np.asarray(logsnr, np.float64))
  gamma = 5.0
  w = {p: np.asarray(losses.min_snr_weight(logsnr=logsnr, gamma=gamma, prediction=p), np.float64)
       for p in ("eps", "x0", "v")}
  # ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2 under VP.
  np.testing.assert_allclose(w["eps"] * snr, np.minimum(snr, gamma), rtol=1e-5)
  np.testing.assert_allclose(w["v"] * (snr + 1), np.minimum(snr, gamma), rtol=1e-5)
  np.testing.assert_allclose(w["x0"], np.minimum(snr, gamma), rtol=1e-5)
  # SNR = 0 (zero terminal SNR): the eps weight's limit is 1, not nan.
  assert float(losses.min_snr_weight(logsnr=jnp.float32(-jnp.inf), gamma=gamma, prediction="eps")) == 1.0


def test_denoising_loss_is_zero_for_the_true_target_and_mse_otherwise():
  rng = jax.random.key(0)
  x0 = jax.random.normal(rng, (3, 4, 4, 1))
  eps = jax.random.normal(jax.random.fold_in(rng, 1), x0.shape)
  alpha, sigma = jnp.array([0.9, 0.5, 0.1]), jnp.sqrt(1 - jnp.array([0.9, 0.5, 0.1]) ** 2)
  logsnr = jnp.log(alpha**2 / sigma**2)
  for prediction in ("eps", "x0", "v"):
    tgt = param.target(prediction, x0=x0, eps=eps, alpha=alpha[:, None, None, None],
                       sigma=sigma[:, None, None, None])
    kw = dict(x0=x0, eps=eps, alpha=alpha, sigma=sigma, logsnr=logsnr, prediction=prediction)
    np.testing.assert_allclose(losses.denoising_loss(tgt, weighting="simple", **kw), 0.0, atol=1e-12)
    np.testing.assert_allclose(losses.denoising_loss(tgt + 0.5, weighting="simple", **kw), 0.25, rtol=1e-6)
    weighted = losses.denoising_loss(tgt + 0.5, weighting="min_snr", gamma=5.0, **kw)
    np.testing.assert_allclose(weighted, 0.25 * losses.min_snr_weight(logsnr=logsnr, gamma=5.0,
                                                                       prediction=prediction), rtol=1e-6)
  with pytest.raises(ValueError, match=r"config\.diffusion\.loss_weighting='p2'"):
    losses.denoising_loss(x0, weighting="p2", **kw)
