"""The train state, the optimizer and the pure train step (state, batch) -> (state, metrics)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion import guidance
from diffusion import losses
from diffusion import parameterization
from diffusion import schedules


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class DiffusionHParams:
  """The part of config.diffusion the train step reads."""

  prediction: str = "eps"
  loss_weighting: str = "simple"
  min_snr_gamma: float = 5.0
  p_uncond: float = 0.0

  @classmethod
  def from_config(cls, diffusion_config: ml_collections.ConfigDict) -> "DiffusionHParams":
    return cls(prediction=diffusion_config.prediction, loss_weighting=diffusion_config.loss_weighting,
               min_snr_gamma=diffusion_config.min_snr_gamma, p_uncond=diffusion_config.p_uncond)


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to learning_rate over warmup_steps, then constant (Ho et al. 2020, App. B).

  Step k (counted from 0) uses learning_rate * min((k + 1) / warmup_steps, 1): the first step moves.
  """
  if warmup_steps <= 0:
    return optax.constant_schedule(learning_rate)
  return lambda step: learning_rate * jnp.minimum((step + 1) / warmup_steps, 1.0)


def create_optimizer(optim_config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                        optax.Schedule]:
  """Adam(W) with warm-up and global-norm clipping, from config.optim."""
  lr = learning_rate_schedule(learning_rate=optim_config.learning_rate,
                              warmup_steps=optim_config.warmup_steps)
  adam = optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                     weight_decay=optim_config.weight_decay)
  if optim_config.grad_clip > 0:
    adam = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adam)
  return adam, lr


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...], num_classes: int, concat_channels: int = 0) -> TrainState:
  """Fresh parameters, their EMA copy and the optimizer state.

  concat_channels: extra input channels of cond["concat"] (SD-inpainting's mask + masked latents).
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  cond = {"label": jnp.zeros((1,), jnp.int32)} if num_classes else {}
  if concat_channels:
    cond["concat"] = jnp.zeros((1, *image_shape[:-1], concat_channels), jnp.float32)
  params = model.init(rng, x, jnp.zeros((1,)), cond, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def sample_times(rng: jax.Array, batch_size: int, schedule: schedules.Schedule) -> jax.Array:
  """Training times: uniform over the T discrete steps i / T, or over [t_min, 1] in continuous time

  (t_min = 1e-5, Song et al. 2021, App. D.2), so the likelihood ODE, which starts at t_min, runs
  where the network was trained.
  """
  if schedule.num_timesteps:
    i = jax.random.randint(rng, (batch_size,), 1, schedule.num_timesteps + 1)
    return i.astype(jnp.float32) / schedule.num_timesteps
  return jax.random.uniform(rng, (batch_size,), minval=schedule.t_min, maxval=1.0)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


Encode = Callable[[Any, jax.Array, jax.Array], jax.Array]
Condition = Callable[[Any, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *,
               model: nn.Module, schedule: schedules.Schedule, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, hparams: DiffusionHParams, num_classes: int,
               ema_decay: float, rng: jax.Array, encode: Encode | None = None,
               condition: Condition | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the denoising loss; a non-finite loss or gradient leaves the state as it was.

  encode(frozen, images, rng) -> x0 maps the batch's images into the space the model diffuses in
  (training/spaces.py; None: pixels as they are); frozen holds its fixed parameters (e.g. the
  autoencoder's). condition(frozen, batch, rng) -> cond dict (None: {"label": batch["label"]} for a
  class-conditional model); with probability p_uncond an example's entries are replaced by the null
  ones (guidance.null_cond), key by key. The step's randomness is fold_in(rng, step), so a resumed run
  draws what an uninterrupted one would.
  """
  rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
  encode_rng, cond_rng = jax.random.split(jax.random.fold_in(rng, 1))
  images = batch["image"]
  x0 = images if encode is None else encode(frozen, images, encode_rng)
  batch_size = x0.shape[0]

  # Forward process at random times.
  t = sample_times(t_rng, batch_size, schedule)
  alpha, sigma = schedule.alpha_sigma(t)
  logsnr = schedule.logsnr(t)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  bcast = lambda a: a[:, None, None, None]
  x_t = parameterization.diffuse(x0=x0, noise=noise, alpha=bcast(alpha), sigma=bcast(sigma))

  # Condition dropout to the null entries trains the unconditional model for classifier-free guidance.
  if condition is not None:
    cond = condition(frozen, batch, cond_rng)
  else:
    cond = {"label": batch["label"]} if num_classes else {}
  drop = jax.random.uniform(label_rng, (batch_size,)) < hparams.p_uncond
  cond = guidance.drop_cond(cond, null=guidance.null_cond(num_classes=num_classes,
                                                          batch_size=batch_size), drop=drop)

  def loss_fn(params):
    output = model.apply({"params": params}, x_t, schedule.model_time(t), cond, train=True,
                         rngs={"dropout": dropout_rng})
    per_example = losses.denoising_loss(
        output, x0=x0, eps=noise, alpha=alpha, sigma=sigma, logsnr=logsnr,
        prediction=hparams.prediction, weighting=hparams.loss_weighting, gamma=hparams.min_snr_gamma)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params,
                         ema_params=ema_update(state.ema_params, params, ema_decay), opt_state=opt_state)

  # Refuse a non-finite update; the host sees finite=False and stops the run naming the step.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_fn(state.step),
             "finite": finite, "step": state.step}
  return new_state, metrics


def make_train_step(**kwargs) -> Callable[..., tuple[TrainState, dict]]:
  """train_step with its static arguments bound, ready for jax.jit: step(state, batch, frozen=None)."""
  def step(state, batch, frozen=None):
    return train_step(state, batch, frozen, **kwargs)
  return step
