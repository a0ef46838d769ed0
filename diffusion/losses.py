"""The denoising loss and its weightings over noise levels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion import learned_variance
from diffusion import parameterization
from diffusion import samplers
from diffusion import schedules

Array = jnp.ndarray

WEIGHTINGS = ("simple", "min_snr")

# Nichol & Dhariwal 2021, Eq. 16: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001.
HYBRID_VLB_WEIGHT = 1e-3


def min_snr_weight(*, logsnr: Array, gamma: float, prediction: str,
                   sigma_data: float | None = None) -> Array:
  """Hang et al. 2023, Eq. 8-9: min(SNR, gamma) in x0 units, over SNR for eps and SNR + 1 for v.

  In general min(SNR, gamma) (dx0 / d output)^2: sigma_data^2 / (1 + SNR sigma_data^2) for edm
  (c_out^2 / sigma_t^2) and 1 / (1 + sqrt(SNR))^2 for velocity (sigma_t^2 / (alpha + sigma_t)^2).
  """
  snr = jnp.exp(logsnr)
  clipped = jnp.minimum(snr, gamma)
  if prediction == "x0":
    return clipped
  if prediction == "eps":
    # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (zero terminal SNR).
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction == "v":
    return clipped / (snr + 1.0)
  if prediction == "edm":
    if sigma_data is None:
      raise ValueError("The 'edm' parameterisation needs sigma_data (config.diffusion.sigma_data).")
    return clipped * sigma_data**2 / (1.0 + snr * sigma_data**2)
  if prediction == "velocity":
    return clipped / jnp.square(1.0 + jnp.exp(0.5 * logsnr))
  raise ValueError(f"config.diffusion.prediction={prediction!r} is not one of "
                   f"{', '.join(parameterization.PREDICTIONS)}.")


def loss_weight(weighting: str, *, logsnr: Array, prediction: str, gamma: float,
                sigma_data: float | None = None) -> Array:
  """Per-example weight of the loss in the network's own output space."""
  if weighting == "simple":
    return jnp.ones_like(logsnr)
  if weighting == "min_snr":
    return min_snr_weight(logsnr=logsnr, gamma=gamma, prediction=prediction, sigma_data=sigma_data)
  raise ValueError(f"config.diffusion.loss_weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}.")


def denoising_loss(output: Array, *, x0: Array, eps: Array, alpha: Array, sigma: Array, logsnr: Array,
                   prediction: str, weighting: str, gamma: float = 5.0,
                   sigma_data: float | None = None) -> Array:
  """Weighted mean squared error of the network output against its target, per example.

  "simple" on eps is Ho et al. 2020, Eq. 14; on edm it is Karras et al. 2022's loss (Eq. 8 with
  lambda = 1 / c_out^2); on velocity, conditional flow matching (Lipman et al. 2023, Eq. 23). alpha,
  sigma and logsnr have shape [B].
  """
  bcast = (slice(None),) + (None,) * (x0.ndim - 1)
  tgt = parameterization.target(prediction, x0=x0, eps=eps, alpha=alpha[bcast], sigma=sigma[bcast],
                                sigma_data=sigma_data)
  mse = jnp.mean(jnp.square(output.astype(jnp.float32) - tgt), axis=tuple(range(1, x0.ndim)))
  return loss_weight(weighting, logsnr=logsnr, prediction=prediction, gamma=gamma,
                     sigma_data=sigma_data) * mse


def _mean_bits(x: Array) -> Array:
  """Per-example mean over all but the batch axis, nats to bits."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim))) / math.log(2.0)


def vlb_loss(output: Array, *, v: Array, x0: Array, x_t: Array, t: Array, schedule: schedules.Schedule,
             prediction: str) -> Array:
  """The bound's term L_{i-1} at t = i / T in bits/dim per example (Nichol & Dhariwal 2021, Sec. 3.1):

  KL(q(x_s | x_t, x0) || N(mu(x0_hat, x_t), Sigma(v))) for i > 1 (Ho et al. 2020, Eq. 5-7), the
  discretised decoder NLL -log p(x0 | x_t) with mean x0_hat at i = 1 (Eq. 13), as ADM's
  training_losses (which uses it on latents too). x0_hat comes from a stop-gradient of output, the
  network's prediction, so this term trains the variance values v alone; Sigma is
  learned_variance.interpolated_variance, at i = 1 between beta_1 and ADM's clipped beta~ (step 2's).
  t [B] lies on the grid of a discrete schedule.
  """
  num = schedule.num_timesteps
  if num <= 0:
    raise ValueError("Learned variances train on the discrete bound: they need a discrete schedule "
                     "(config.diffusion.num_timesteps > 0).")
  bcast = lambda a: a.reshape((-1,) + (1,) * (x0.ndim - 1))
  alpha, sigma = schedule.alpha_sigma(t)
  x0_hat, _ = parameterization.to_x0_eps(prediction, jax.lax.stop_gradient(output), x_t=x_t,
                                         alpha=bcast(alpha), sigma=bcast(sigma),
                                         sigma_data=schedule.sigma_data)
  i = jnp.round(t * num)
  first = i <= 1
  logsnr_t = schedule.logsnr(t)
  logsnr_s = schedule.logsnr(jnp.maximum(i - 1, 1) / num)  # At i = 1 a finite stand-in, unused.
  small, large = samplers.ddpm_variances(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  small_2, _ = samplers.ddpm_variances(logsnr_t=schedule.logsnr(2.0 / num),
                                       logsnr_s=schedule.logsnr(1.0 / num))
  small = jnp.where(first, small_2, small)
  large = jnp.where(first, jnp.square(sigma), large)  # beta_1 = 1 - alpha-bar_1.
  var_p = learned_variance.interpolated_variance(v=v, small=bcast(small), large=bcast(large))
  mean = lambda x: samplers.ddpm_posterior_mean(x0=x, x_t=x_t, logsnr_t=bcast(logsnr_t),
                                                logsnr_s=bcast(logsnr_s))
  kl = _mean_bits(learned_variance.normal_kl(mean1=mean(x0), var1=bcast(small), mean2=mean(x0_hat),
                                             var2=var_p))
  decoder_nll = -_mean_bits(learned_variance.discretized_gaussian_log_likelihood(x0, mean=x0_hat,
                                                                                 var=var_p))
  return jnp.where(first, decoder_nll, kl)


def hybrid_loss(output: Array, *, v: Array, x0: Array, eps: Array, x_t: Array, t: Array,
                schedule: schedules.Schedule, prediction: str, weighting: str,
                gamma: float = 5.0) -> Array:
  """Nichol & Dhariwal 2021, Eq. 16, per example: L_simple + lambda L_vlb, L_vlb = T L_{i-1} (i = T t

  uniform), lambda = HYBRID_VLB_WEIGHT; L_simple is denoising_loss (any weighting) on the prediction.
  """
  alpha, sigma = schedule.alpha_sigma(t)
  simple = denoising_loss(output, x0=x0, eps=eps, alpha=alpha, sigma=sigma, logsnr=schedule.logsnr(t),
                          prediction=prediction, weighting=weighting, gamma=gamma,
                          sigma_data=schedule.sigma_data)
  vlb = vlb_loss(output.astype(jnp.float32), v=v.astype(jnp.float32), x0=x0, x_t=x_t, t=t,
                 schedule=schedule, prediction=prediction)
  return simple + HYBRID_VLB_WEIGHT * schedule.num_timesteps * vlb
