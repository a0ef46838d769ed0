"""Learned reverse-process variances (Nichol & Dhariwal 2021, Sec. 3.1), as DiT trains them.

A network with learned variances outputs twice the channels: its prediction of the configured
parameterisation, then values v, one per element. The variance of the reverse step t -> s interpolates
in log space between the two extremes of Ho et al. 2020: beta~ (the posterior's, at v = -1) and beta
(at v = +1), frac = (v + 1) / 2 as in their code (ADM's gaussian_diffusion.py); v is not clipped, as
there. The output is split here, once (split_output), for the train step and every sampler.

Also the two Gaussian terms of the variational bound (Ho et al. 2020, Eq. 5 and 13), shared by the
hybrid loss (losses.py) and the likelihood evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

Array = jnp.ndarray


def split_output(output: Array, *, learned: bool) -> tuple[Array, Array | None]:
  """(prediction, v) of a network output: its two halves along the channels if learned, else (output, None)."""
  if not learned:
    return output, None
  channels = output.shape[-1]
  if channels % 2:
    raise ValueError(f"A network with learned variances (config.model.dit.learn_sigma) outputs an even "
                     f"number of channels, got {channels}.")
  return output[..., :channels // 2], output[..., channels // 2:]


def interpolated_variance(*, v: Array, small: Array, large: Array) -> Array:
  """Nichol & Dhariwal 2021, Eq. 15: exp(frac log beta + (1 - frac) log beta~), frac = (v + 1) / 2.

  small = beta~ and large = beta of the step (samplers.ddpm_variances); where beta~ = 0 (the step to
  s = 0) it stands in beta, so the result stays finite (that step adds no noise).
  """
  frac = (v + 1.0) / 2.0
  log_small = jnp.log(jnp.where(small > 0, small, large))
  return jnp.exp(frac * jnp.log(large) + (1.0 - frac) * log_small)


def normal_kl(*, mean1: Array, var1: Array, mean2: Array, var2: Array) -> Array:
  """KL(N(mean1, var1) || N(mean2, var2)) elementwise (Ho et al. 2020, Eq. 5's Gaussian KLs)."""
  return 0.5 * (jnp.log(var2) - jnp.log(var1) + (var1 + jnp.square(mean1 - mean2)) / var2 - 1.0)


def _log_prob_between(lo: Array, hi: Array) -> Array:
  """log(Phi(hi) - Phi(lo)) for lo < hi, reflected into the lower tail where it is accurate."""
  flip = lo + hi > 0  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): keep the bin in the lower tail.
  a, b = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
  log_b, log_a = log_ndtr(b), log_ndtr(a)
  return log_b + jnp.log1p(-jnp.exp(jnp.minimum(log_a - log_b, -1e-30)))


def discretized_gaussian_log_likelihood(x: Array, *, mean: Array, var: Array) -> Array:
  """Ho et al. 2020, Eq. 13: log of the N(mean, var) mass of x's bin [x - 1/255, x + 1/255], the edge

  bins reaching to -inf at x = -1 and +inf at x = 1; x on the 8-bit grid k / 127.5 - 1. Elementwise.
  """
  inv_std = jax.lax.rsqrt(var)
  lo = jnp.where(x < -0.999, -jnp.inf, (x - mean - 1.0 / 255.0) * inv_std)
  hi = jnp.where(x > 0.999, jnp.inf, (x - mean + 1.0 / 255.0) * inv_std)
  return jnp.where(x < -0.999, log_ndtr(hi),
                   jnp.where(x > 0.999, log_ndtr(-lo), _log_prob_between(lo, hi)))
