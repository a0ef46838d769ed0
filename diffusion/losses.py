"""The denoising loss and its weightings over noise levels."""

from __future__ import annotations

import jax.numpy as jnp

from diffusion import parameterization

Array = jnp.ndarray

WEIGHTINGS = ("simple", "min_snr")


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
