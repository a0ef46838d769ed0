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
from diffusion import learned_variance
from diffusion import losses
from diffusion import parameterization
from diffusion import schedules
from training import adamw


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
  time_sampling: str = "uniform"  # One of TIME_SAMPLINGS (sample_times).
  time_mean: float = 0.0  # Of logit(t) ("logit_normal") or ln(sigma) ("lognormal_sigma").
  time_std: float = 1.0
  learn_sigma: bool = False  # The network also outputs its variances: the hybrid loss (losses.hybrid_loss).

  @classmethod
  def from_config(cls, diffusion_config: ml_collections.ConfigDict, *,
                  learn_sigma: bool = False) -> "DiffusionHParams":
    d = diffusion_config
    mean, std = {"logit_normal": (d.logit_mean, d.logit_std),
                 "lognormal_sigma": (d.p_mean, d.p_std)}.get(d.time_sampling, (0.0, 1.0))
    return cls(prediction=d.prediction, loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma,
               p_uncond=d.p_uncond, time_sampling=d.time_sampling, time_mean=mean, time_std=std,
               learn_sigma=learn_sigma)


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to learning_rate over warmup_steps, then constant (Ho et al. 2020, App. B).

  Step k (counted from 0) uses learning_rate * min((k + 1) / warmup_steps, 1): the first step moves.
  """
  if warmup_steps <= 0:
    return optax.constant_schedule(learning_rate)
  return lambda step: learning_rate * jnp.minimum((step + 1) / warmup_steps, 1.0)


def create_optimizer(optim_config: ml_collections.ConfigDict) -> tuple[adamw.AdamW, optax.Schedule]:
  """Adam(W) with warm-up and global-norm clipping, from config.optim (optax's, and fused with the EMA)."""
  lr = learning_rate_schedule(learning_rate=optim_config.learning_rate,
                              warmup_steps=optim_config.warmup_steps)
  return adamw.AdamW(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                     weight_decay=optim_config.weight_decay, grad_clip=optim_config.grad_clip), lr


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...], num_classes: int, concat_channels: int = 0,
               text: Any = None, context_width: int = 0) -> TrainState:
  """Fresh parameters, their EMA copy and the optimizer state.

  concat_channels: extra input channels of cond["concat"] (SD-inpainting's mask + masked latents).
  text: a text model's training/text.TextConditioning; a trainable encoder's params join the state's.
  context_width: without text, the width of a cross-attention model's cond["context"] (the shapes of a
  LoRA run's base, whose frozen encoder adds no parameters); 0 for a model that reads none.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  cond = {"label": jnp.zeros((1,), jnp.int32)} if num_classes else {}
  if concat_channels:
    cond["concat"] = jnp.zeros((1, *image_shape[:-1], concat_channels), jnp.float32)
  if text is not None:
    cond["context"] = jnp.zeros((1, text.encoder.max_length, text.encoder.width), jnp.float32)
  elif context_width:
    cond["context"] = jnp.zeros((1, 1, context_width), jnp.float32)
  model_rng, text_rng = jax.random.split(rng)
  params = model.init(model_rng if text is not None else rng, x, jnp.zeros((1,)), cond,
                      train=False)["params"]
  if text is not None:
    params = text.state_params(text_rng, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


# config.diffusion.time_sampling: the distribution of training times (sample_times).
TIME_SAMPLINGS = ("uniform", "logit_normal", "lognormal_sigma")


def sample_times(rng: jax.Array, batch_size: int, schedule: schedules.Schedule, *,
                 distribution: str = "uniform", mean: float = 0.0, std: float = 1.0) -> jax.Array:
  """Training times: "uniform" over the T discrete steps i / T, or over [t_min, 1] in continuous time

  (t_min = 1e-5, Song et al. 2021, App. D.2), so the likelihood ODE, which starts at t_min, runs
  where the network was trained. In continuous time also "logit_normal": logit(t) ~ N(mean, std^2)
  (Esser et al. 2024, Sec. 3.1), and "lognormal_sigma": ln(sigma) ~ N(mean, std^2) for Karras's sigma =
  sigma_t / alpha_t (Karras et al. 2022, Sec. 5: P_mean, P_std); both clipped to [t_min, 1].
  """
  if distribution not in TIME_SAMPLINGS:
    raise ValueError(f"config.diffusion.time_sampling={distribution!r} is not one of "
                     f"{', '.join(TIME_SAMPLINGS)}.")
  if schedule.num_timesteps:
    if distribution != "uniform":
      raise ValueError(f"config.diffusion.time_sampling={distribution!r} needs continuous time "
                       f"(config.diffusion.num_timesteps=0), got {schedule.num_timesteps}.")
    i = jax.random.randint(rng, (batch_size,), 1, schedule.num_timesteps + 1)
    return i.astype(jnp.float32) / schedule.num_timesteps
  if distribution == "uniform":
    return jax.random.uniform(rng, (batch_size,), minval=schedule.t_min, maxval=1.0)
  z = mean + std * jax.random.normal(rng, (batch_size,))
  t = jax.nn.sigmoid(z) if distribution == "logit_normal" else schedule.t_from_logsnr(-2.0 * z)
  return jnp.clip(t, schedule.t_min, 1.0)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


Encode = Callable[[Any, jax.Array, jax.Array], jax.Array]
Condition = Callable[[Any, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def apply_if_finite(finite: jax.Array, state: TrainState, grads: Any, *,
                    tx: optax.GradientTransformation, ema_decay: float,
                    grad_norm: jax.Array | None = None) -> TrainState:
  """The optimizer and EMA update of state by grads if finite, else state unchanged (step included).

  A lax.cond rather than a select of new against old state: the select read and wrote every parameter,
  moment and EMA array once more, about 40% of the update's time on CPU (bench/optimizer.py). AdamW
  (create_optimizer) updates parameters, moments and EMA in one pass (adamw.AdamW.update_with_ema).
  """
  def update(state):
    if isinstance(tx, adamw.AdamW):
      params, opt_state, ema = tx.update_with_ema(state.params, grads, state.opt_state, state.ema_params,
                                                  ema_decay=ema_decay, grad_norm=grad_norm)
      return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params,
                         ema_params=ema_update(state.ema_params, params, ema_decay), opt_state=opt_state)
  return jax.lax.cond(finite, update, lambda state: state, state)



def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *,
               model: nn.Module, schedule: schedules.Schedule, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, hparams: DiffusionHParams, num_classes: int,
               ema_decay: float, rng: jax.Array, encode: Encode | None = None,
               condition: Condition | None = None,
               params_fn: Callable[[Any, Any], Any] | None = None,
               text: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the denoising loss; a non-finite loss or gradient leaves the state as it was.

  encode(frozen, images, rng) -> x0 maps the batch's images into the space the model diffuses in
  (training/spaces.py; None: pixels as they are); frozen holds its fixed parameters (e.g. the
  autoencoder's). condition(frozen, batch, rng) -> cond dict (None: {"label": batch["label"]} for a
  class-conditional model); with probability p_uncond an example's entries are replaced by the null
  ones (guidance.null_cond), key by key. params_fn(frozen, state.params) -> the model's parameters
  (None: state.params; LoRA: the frozen base with the trained adapters merged, training/lora.py).
  The step's randomness is fold_in(rng, step), so a resumed run draws what an uninterrupted one would.

  text (training/text.TextConditioning) makes it a text model's step: frozen then holds "text", a
  frozen encoder's params, beside "space" (and a LoRA run's "base"); cond["tokens"] are dropped to the
  empty prompt's and become cond["context"] inside the loss, so a trainable encoder (the state's
  params[TEXT]) gets gradients.
  """
  frozen_text = None
  if text is not None:  # {"space", "text"} -> the space's; {"space", "base", "text"} -> LoRA's pair.
    frozen_text = frozen["text"]
    frozen = frozen["space"] if params_fn is None else {k: v for k, v in frozen.items() if k != "text"}
  rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
  encode_rng, cond_rng = jax.random.split(jax.random.fold_in(rng, 1))
  images = batch["image"]
  x0 = images if encode is None else encode(frozen, images, encode_rng)
  batch_size = x0.shape[0]

  # Forward process at random times.
  t = sample_times(t_rng, batch_size, schedule, distribution=hparams.time_sampling,
                   mean=hparams.time_mean, std=hparams.time_std)
  alpha, sigma = schedule.alpha_sigma(t)
  logsnr = schedule.logsnr(t)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  bcast = lambda a: a[:, None, None, None]
  x_t = parameterization.diffuse(x0=x0, noise=noise, alpha=bcast(alpha), sigma=bcast(sigma))
  x_in = parameterization.network_input(hparams.prediction, x_t=x_t, alpha=bcast(alpha),
                                        sigma=bcast(sigma), sigma_data=schedule.sigma_data)

  # Condition dropout to the null entries trains the unconditional model for classifier-free guidance.
  if condition is not None:
    cond = condition(frozen, batch, cond_rng)
  else:
    cond = {"label": batch["label"]} if num_classes else {}
  drop = jax.random.uniform(label_rng, (batch_size,)) < hparams.p_uncond
  null = guidance.null_cond(num_classes=num_classes, batch_size=batch_size,
                            empty_prompt=None if text is None else text.empty_ids)
  cond = guidance.drop_cond(cond, null=null, drop=drop)

  def loss_fn(params):
    model_params, text_params = params, frozen_text
    if text is not None:
      model_params, text_params = text.split(params, frozen_text)
    if params_fn is not None:
      model_params = params_fn(frozen, model_params)
    model_cond = cond if text is None else text.with_context(text_params, cond)
    output = model.apply({"params": model_params}, x_in, schedule.model_time(t), model_cond, train=True,
                         rngs={"dropout": dropout_rng})
    if hparams.learn_sigma:  # The network's variances too: L_hybrid (Nichol & Dhariwal 2021, Eq. 16).
      output, v = learned_variance.split_output(output, learned=True)
      return jnp.mean(losses.hybrid_loss(
          output, v=v, x0=x0, eps=noise, x_t=x_t, t=t, schedule=schedule, prediction=hparams.prediction,
          weighting=hparams.loss_weighting, gamma=hparams.min_snr_gamma))
    per_example = losses.denoising_loss(
        output, x0=x0, eps=noise, alpha=alpha, sigma=sigma, logsnr=logsnr,
        prediction=hparams.prediction, weighting=hparams.loss_weighting, gamma=hparams.min_snr_gamma,
        sigma_data=schedule.sigma_data)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.global_norm(grads)
  # Refuse a non-finite update; the host sees finite=False and stops the run naming the step.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = apply_if_finite(finite, state, grads, tx=tx, ema_decay=ema_decay,
                              grad_norm=grad_norm)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_fn(state.step),
             "finite": finite, "step": state.step}
  return new_state, metrics


def make_train_step(**kwargs) -> Callable[..., tuple[TrainState, dict]]:
  """train_step with its static arguments bound, ready for jax.jit: step(state, batch, frozen=None)."""
  def step(state, batch, frozen=None):
    return train_step(state, batch, frozen, **kwargs)
  return step
