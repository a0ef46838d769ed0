"""From a network to the samplers' denoise_fn: classifier-free guidance, its rescale, dynamic thresholding.

denoise_fn(x_t, t) -> (x0_hat, eps_hat) hides the network, its parameterisation and the guidance from
the samplers, so every sampler runs every model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp

from diffusion import learned_variance
from diffusion import parameterization
from diffusion import schedules

Array = jnp.ndarray
Cond = Mapping[str, Array]  # Conditioning by key: "label" int [B] (null class = num_classes), ...


def null_cond(*, num_classes: int, batch_size: int, empty_prompt: Array | None = None) -> dict[str, Array]:
  """The entries of the unconditional model's conditioning: the null label num_classes, and the
  empty prompt's token ids [T] as every row's "tokens" of a text model.

  Keys absent here (e.g. "concat", the masked image of an inpainting model) are never dropped.
  """
  null = {"label": jnp.full((batch_size,), num_classes, jnp.int32)} if num_classes else {}
  if empty_prompt is not None:
    null["tokens"] = jnp.broadcast_to(jnp.asarray(empty_prompt, jnp.int32), (batch_size, len(empty_prompt)))
  return null


def drop_cond(cond: Cond, *, null: Cond, drop: Array) -> dict[str, Array]:
  """Condition dropout (Ho & Salimans 2022): where drop [B] is True, each key of null replaces cond's."""
  def pick(key, value):
    if key not in null:
      return value
    where = drop.reshape((-1,) + (1,) * (value.ndim - 1))
    return jnp.where(where, null[key], value)
  return {key: pick(key, value) for key, value in cond.items()}


def concat_cond(a: Cond, b: Cond) -> dict[str, Array]:
  """Two conditioning dicts with the same keys as one, every key concatenated along the batch."""
  if set(a) != set(b):
    raise ValueError(f"Conditioning keys differ: {sorted(a)} and {sorted(b)}.")
  return {key: jnp.concatenate([a[key], b[key]]) for key in a}


