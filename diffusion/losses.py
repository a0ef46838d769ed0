"""The denoising loss and its weightings over noise levels."""

from __future__ import annotations

import jax.numpy as jnp

from diffusion import parameterization

Array = jnp.ndarray

WEIGHTINGS = ("simple", "min_snr")


def min_snr_weight(*, logsnr: Array, gamma: float, prediction: str) -> Array:
  """Hang et al. 2023, Eq. 8-9: min(SNR, gamma) in x0 units, over SNR for eps and SNR + 1 for v."""
  snr = jnp.exp(logsnr)
  clipped = jnp.minimum(snr, gamma)
  if prediction == "x0":
    return clipped
  if prediction == "eps":
    # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (zero terminal SNR).
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction == "v":
    return clipped / (snr + 1.0)
  raise ValueError(f"config.diffusion.prediction={prediction!r} is not one of "
                   f"{', '.join(parameterization.PREDICTIONS)}.")


def loss_weight(weighting: str, *, logsnr: Array, prediction: str, gamma: float) -> Array:
  """Per-example weight of the loss in the network's own output space."""
  if weighting == "simple":
    return jnp.ones_like(logsnr)
  if weighting == "min_snr":
    return min_snr_weight(logsnr=logsnr, gamma=gamma, prediction=prediction)
  raise ValueError(f"config.diffusion.loss_weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}.")


def denoising_loss(output: Array, *, x0: Array, eps: Array, alpha: Array, sigma: Array, logsnr: Array,
                   prediction: str, weighting: str, gamma: float = 5.0) -> Array:
  """Weighted mean squared error of the network output against its target, per example.

  "simple" on eps is Ho et al. 2020, Eq. 14; alpha, sigma and logsnr have shape [B].
  """
  bcast = (slice(None),) + (None,) * (x0.ndim - 1)
  tgt = parameterization.target(prediction, x0=x0, eps=eps, alpha=alpha[bcast], sigma=sigma[bcast])
  mse = jnp.mean(jnp.square(output.astype(jnp.float32) - tgt), axis=tuple(range(1, x0.ndim)))
  return loss_weight(weighting, logsnr=logsnr, prediction=prediction, gamma=gamma) * mse
