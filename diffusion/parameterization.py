"""The forward process and conversions between the network's possible outputs: eps, x0, v, edm, velocity,
consistency.

x_t = alpha x0 + sigma eps (Ho et al. 2020, Eq. 4) with alpha^2 + sigma^2 = 1, the currency of every
process (schedules.py); v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4).

Two parameterisations also choose the network's input (network_input), so that it sees the variable
of its own paper whatever the process:
- "edm" (Karras et al. 2022, Table 1, Eq. 7): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) in their
  variance-exploding x = x_t / alpha, sigma = sigma_t / alpha; the network is F. Written in x_t it is
  free of divisions by alpha (finite at SNR 0): with r = sqrt(sigma_t^2 + alpha^2 sigma_data^2), the
  standard deviation of x_t, c_in x = x_t / r, D = alpha sigma_data^2 / r^2 x_t + sigma_t sigma_data / r F.
  Trained with unit weight on F, the loss is EDM's lambda(sigma) |D - x0|^2, lambda = 1 / c_out^2
  (Eq. 8). With sigma_data = 1 it is v prediction up to sign: F = -v.
- "velocity" (flow matching, Lipman et al. 2023, Eq. 23; rectified flow, Liu et al. 2023, Eq. 1):
  u = eps - x0, the network seeing the flow's x = (1 - t) x0 + t eps = x_t / (alpha + sigma) on the
  "flow" process (on another process, the same rescaling of its x_t).
- "consistency" (Song et al. 2023, Eq. 5 and App. C): the network F of a consistency model, f(x, sigma)
  = c_skip x + c_out F(c_in x) with EDM's c_in and c_skip, c_out shifted so that f(x, sigma_min) = x
  (consistency_scalings). Its x0 is f; it is trained by the consistency task (training/consistency.py),
  not on a regression target.
c_noise, the time input, is the schedule's (Schedule.model_time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray

PREDICTIONS = ("eps", "x0", "v", "edm", "velocity", "consistency")


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


def edm_input_std(*, alpha: Array, sigma: Array, sigma_data: float) -> Array:
  """r = sqrt(sigma_t^2 + alpha^2 sigma_data^2) = alpha / c_in(sigma) (Karras et al. 2022, Table 1)."""
  return jnp.sqrt(sigma**2 + (alpha * sigma_data) ** 2)


def edm_target(*, x0: Array, eps: Array, alpha: Array, sigma: Array, sigma_data: float) -> Array:
  """Karras et al. 2022, Eq. 8: F = (x0 - c_skip x) / c_out, i.e.

  (sigma_t x0 - alpha sigma_data^2 eps) / (sigma_data r) in the currency.
  """
  r = edm_input_std(alpha=alpha, sigma=sigma, sigma_data=sigma_data)
  return (sigma * x0 - alpha * sigma_data**2 * eps) / (sigma_data * r)


def edm_to_x0(*, x_t: Array, f: Array, alpha: Array, sigma: Array, sigma_data: float) -> Array:
  """Karras et al. 2022, Eq. 7: D = c_skip x + c_out F, i.e.

  alpha sigma_data^2 / r^2 x_t + sigma_t sigma_data / r F in the currency.
  """
  r = edm_input_std(alpha=alpha, sigma=sigma, sigma_data=sigma_data)
  return (alpha * sigma_data**2 / r**2) * x_t + (sigma * sigma_data / r) * f


def edm_to_eps(*, x_t: Array, f: Array, alpha: Array, sigma: Array, sigma_data: float) -> Array:
  """eps = (x_t - alpha D) / sigma_t = sigma_t / r^2 x_t - alpha sigma_data / r F."""
  r = edm_input_std(alpha=alpha, sigma=sigma, sigma_data=sigma_data)
  return (sigma / r**2) * x_t - (alpha * sigma_data / r) * f


def consistency_scalings(*, sigma: Array, sigma_min: float,
                         sigma_data: float) -> tuple[Array, Array, Array]:
  """Song et al. 2023, App. C: c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), c_out =

  (sigma - sigma_min) sigma_data / sqrt(sigma_data^2 + sigma^2), and EDM's c_in = 1 / sqrt(sigma^2 +
  sigma_data^2); at sigma = sigma_min, c_skip = 1 and c_out = 0 exactly.
  """
  gap = sigma - sigma_min
  c_skip = sigma_data**2 / (gap**2 + sigma_data**2)
  c_out = gap * sigma_data * jax.lax.rsqrt(sigma_data**2 + sigma**2)
  return c_skip, c_out, jax.lax.rsqrt(sigma**2 + sigma_data**2)


def consistency_to_x0(*, x_t: Array, f: Array, alpha: Array, sigma: Array, sigma_data: float,
                      sigma_min: float) -> Array:
  """f(x, sigma) = c_skip x + c_out F in Karras's x = x_t / alpha, sigma = sigma_t / alpha."""
  c_skip, c_out, _ = consistency_scalings(sigma=sigma / alpha, sigma_min=sigma_min, sigma_data=sigma_data)
  return c_skip * (x_t / alpha) + c_out * f


