"""Learned variances (Nichol & Dhariwal 2021): the bound's terms against closed forms, the DDPM step's
variance, the stop-gradient of the hybrid loss, guidance of the prediction half alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import guidance
from diffusion import learned_variance
from diffusion import losses
from diffusion import samplers
from diffusion import schedules

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al.'s linear schedule, float64, independent of schedules.py.
ALPHA_BAR = np.cumprod(1.0 - BETAS)
SCHEDULE = schedules.create_schedule(schedule="linear", num_timesteps=T)
STEPS = np.array([1, 2, 500, 1000])  # One example per step i; i = 1 is the decoder term.


def _case():
  rng = np.random.default_rng(0)
  shape = (len(STEPS), 2, 2, 3)
  x0 = rng.integers(0, 256, shape) / 127.5 - 1.0
  x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0  # Both edge bins of the decoder.
  noise = rng.standard_normal(shape)
  eps_hat = noise + 0.3 * rng.standard_normal(shape)
  v = rng.uniform(-1.0, 1.0, shape)
  ab = ALPHA_BAR[STEPS - 1].reshape(-1, 1, 1, 1)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  return x0, noise, eps_hat, v, x_t


def _expected_terms(x0, eps_hat, v, x_t):
  """Ho et al. 2020, Eq. 5-7 and 13, in float64 from the betas: bits/dim per example."""
  out = []
  frac = (v + 1) / 2
  for k, i in enumerate(STEPS):
    ab_t = ALPHA_BAR[i - 1]
    x0_hat = (x_t[k] - np.sqrt(1 - ab_t) * eps_hat[k]) / np.sqrt(ab_t)
    if i == 1:
      small = (1 - ALPHA_BAR[0]) / (1 - ALPHA_BAR[1]) * BETAS[1]  # ADM's clipped beta~_1.
      std = np.sqrt(np.exp(frac[k] * np.log(BETAS[0]) + (1 - frac[k]) * np.log(small)))
      upper = stats.norm.cdf((x0[k] + 1 / 255 - x0_hat) / std)
      lower = stats.norm.cdf((x0[k] - 1 / 255 - x0_hat) / std)
      mass = np.where(x0[k] == -1, upper, np.where(x0[k] == 1, 1 - lower, upper - lower))
      out.append(-np.mean(np.log(mass)) / np.log(2))
      continue
    ab_s, beta = ALPHA_BAR[i - 2], BETAS[i - 1]
    small = (1 - ab_s) / (1 - ab_t) * beta
    mean = lambda x: (np.sqrt(ab_s) * beta * x + np.sqrt(1 - beta) * (1 - ab_s) * x_t[k]) / (1 - ab_t)
    var = np.exp(frac[k] * np.log(beta) + (1 - frac[k]) * np.log(small))
    kl = 0.5 * (np.log(var / small) + (small + (mean(x0[k]) - mean(x0_hat)) ** 2) / var - 1)
    out.append(np.mean(kl) / np.log(2))
  return np.array(out)


def test_vlb_terms_equal_the_gaussian_kl_and_decoder_nll_in_closed_form():
  x0, _, eps_hat, v, x_t = _case()
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  ours = losses.vlb_loss(f32(eps_hat), v=f32(v), x0=f32(x0), x_t=f32(x_t), t=f32(STEPS / T),
                         schedule=SCHEDULE, prediction="eps")
  expected = _expected_terms(x0, eps_hat, v, x_t)
  assert np.all(expected > 1e-4)  # Every term is away from zero: the comparison is not vacuous.
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-3)


def test_the_bound_trains_the_variance_alone():
  x0, noise, eps_hat, v, x_t = (jnp.asarray(a, jnp.float32) for a in _case())
  t = jnp.asarray(STEPS / T, jnp.float32)
  vlb = lambda out, v: jnp.sum(losses.vlb_loss(out, v=v, x0=x0, x_t=x_t, t=t, schedule=SCHEDULE,
                                               prediction="eps"))
  d_out, d_v = jax.grad(vlb, argnums=(0, 1))(eps_hat, v)
  np.testing.assert_array_equal(d_out, 0.0)  # Stop-gradient of the mean.
  assert float(jnp.min(jnp.sum(jnp.abs(d_v), axis=(1, 2, 3)))) > 0  # Every example's v is trained.
  # The hybrid loss's gradient in the prediction is L_simple's alone.
  hybrid = lambda out: jnp.sum(losses.hybrid_loss(out, v=v, x0=x0, eps=noise, x_t=x_t, t=t,
                                                  schedule=SCHEDULE, prediction="eps", weighting="simple"))
  alpha, sigma = SCHEDULE.alpha_sigma(t)
  simple = lambda out: jnp.sum(losses.denoising_loss(out, x0=x0, eps=noise, alpha=alpha, sigma=sigma,
                                                     logsnr=SCHEDULE.logsnr(t), prediction="eps",
                                                     weighting="simple"))
  np.testing.assert_allclose(jax.grad(hybrid)(eps_hat), jax.grad(simple)(eps_hat), rtol=1e-6)


@pytest.mark.parametrize("v,power", [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5)])
def test_ddpm_step_variance_interpolates_between_beta_tilde_and_beta(v, power):
  # A skipped step 500 -> 450: beta = 1 - ab_t / ab_s, beta~ = (1 - ab_s) / (1 - ab_t) beta.
  ab_t, ab_s = ALPHA_BAR[499], ALPHA_BAR[449]
  beta = 1 - ab_t / ab_s
  small = (1 - ab_s) / (1 - ab_t) * beta
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 1)), jnp.float32)
  x0_hat = 0.5 * jnp.tanh(x)
  denoise_fn = lambda x_t, t: (x0_hat, jnp.zeros_like(x_t), jnp.full_like(x_t, v))
  step = lambda noise: samplers.ddpm_step(denoise_fn, x, jnp.float32(0.5), jnp.float32(0.45), noise,
                                          schedule=SCHEDULE, variance="learned")
  std = step(jnp.ones_like(x)) - step(jnp.zeros_like(x))
  np.testing.assert_allclose(std, np.sqrt(beta ** power * small ** (1 - power)), rtol=1e-4)
  if v == -1.0:  # The fixed small variance's step, the same draw.
    noise = jax.random.normal(jax.random.key(2), x.shape)
    fixed = samplers.ddpm_step(lambda x_t, t: denoise_fn(x_t, t)[:2], x, jnp.float32(0.5),
                               jnp.float32(0.45), noise, schedule=SCHEDULE, variance="small")
    np.testing.assert_allclose(step(noise), fixed, rtol=1e-6, atol=1e-6)
  # The last step, to t = 0, adds no noise and stays finite.
  last = samplers.ddpm_step(denoise_fn, x, jnp.float32(1 / T), jnp.float32(0.0), jnp.ones_like(x),
                            schedule=SCHEDULE, variance="learned")
  np.testing.assert_allclose(last, x0_hat, atol=1e-5)


def test_guidance_mixes_the_prediction_and_keeps_the_conditional_variance():
  null = 10

  def apply_fn(x, model_time, cond):  # eps half 1 (class) or -1 (null); v 0.3 (class) or -0.7 (null).
    is_null = (cond["label"] == null)[:, None, None, None]
    eps = jnp.where(is_null, -1.0, 1.0) * jnp.ones_like(x)
    v = jnp.where(is_null, -0.7, 0.3) * jnp.ones_like(x)
    return jnp.concatenate([eps, v], axis=-1)

  x = jnp.zeros((2, 2, 2, 3))
  labels = jnp.array([1, 2])
  make = lambda **kw: guidance.make_denoise_fn(
      apply_fn, schedule=SCHEDULE, prediction="eps", cond={"label": labels},
      uncond=guidance.null_cond(num_classes=null, batch_size=2), guidance_scale=3.0, learned=True, **kw)
  x0, eps, v = make(return_variance=True)(x, jnp.float32(0.5))
  np.testing.assert_allclose(eps, -1.0 + 3.0 * (1.0 - -1.0))  # Ho & Salimans 2022, Eq. 6, on eps.
  np.testing.assert_allclose(v, 0.3)
  assert x0.shape == eps.shape == x.shape
  assert len(make()(x, jnp.float32(0.5))) == 2  # The other samplers see (x0_hat, eps_hat).
  with pytest.raises(ValueError, match="even number of channels"):
    learned_variance.split_output(jnp.zeros((1, 2, 2, 3)), learned=True)
