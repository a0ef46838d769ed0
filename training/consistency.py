"""Consistency distillation and consistency training as a task of the training loop (tasks.TASKS).

config.distill.method = "consistency" trains a consistency model (diffusion/consistency.py) on the
"edm" process with config.diffusion.prediction = "consistency": by distillation (CM, Alg. 2) from the
diffusion run config.distill.teacher (any process and parameterisation trained here, read as Karras's
denoiser, one Heun step of its probability-flow ODE per target), or without a teacher by consistency
training with the improved recipe (iCT) when config.distill.teacher is None. The keys are config.consistency.

The state is TrainState plus target_params, the target network theta^- = EMA of the parameters with
decay config.consistency.target_decay (mu, CM Eq. 8; 0 = the online network under stop-gradient, iCT);
ema_params (config.optim.ema_decay) are what is sampled. The target sees the online network's dropout
mask (iCT, Sec. 3.2). Conditioning is the diffusion task's dict, dropped to the null entries with
config.diffusion.p_uncond; the teacher sees the same dict, guided with config.consistency.teacher_guidance_scale.

Latent consistency models (LCM, Luo et al. 2023) are this code with: config.latent.autoencoder set (the
student and teacher run on the same latents; the space's encode is already the step's), a text- or
class-conditional teacher with p_uncond > 0 and teacher_guidance_scale = w > 1 (their guided teacher
step), and w as one more conditioning input of the student: a key cond["guidance_scale"] [B] filled
here with w drawn per example, and the embedding layer in the model that reads it. LCM's skipping step
(k = 20 between sigma_{n+k} and sigma_n) is s0 = s1 = N - 1 with a coarse N; they use DDIM rather than
Heun as the teacher's solver. Only the key and the embedding layer are not built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from diffusion import consistency
from diffusion import guidance
from training import spaces
from training import train_step as train_step_lib


@flax.struct.dataclass
class ConsistencyState(train_step_lib.TrainState):
  target_params: Any  # theta^-, the target network's parameters.


@dataclasses.dataclass(frozen=True)
class ConsistencyHParams:
  """config.consistency and the student's sigma range, as the step reads them."""

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  loss: str = "pseudo_huber"
  huber_c: Optional[float] = None  # None: 0.00054 sqrt(d).
  weighting: str = "inverse_gap"
  noise_sampling: str = "lognormal"
  p_mean: float = -1.1
  p_std: float = 2.0
  s0: int = 10
  s1: int = 1280
  total_steps: int = 400_000
  target_decay: float = 0.0
  teacher_guidance_scale: float = 1.0
  p_uncond: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ConsistencyHParams":
    c, d = config.consistency, config.diffusion
    return cls(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data, loss=c.loss,
               huber_c=c.huber_c, weighting=c.weighting, noise_sampling=c.noise_sampling, p_mean=c.p_mean,
               p_std=c.p_std, s0=c.s0, s1=c.s1, total_steps=config.training.num_steps,
               target_decay=c.target_decay, teacher_guidance_scale=c.teacher_guidance_scale,
               p_uncond=d.p_uncond)


def init_state(rng: jax.Array, **kwargs) -> ConsistencyState:
  """train_step.init_state's state, with the target network starting at the parameters."""
  s = train_step_lib.init_state(rng, **kwargs)
  return ConsistencyState(step=s.step, params=s.params, ema_params=s.ema_params, opt_state=s.opt_state,
                          target_params=s.params)


def teacher_heun_step(teacher, params: Any, x: jax.Array, cond: dict, *, sigma: jax.Array,
                      sigma_next: jax.Array, num_classes: int, guidance_scale: float) -> jax.Array:
  """CM, Alg. 2: one Heun step of the teacher's PF-ODE from sigma to sigma_next, classifier-free guided."""
  apply_fn = lambda x_in, t_in, c: teacher.model.apply({"params": params}, x_in, t_in, c, train=False)
  uncond = {**cond, **guidance.null_cond(num_classes=num_classes, batch_size=x.shape[0])}
  denoise_fn = guidance.make_denoise_fn(
      apply_fn, schedule=teacher.schedule, prediction=teacher.config.diffusion.prediction,
      cond=cond or None, uncond=uncond if num_classes else None, guidance_scale=guidance_scale)
  denoiser = consistency.teacher_denoiser(denoise_fn, schedule=teacher.schedule)
  return consistency.heun_step(denoiser, x, sigma=sigma, sigma_next=sigma_next)


