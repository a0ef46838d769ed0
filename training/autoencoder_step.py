"""The KL autoencoder's train state and pure train step: reconstruction + KL (+ PatchGAN, + LPIPS).

The loss is taming-transformers' LPIPSWithDiscriminator as Stable Diffusion trains its autoencoder
(Rombach et al. 2022, App. G; Esser et al. 2021, Sec. 3): per image, the pixel loss summed over pixels
(+ lpips_weight * LPIPS per pixel), + kl_weight * KL summed over latents, + lambda * disc_weight *
the generator's hinge loss once step >= disc_start; the discriminator learns the hinge loss on inputs
against reconstructions from disc_start on. One compiled program: before disc_start the GAN terms
are multiplied by 0 and the discriminator's update is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from training import train_step as train_step_lib

RECONSTRUCTIONS = ("l1", "l2")  # config.autoencoder_loss.reconstruction.
ADAPTIVE_WEIGHT_MAX = 1e4  # taming clamps lambda to [0, 1e4].


@flax.struct.dataclass
class AutoencoderState:
  """The generator (autoencoder) as TrainState, and the discriminator (None without a GAN loss)."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


@dataclasses.dataclass(frozen=True)
class AutoencoderLoss:
  """config.autoencoder_loss, as the train step reads it."""

  reconstruction: str = "l1"
  kl_weight: float = 1e-6
  sample_posterior: bool = True
  disc_weight: float = 0.0
  disc_start: int = 0
  adaptive_weight: bool = True
  lpips_weight: float = 0.0

  @classmethod
  def from_config(cls, loss_config: ml_collections.ConfigDict) -> "AutoencoderLoss":
    return cls(**{f.name: loss_config[f.name] for f in dataclasses.fields(cls)})


def reconstruction_loss(x_hat: jax.Array, x: jax.Array, *, kind: str) -> jax.Array:
  """Per image: sum over pixels of |x_hat - x| ("l1") or (x_hat - x)^2 ("l2")."""
  diff = x_hat - x
  per_pixel = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  return jnp.sum(per_pixel, axis=tuple(range(1, x.ndim)))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss 0.5 (E relu(1 - D(x)) + E relu(1 + D(x_hat))) (Lim & Ye 2017; taming)."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator loss -E D(x_hat) of the hinge GAN."""
  return -jnp.mean(logits_fake)


def adaptive_weight(*, rec_grad: jax.Array, gan_grad: jax.Array) -> jax.Array:
  """lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + 1e-4), clipped to [0, 1e4] (Esser et al. 2021, Eq. 7)."""
  ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX))


def psnr(x_hat: jax.Array, x: jax.Array) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(jnp.clip(x_hat, -1.0, 1.0) - x), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def last_layer(params: Any) -> jax.Array:
  """G_L of Eq. 7: the kernel of the decoder's output convolution."""
  return params["decoder"]["conv_out"]["kernel"]


def init_state(rng: jax.Array, *, model: nn.Module, discriminator: Optional[nn.Module],
               tx: optax.GradientTransformation, image_shape: tuple[int, ...]) -> AutoencoderState:
  """Fresh autoencoder parameters, their EMA, the optimizer states, and the discriminator's if any."""
  model_rng, disc_rng = jax.random.split(rng)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(model_rng, x)["params"]
  disc_params = disc_opt_state = None
  if discriminator is not None:
    disc_params = discriminator.init(disc_rng, x)["params"]
    disc_opt_state = tx.init(disc_params)
  return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params), disc_params=disc_params,
                          disc_opt_state=disc_opt_state)


