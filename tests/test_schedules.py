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
  with pytest.raises(ValueError, match=r"config\.diffusion\.schedule='sqrt' is not one of linear, scaled_linear, cosine"):
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


CONTINUOUS = [dict(schedule=s, zero_terminal_snr=z) for s in ("linear", "cosine") for z in (False, True)]


def _float64_alpha_bar(schedule: str, zero_terminal_snr: bool, t: np.ndarray) -> np.ndarray:
  """alpha-bar(t) of the continuous schedules in float64, from their defining formulas."""
  if schedule == "linear":  # Song et al. 2021, Eq. 33 with beta_min = 0.1, beta_max = 20.
    sqrt_ab = lambda u: np.exp(-0.5 * (0.1 * u + 0.5 * 19.9 * u**2))
  else:
    sqrt_ab = lambda u: np.sqrt(schedules.cosine_alpha_bar(np.asarray(u, np.float64)))
  out = sqrt_ab(t)
  if zero_terminal_snr:
    out = (out - sqrt_ab(1.0)) / (1.0 - sqrt_ab(1.0))
  return out**2


@pytest.mark.parametrize("kwargs", CONTINUOUS, ids=lambda k: "-".join(map(str, k.values())))
def test_continuous_schedules_keep_float32_precision_near_zero(kwargs):
  """sigma^2 = 1 - alpha-bar to a relative 1e-5 from t = 1e-5 (log alpha-bar in closed form, expm1);

  the log of a float32 alpha-bar just below 1 was 4.7 % (linear) and 8 % (cosine) off at t = 1e-5.
  """
  schedule = schedules.create_schedule(num_timesteps=0, **kwargs)
  t = np.geomspace(1e-5, 1.0, 61)
  alpha, sigma = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
  alpha_bar = _float64_alpha_bar(kwargs["schedule"], kwargs["zero_terminal_snr"], t)
  np.testing.assert_allclose(np.asarray(sigma, np.float64) ** 2, 1.0 - alpha_bar, rtol=1e-5)
  inner = t < 0.99  # alpha-bar itself, short of the SNR floor / SNR 0 at t = 1.
  np.testing.assert_allclose(np.asarray(alpha, np.float64)[inner] ** 2, alpha_bar[inner], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(schedule.logsnr(jnp.asarray(t[inner], jnp.float32))),
                             np.log(alpha_bar[inner] / (1.0 - alpha_bar[inner])), atol=1e-5, rtol=1e-5)
  # The inverse keeps the precision too: 1e-4 relative at t = 1e-5 (it was 50 % for the cosine).
  back = np.asarray(schedule.t_from_logsnr(schedule.logsnr(jnp.asarray(t[inner], jnp.float32))))
  np.testing.assert_allclose(back, t[inner], rtol=3e-4)


def test_continuous_time_trains_from_1e_5():
  """Song et al. 2021, App. D.2: t ~ U[1e-5, 1] in training, where the likelihood ODE also starts."""
  from training import train_step  # pylint: disable=g-import-not-at-top
  schedule = schedules.create_schedule(schedule="cosine", num_timesteps=0)
  assert schedule.t_min == 1e-5
  t = np.asarray(train_step.sample_times(jax.random.key(0), 200_000, schedule))
  assert t.min() >= 1e-5 and t.max() <= 1.0
  assert 100 < np.sum(t < 1e-3) < 300  # ~198 of 200,000 below the old start of 1e-3.


def test_model_time_conventions():
  """Step i (alpha-bar_i, t = i / T) is fed as i ("index") or as i - 1 ("index_from_zero", diffusers)."""
  i = np.arange(1, 1001)
  t = jnp.asarray(i / 1000.0, jnp.float32)
  ours = schedules.create_schedule(schedule="linear", num_timesteps=1000)
  theirs = schedules.create_schedule(schedule="linear", num_timesteps=1000, model_time="index_from_zero")
  np.testing.assert_allclose(ours.model_time(t), i, atol=1e-4)
  np.testing.assert_allclose(theirs.model_time(t), i - 1, atol=1e-4)
  # The schedules are otherwise the same; only the network's input moves.
  np.testing.assert_array_equal(ours.logsnr(t), theirs.logsnr(t))
  with pytest.raises(ValueError, match=r"config\.diffusion\.model_time='t' is not one of index, index_from_zero"):
    schedules.create_schedule(schedule="linear", num_timesteps=1000, model_time="t")
  with pytest.raises(ValueError, match=r"model_time='index_from_zero' numbers discrete steps.*num_timesteps > 0, got 0"):
    schedules.create_schedule(schedule="linear", num_timesteps=0, model_time="index_from_zero")


def test_model_time_reaches_the_network_from_the_config():
  """config.diffusion.model_time goes through create_schedule to what apply_fn sees, when sampling."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from diffusion import guidance  # pylint: disable=g-import-not-at-top
  from training import config_check  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.diffusion.model_time = "index_from_zero"
  config_check.validate_diffusion(config.diffusion, num_classes=0)
  schedule = train_lib.create_schedule(config.diffusion)
  seen = []

  def apply_fn(x, model_time, labels):
    seen.append(np.asarray(model_time))
    return jnp.zeros_like(x)
  guidance.make_denoise_fn(apply_fn, schedule=schedule, prediction="eps")(jnp.ones((2, 3)), jnp.float32(0.25))
  np.testing.assert_allclose(seen[0], [249.0, 249.0], atol=1e-4)  # Step 250 as diffusers' timestep 249.
  for value, message in (("t", r"config\.diffusion\.model_time='t' is not one of index, index_from_zero"),
                         ("index_from_zero", r"num_timesteps > 0, got 0")):
    config.diffusion.model_time, config.diffusion.num_timesteps = value, 0
    with pytest.raises(ValueError, match=message):
      config_check.validate_diffusion(config.diffusion, num_classes=0)