def train_step(state: ConsistencyState, batch: dict[str, jax.Array], frozen: Any = None, *,
               model: Any, schedule: Any, tx: optax.GradientTransformation, lr_fn: optax.Schedule,
               hparams: ConsistencyHParams, num_classes: int, ema_decay: float, rng: jax.Array,
               encode: Any = None, condition: Any = None,
               teacher: Any = None) -> tuple[ConsistencyState, dict[str, jax.Array]]:
  """One step of CM's Alg. 2 (teacher given) or Alg. 3 with iCT's recipe; frozen = {"space", "teacher"}.

  The step's randomness is fold_in(rng, step), and N(k) a function of the step, so a resumed run repeats
  an uninterrupted one.
  """
  frozen = frozen or {}
  rng = jax.random.fold_in(rng, state.step)
  level_rng, noise_rng, drop_rng, dropout_rng, encode_rng, cond_rng = jax.random.split(rng, 6)
  images = batch["image"]
  x0 = images if encode is None else encode(frozen.get("space"), images, encode_rng)
  batch_size = x0.shape[0]
  cond = condition(frozen.get("space"), batch, cond_rng) if condition is not None else (
      {"label": batch["label"]} if num_classes else {})
  drop = jax.random.uniform(drop_rng, (batch_size,)) < hparams.p_uncond
  cond = guidance.drop_cond(cond, null=guidance.null_cond(num_classes=num_classes,
                                                          batch_size=batch_size), drop=drop)

  # A pair of neighbouring levels of the Karras grid of N(k) levels, per example.
  num_levels = consistency.curriculum(state.step, total_steps=hparams.total_steps, s0=hparams.s0,
                                      s1=hparams.s1)
  sigmas = consistency.discretisation(num_levels, sigma_min=hparams.sigma_min,
                                      sigma_max=hparams.sigma_max, size=hparams.s1 + 1)
  probs = consistency.level_probabilities(sigmas, num_levels, distribution=hparams.noise_sampling,
                                          p_mean=hparams.p_mean, p_std=hparams.p_std)
  n = jax.random.choice(level_rng, hparams.s1, (batch_size,), p=probs)
  sigma, sigma_next = sigmas[n], sigmas[n + 1]
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  b = lambda a: a.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_next = x0 + b(sigma_next) * noise
  if teacher is None:
    x_cur = x0 + b(sigma) * noise  # CM, Alg. 3: the same noise at the lower level.
  else:
    x_cur = teacher_heun_step(teacher, frozen["teacher"], x_next, cond, sigma=sigma_next,
                              sigma_next=sigma, num_classes=num_classes,
                              guidance_scale=hparams.teacher_guidance_scale)

  def f(params, x, s):
    def network(x_in, s_in):
      t = schedule.t_from_logsnr(-2.0 * jnp.log(s_in))
      return model.apply({"params": params}, x_in, schedule.model_time(t), cond, train=True,
                         rngs={"dropout": dropout_rng})
    return consistency.consistency_function(network, x, s, sigma_min=hparams.sigma_min,
                                            sigma_data=hparams.sigma_data)

  target = jax.lax.stop_gradient(f(state.target_params, jax.lax.stop_gradient(x_cur), sigma))
  c = hparams.huber_c if hparams.huber_c is not None else consistency.pseudo_huber_c(
      math.prod(x0.shape[1:]))
  lam = consistency.weight(sigma, sigma_next, weighting=hparams.weighting)

  def loss_fn(params):
    d = consistency.distance(f(params, x_next, sigma_next), target, loss=hparams.loss, c=c)
    return jnp.mean(lam * d)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = train_step_lib.apply_if_finite(finite, state, grads, tx=tx, ema_decay=ema_decay)
  target_params = jax.lax.cond(
      finite, lambda: train_step_lib.ema_update(state.target_params, new_state.params,
                                                hparams.target_decay),
      lambda: state.target_params)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_fn(state.step),
             "num_levels": num_levels.astype(jnp.float32), "finite": finite, "step": state.step}
  return new_state.replace(target_params=target_params), metrics


def consistency_task(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...], rng: jax.Array,
                     mesh: Optional[jax.sharding.Mesh] = None, space: Optional[spaces.Space] = None):
  """The consistency task (tasks.Task); with a mesh it loads the teacher of config.distill.teacher."""
  # pylint: disable=g-import-not-at-top
  from training import tasks
  from training import train as train_lib

  model = models.create_model(config.model)
  schedule = train_lib.create_schedule(config.diffusion)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  teacher = constants = None
  if mesh is not None:  # Only a run reads the teacher; the state's shapes do not need it.
    constants = {"space": jax.device_put(space.params if space is not None else {},
                                         NamedSharding(mesh, P()))}
    if config.distill.teacher is not None:
      teacher = load_checked_teacher(config, image_shape=image_shape)
      constants["teacher"] = teacher.params
  step = functools.partial(
      train_step, model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
      hparams=ConsistencyHParams.from_config(config), num_classes=config.model.num_classes,
      ema_decay=config.optim.ema_decay, rng=rng, encode=space.encode_batch if space is not None else None,
      condition=spaces.make_condition(config, space) if space is not None else None, teacher=teacher)
  visualise = tasks.sample_grids(config, model=model, schedule=schedule, mesh=mesh,
                                image_shape=image_shape, space=space)
  return tasks.Task(
      init_state=functools.partial(init_state, model=model, tx=tx, image_shape=image_shape,
                                   num_classes=config.model.num_classes,
                                   concat_channels=spaces.concat_channels(config, image_shape)),
      train_step=lambda state, batch, constants: step(state, batch, constants), constants=constants,
      metric_names=("loss", "grad_norm", "num_levels"), visualise=visualise, image_tag="samples",
      png_prefix="train_step_")


def load_checked_teacher(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...]):
  """teacher.load_teacher of config.distill.teacher, with what distillation into this student needs."""
  from training import teacher as teacher_lib  # pylint: disable=g-import-not-at-top

  path = config.distill.teacher
  teacher = teacher_lib.load_teacher(path, config=config)
  if tuple(teacher.image_shape) != tuple(image_shape):
    raise ValueError(f"config.distill.teacher={path!r} is a different model: it diffuses arrays of shape "
                     f"{tuple(teacher.image_shape)}, the student {tuple(image_shape)}.")
  _, sigma_max = consistency.grid_sigma_range(teacher.schedule)
  if config.diffusion.sigma_max > sigma_max * (1 + 1e-3):
    raise ValueError(f"config.distill.teacher={path!r} reaches sigma {sigma_max:.4g} at t = 1, below the "
                     f"student's config.diffusion.sigma_max={config.diffusion.sigma_max}.")
  if config.consistency.teacher_guidance_scale != 1.0 and not teacher.config.diffusion.p_uncond:
    raise ValueError(f"config.consistency.teacher_guidance_scale={config.consistency.teacher_guidance_scale}"
                     f" needs a teacher trained with condition dropout; config.distill.teacher={path!r} "
                     "has config.diffusion.p_uncond=0.")
  return teacher
