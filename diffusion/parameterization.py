"""The forward process and conversions between the network's possible outputs: eps, x0 and v.

x_t = alpha x0 + sigma eps (Ho et al. 2020, Eq. 4); v = alpha eps - sigma x0 (Salimans & Ho 2022,
Sec. 4). The conversions hold for any alpha, sigma; the v ones assume alpha^2 + sigma^2 = 1.
"""

from __future__ import annotations

import jax.numpy as jnp

Array = jnp.ndarray

PREDICTIONS = ("eps", "x0", "v")


def diffuse(*, x0: Array, noise: Array, alpha: Array, sigma: Array) -> Array:
  """Ho et al. 2020, Eq. 4: x_t = alpha x0 + sigma eps."""
  return alpha * x0 + sigma * noise


def eps_to_x0(*, x_t: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """Ho et al. 2020, Eq. 15: x0 = (x_t - sigma eps) / alpha."""
  return (x_t - sigma * eps) / alpha


def x0_to_eps(*, x_t: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
  """eps = (x_t - alpha x0) / sigma."""
  return (x_t - alpha * x0) / sigma


def v_target(*, x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """Salimans & Ho 2022, Sec. 4: v = alpha eps - sigma x0."""
  return alpha * eps - sigma * x0


def v_to_x0(*, x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
  """Salimans & Ho 2022, App. D: x0 = alpha x_t - sigma v (VP only)."""
  return alpha * x_t - sigma * v


def v_to_eps(*, x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
  """eps = sigma x_t + alpha v (VP only)."""
  return sigma * x_t + alpha * v


def to_x0_eps(prediction: str, output: Array, *, x_t: Array, alpha: Array,
              sigma: Array) -> tuple[Array, Array]:
  """The (x0, eps) pair implied by a network output of the given parameterisation."""
  if prediction == "eps":
    return eps_to_x0(x_t=x_t, eps=output, alpha=alpha, sigma=sigma), output
  if prediction == "x0":
    return output, x0_to_eps(x_t=x_t, x0=output, alpha=alpha, sigma=sigma)
  if prediction == "v":
    return (v_to_x0(x_t=x_t, v=output, alpha=alpha, sigma=sigma),
            v_to_eps(x_t=x_t, v=output, alpha=alpha, sigma=sigma))
  raise ValueError(f"config.diffusion.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}.")


def target(prediction: str, *, x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """The regression target of a network with the given parameterisation."""
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return v_target(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
  raise ValueError(f"config.diffusion.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}.")