def _per_example(x: Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def classifier_free_guidance(*, cond: Array, uncond: Array, scale: float | Array) -> Array:
  """Ho & Salimans 2022, Eq. 6: uncond + w (cond - uncond); w = 1 is conditional, w = 0 unconditional."""
  return uncond + scale * (cond - uncond)


def rescale_guidance(*, guided: Array, cond: Array, phi: float | Array) -> Array:
  """Lin et al. 2023, Sec. 3.4, Eq. 15-16: phi x_cfg std(x_pos) / std(x_cfg) + (1 - phi) x_cfg per example.

  make_denoise_fn applies it to x0_hat, whatever the network predicts.
  """
  axes = _per_example(guided)
  rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
  return phi * rescaled + (1.0 - phi) * guided


def dynamic_threshold(x0: Array, *, percentile: float) -> Array:
  """Saharia et al. 2022, Sec. 2.3: s = max(1, percentile p of |x0|) per example; clip(x0, -s, s) / s."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def make_denoise_fn(apply_fn: Callable[[Array, Array, Any], Array], *, schedule: schedules.Schedule,
                    prediction: str, cond: Cond | None = None, uncond: Cond | None = None,
                    guidance_scale: float | Array = 1.0, guidance_rescale: float = 0.0,
                    dynamic_threshold: float | None = None, clip_x0: bool = False,
                    learned: bool = False,
                    return_variance: bool = False) -> Callable[[Array, Array], tuple[Array, ...]]:
  """denoise_fn(x_t, t) -> (x0_hat, eps_hat) from apply_fn(x, model_time, cond) -> network output.

  t is a scalar, or one time per example ([B], as consistency distillation's teacher sees).
  The network sees parameterization.network_input of x_t (x_t itself for eps, x0 and v) and
  model_time = schedule.model_time(t) broadcast to [B]; cond is a dict of conditioning arrays
  (guidance.Cond) or None. With uncond (the same keys, e.g. the null label), classifier-free guidance
  of scale w mixes the conditional and unconditional outputs, both from one forward pass of the doubled
  batch (every key of cond and uncond concatenated); a Python w = 1 (without rescale) skips the
  unconditional half. Guidance mixes the
  two x0_hat (the same as mixing eps_hat or v_hat: each is affine in the other at fixed x_t), and the
  rescale (phi = guidance_rescale) matches std(x0_hat) to the conditional one's, so it does the same for
  eps, x0 and v networks; diffusers rescales the raw output, which for an eps network barely changes
  x0_hat (the std of eps_hat is dominated by the noise). dynamic_threshold = p clips x0_hat at the
  p-th percentile of |x0_hat|; clip_x0 clips it to the data range [-1, 1] (DDPM's clip_denoised, Ho et
  al. 2020's sampler; it keeps eps models stable where alpha(t) is near 0). After a rescale or a clip,
  eps_hat is recomputed from x0_hat, so the pair stays consistent with x_t = alpha x0 + sigma eps.
  learned: the network also outputs variance values v (learned_variance.split_output); guidance mixes
  the predictions alone and keeps the conditional v (as DiT). return_variance: denoise_fn returns
  (x0_hat, eps_hat, v), for the DDPM step with the learned variance.
  """
  if return_variance and not learned:
    raise ValueError("return_variance needs a network with learned variances (learned=True).")
  plain = isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0 and not guidance_rescale
  guided = cond is not None and not plain
  if guided and uncond is None:
    raise ValueError("classifier-free guidance (config.sample.guidance_scale != 1) needs the null label "
                     "of a model trained with config.diffusion.p_uncond > 0.")
  both = concat_cond(cond, uncond) if guided else None

  # A consistency model is the identity at the process's smallest sigma (parameterization.py).
  boundary = {}
  if prediction == "consistency":
    boundary["sigma_min"] = jnp.exp(-0.5 * schedule.logsnr(schedule.t_min))

  def denoise_fn(x: Array, t: Array) -> tuple[Array, Array]:
    alpha, sigma = (a.astype(x.dtype) for a in schedule.alpha_sigma(t))
    if jnp.ndim(t):  # A time per example, [B].
      alpha, sigma = (a.reshape((-1,) + (1,) * (x.ndim - 1)) for a in (alpha, sigma))
    model_time = jnp.broadcast_to(schedule.model_time(t), (x.shape[0],))
    level = dict(alpha=alpha, sigma=sigma, sigma_data=schedule.sigma_data)
    x_in = parameterization.network_input(prediction, x_t=x, **level)
    if guided:
      out = apply_fn(jnp.concatenate([x_in, x_in]), jnp.concatenate([model_time, model_time]), both)
      out_cond, out_uncond = jnp.split(out.astype(x.dtype), 2)
      out_cond, v = learned_variance.split_output(out_cond, learned=learned)
      out_uncond, _ = learned_variance.split_output(out_uncond, learned=learned)
      x0_cond, eps_cond = parameterization.to_x0_eps(prediction, out_cond, x_t=x, **level, **boundary)
      x0_uncond, eps_uncond = parameterization.to_x0_eps(prediction, out_uncond, x_t=x, **level, **boundary)
      x0 = classifier_free_guidance(cond=x0_cond, uncond=x0_uncond, scale=guidance_scale)
      eps = classifier_free_guidance(cond=eps_cond, uncond=eps_uncond, scale=guidance_scale)
      if guidance_rescale:
        x0 = rescale_guidance(guided=x0, cond=x0_cond, phi=guidance_rescale)
        eps = parameterization.x0_to_eps(x_t=x, x0=x0, alpha=alpha, sigma=sigma)
    else:
      out = apply_fn(x_in, model_time, cond).astype(x.dtype)
      out, v = learned_variance.split_output(out, learned=learned)
      x0, eps = parameterization.to_x0_eps(prediction, out, x_t=x, **level, **boundary)
    if dynamic_threshold is not None:
      x0 = _threshold(x0, percentile=dynamic_threshold)
    elif clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    if dynamic_threshold is not None or clip_x0:
      eps = parameterization.x0_to_eps(x_t=x, x0=x0, alpha=alpha, sigma=sigma)
    return (x0, eps, v) if return_variance else (x0, eps)

  return denoise_fn


_threshold = dynamic_threshold  # make_denoise_fn's argument of the same name shadows it.