def velocity_target(*, x0: Array, eps: Array) -> Array:
  """Liu et al. 2023, Eq. 1 (Lipman et al. 2023, Eq. 23): u = eps - x0, the flow's dx/dt."""
  return eps - x0


def velocity_to_x0(*, x_t: Array, u: Array, alpha: Array, sigma: Array) -> Array:
  """x0 = (x_t - sigma u) / (alpha + sigma): x_t = (alpha + sigma) x0 + sigma u; the flow's x - t u."""
  return (x_t - sigma * u) / (alpha + sigma)


def velocity_to_eps(*, x_t: Array, u: Array, alpha: Array, sigma: Array) -> Array:
  """eps = u + x0 = (x_t + alpha u) / (alpha + sigma); the flow's x + (1 - t) u."""
  return (x_t + alpha * u) / (alpha + sigma)


def _need_sigma_data(prediction: str, sigma_data: float | None) -> None:
  if prediction in ("edm", "consistency") and sigma_data is None:
    raise ValueError("The 'edm' parameterisation needs sigma_data (config.diffusion.sigma_data).")


def _unknown(prediction: str) -> ValueError:
  return ValueError(f"config.diffusion.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}.")


def network_input(prediction: str, *, x_t: Array, alpha: Array, sigma: Array,
                  sigma_data: float | None = None) -> Array:
  """What the network sees of x_t: x_t itself, EDM's c_in x = x_t / r (edm, consistency), or the flow's

  x_t / (alpha + sigma).
  """
  if prediction in ("eps", "x0", "v"):
    return x_t
  if prediction in ("edm", "consistency"):
    _need_sigma_data(prediction, sigma_data)
    return x_t / edm_input_std(alpha=alpha, sigma=sigma, sigma_data=sigma_data)
  if prediction == "velocity":
    return x_t / (alpha + sigma)
  raise _unknown(prediction)


def to_x0_eps(prediction: str, output: Array, *, x_t: Array, alpha: Array, sigma: Array,
              sigma_data: float | None = None, sigma_min: float = 0.0) -> tuple[Array, Array]:
  """The (x0, eps) pair implied by a network output of the given parameterisation.

  sigma_min: the Karras sigma where a consistency model is the identity (config.diffusion.sigma_min).
  """
  if prediction == "eps":
    return eps_to_x0(x_t=x_t, eps=output, alpha=alpha, sigma=sigma), output
  if prediction == "x0":
    return output, x0_to_eps(x_t=x_t, x0=output, alpha=alpha, sigma=sigma)
  if prediction == "v":
    return (v_to_x0(x_t=x_t, v=output, alpha=alpha, sigma=sigma),
            v_to_eps(x_t=x_t, v=output, alpha=alpha, sigma=sigma))
  if prediction == "edm":
    _need_sigma_data(prediction, sigma_data)
    common = dict(x_t=x_t, f=output, alpha=alpha, sigma=sigma, sigma_data=sigma_data)
    return edm_to_x0(**common), edm_to_eps(**common)
  if prediction == "velocity":
    return (velocity_to_x0(x_t=x_t, u=output, alpha=alpha, sigma=sigma),
            velocity_to_eps(x_t=x_t, u=output, alpha=alpha, sigma=sigma))
  if prediction == "consistency":
    _need_sigma_data(prediction, sigma_data)
    x0 = consistency_to_x0(x_t=x_t, f=output, alpha=alpha, sigma=sigma, sigma_data=sigma_data,
                           sigma_min=sigma_min)
    return x0, x0_to_eps(x_t=x_t, x0=x0, alpha=alpha, sigma=sigma)
  raise _unknown(prediction)


def target(prediction: str, *, x0: Array, eps: Array, alpha: Array, sigma: Array,
           sigma_data: float | None = None) -> Array:
  """The regression target of a network with the given parameterisation."""
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return v_target(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
  if prediction == "edm":
    _need_sigma_data(prediction, sigma_data)
    return edm_target(x0=x0, eps=eps, alpha=alpha, sigma=sigma, sigma_data=sigma_data)
  if prediction == "velocity":
    return velocity_target(x0=x0, eps=eps)
  if prediction == "consistency":
    raise ValueError("config.diffusion.prediction='consistency' has no regression target: it is trained "
                     "by config.distill.method='consistency'.")
  raise _unknown(prediction)