def train_step(state: AutoencoderState, batch: dict[str, jax.Array], lpips_params: Any, *,
               model: nn.Module, discriminator: Optional[nn.Module],
               lpips_fn: Optional[Callable[..., jax.Array]], tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, loss: AutoencoderLoss, ema_decay: float,
               rng: jax.Array) -> tuple[AutoencoderState, dict[str, jax.Array]]:
  """One step of the autoencoder and (from disc_start) of the discriminator; non-finite is refused.

  lpips_fn(lpips_params, x_hat, x) -> [B] distances, or None without the LPIPS term.
  """
  rng = jax.random.fold_in(rng, state.step)
  x = batch["image"]
  gan = discriminator is not None
  gan_on = (state.step >= loss.disc_start).astype(jnp.float32) if gan else jnp.zeros(())

  def losses(params):
    """(rec + KL, generator GAN loss), with the terms for the metrics."""
    x_hat, posterior = model.apply({"params": params}, x, rng if loss.sample_posterior else None)
    pixel = reconstruction_loss(x_hat, x, kind=loss.reconstruction)
    perceptual = jnp.zeros(x.shape[0])
    if lpips_fn is not None:
      perceptual = lpips_fn(lpips_params, x_hat, x)
    # taming adds LPIPS to every pixel's loss before the sum over pixels.
    rec = pixel + loss.lpips_weight * perceptual * x[0].size
    kl = posterior.kl()
    g_loss = jnp.zeros(())
    if gan:
      g_loss = hinge_g_loss(discriminator.apply({"params": state.disc_params}, x_hat))
    aux = {"x_hat": x_hat, "pixel": jnp.mean(pixel), "kl": jnp.mean(kl), "lpips": jnp.mean(perceptual)}
    return (jnp.mean(rec) + loss.kl_weight * jnp.mean(kl), g_loss), aux

  if gan:
    (nll, g_loss), vjp_fn, aux = jax.vjp(losses, state.params, has_aux=True)
    (nll_grads,) = vjp_fn((jnp.ones(()), jnp.zeros(())))
    (gan_grads,) = vjp_fn((jnp.zeros(()), jnp.ones(())))
    weight = (adaptive_weight(rec_grad=last_layer(nll_grads), gan_grad=last_layer(gan_grads))
              if loss.adaptive_weight else jnp.ones(()))
    g_scale = gan_on * loss.disc_weight * weight
    grads = jax.tree.map(lambda a, b: a + g_scale * b, nll_grads, gan_grads)
  else:
    def nll_fn(params):
      (nll, g_loss), aux = losses(params)
      return nll, (g_loss, aux)

    (nll, (g_loss, aux)), grads = jax.value_and_grad(nll_fn, has_aux=True)(state.params)
    weight = g_scale = jnp.zeros(())
  total = nll + g_scale * g_loss
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  disc_params, disc_opt_state, d_loss = state.disc_params, state.disc_opt_state, jnp.zeros(())
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  if gan:
    x_hat = jax.lax.stop_gradient(aux["x_hat"])

    def d_loss_fn(disc_params):
      logits = discriminator.apply({"params": disc_params}, jnp.concatenate([x, x_hat]))
      real, fake = jnp.split(logits, 2)
      return hinge_d_loss(real, fake)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
    d_updates, new_d_opt = tx.update(d_grads, state.disc_opt_state, state.disc_params)
    new_d_params = optax.apply_updates(state.disc_params, d_updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(gan_on > 0, n, o), new, old)
    disc_params, disc_opt_state = keep(new_d_params, disc_params), keep(new_d_opt, disc_opt_state)
    finite = finite & jnp.isfinite(d_loss) & jnp.isfinite(optax.global_norm(d_grads))

  new_state = AutoencoderState(
      step=state.step + 1, params=params,
      ema_params=train_step_lib.ema_update(state.ema_params, params, ema_decay), opt_state=opt_state,
      disc_params=disc_params, disc_opt_state=disc_opt_state)
  # Refuse a non-finite update; the host sees finite=False and stops the run naming the step.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  pixels = x[0].size
  metrics = {"loss": total, "grad_norm": grad_norm, "learning_rate": lr_fn(state.step),
             "finite": finite, "step": state.step,
             "reconstruction": aux["pixel"] / pixels, "kl": aux["kl"], "lpips": aux["lpips"],
             "g_loss": g_loss, "d_loss": d_loss, "adaptive_weight": weight, "gan_on": gan_on}
  return new_state, metrics
