"""Classifier-free guidance and its rescale against an analytic class-conditional denoiser.

Each class is an isotropic Gaussian N(mu_k, S^2 I) in D dimensions and the null label is their equal
mixture, so E[x0 | x_t, y] is known in closed form and eps, x0 and v "networks" can be exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import guidance
from diffusion import samplers
from diffusion import schedules

K, D, S = 3, 64, 0.3
MEANS = np.random.default_rng(0).normal(0.0, 0.5, (K, D))
SCHEDULE = schedules.create_schedule(schedule="linear", num_timesteps=1000)


def class_posterior(x, alpha, sigma, labels):
  """E[x0 | x_t] of class `labels` (K: the mixture of all classes), per example."""
  v = alpha**2 * S**2 + sigma**2
  diff = x[:, None, :] - alpha * MEANS  # [B, K, D]
  logr = -0.5 * jnp.sum(diff**2, -1) / v
  r = jax.nn.softmax(logr, axis=-1)
  r = jnp.where((labels == K)[:, None], r, jax.nn.one_hot(labels, K))
  return jnp.sum(r[..., None] * (MEANS + (alpha * S**2 / v) * diff), axis=1)


def apply_fn_for(prediction):
  """The exact network of each parameterisation: apply_fn(x, model_time, cond)."""
  def apply_fn(x, model_time, cond):
    labels = cond["label"]
    alpha, sigma = SCHEDULE.alpha_sigma(model_time[0] / 1000.0)
    x0 = class_posterior(x, alpha, sigma, labels)
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
  return apply_fn


def denoise_fn_for(prediction, **options):
  return guidance.make_denoise_fn(apply_fn_for(prediction), schedule=SCHEDULE, prediction=prediction,
                                  cond={"label": jnp.arange(16) % K},
                                  uncond={"label": jnp.full((16,), K)}, **options)


@pytest.mark.parametrize("t", [0.3, 0.7, 0.95])
def test_guidance_and_rescale_do_not_depend_on_the_parameterisation(t):
  """w = 5, phi = 0.7 (Lin et al. 2023): eps, x0 and v networks of one model give one guided x0_hat."""
  t = jnp.float32(t)
  alpha, sigma = SCHEDULE.alpha_sigma(t)
  labels = jnp.arange(16) % K
  x = alpha * jnp.asarray(MEANS)[labels] + sigma * jax.random.normal(jax.random.key(1), (16, D))
  out = {p: jax.jit(denoise_fn_for(p, guidance_scale=5.0, guidance_rescale=0.7))(x, t)
         for p in ("eps", "x0", "v")}
  for p in ("eps", "v"):
    np.testing.assert_allclose(out[p][0], out["x0"][0], atol=2e-4, err_msg=p)
    np.testing.assert_allclose(out[p][1], out["x0"][1], atol=2e-4, err_msg=p)
  # Eq. 16: phi x_cfg std(x_pos) / std(x_cfg) + (1 - phi) x_cfg has std phi std(x_pos) + (1 - phi) std(x_cfg).
  plain, _ = denoise_fn_for("x0", guidance_scale=5.0)(x, t)
  x0_cond, _ = denoise_fn_for("x0")(x, t)
  std = lambda a: np.asarray(jnp.std(a, axis=1))
  np.testing.assert_allclose(std(out["x0"][0]), 0.7 * std(x0_cond) + 0.3 * std(plain), rtol=1e-4)


def test_rescale_matches_the_conditional_std_in_x0():
  """phi = 1: std(x0_hat) per example is the conditional x0_hat's (Lin et al. 2023, Eq. 15), for an eps net."""
  t = jnp.float32(0.95)
  x = jax.random.normal(jax.random.key(2), (16, D))
  x0, eps = denoise_fn_for("eps", guidance_scale=5.0, guidance_rescale=1.0)(x, t)
  x0_cond, _ = denoise_fn_for("eps")(x, t)
  plain, _ = denoise_fn_for("eps", guidance_scale=5.0)(x, t)
  assert np.all(jnp.std(plain, axis=1) > 1.5 * jnp.std(x0_cond, axis=1))  # Guidance widens x0_hat here.
  np.testing.assert_allclose(jnp.std(x0, axis=1), jnp.std(x0_cond, axis=1), rtol=1e-4)
  alpha, sigma = SCHEDULE.alpha_sigma(t)
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, atol=1e-5)  # eps_hat follows x0_hat.


def test_guided_samples_do_not_depend_on_the_parameterisation():
  """DDIM, 50 steps, w = 5, phi = 0.7: the same samples from eps and v networks."""
  x_T = jax.random.normal(jax.random.key(3), (16, D))
  out = {}
  for p in ("eps", "v"):
    fn = jax.jit(lambda x, p=p: samplers.sample("ddim", denoise_fn_for(p, guidance_scale=5.0,
                                                                        guidance_rescale=0.7),
                                                x, jax.random.key(0), schedule=SCHEDULE, steps=50))
    out[p] = np.asarray(fn(x_T))
  np.testing.assert_allclose(out["eps"], out["v"], atol=1e-4)  # 0.1 when the raw output was rescaled.
