"""Progressive distillation (Salimans & Ho 2022, Alg. 2) as a task of the training loop (tasks.TASKS).

One round is one run: config.distill.teacher is a trained workdir (the original model, or the student
of the previous round), the student starts from its EMA parameters and learns to do in one DDIM step
what the teacher does in two, on the student's grid of config.distill.student_steps = N steps
(diffusion/distillation.py). The round's length is config.training.num_steps; its checkpoints, resume
and preemption are the loop's own, the teacher being read again from its workdir at every start. The
next round is the same command with this workdir as teacher and N / 2 steps.

The conditioning dict passes through: the teacher and the student see the same cond (labels,
concatenated channels), dropped to the null entries with config.diffusion.p_uncond, so the student
learns the teacher's conditional and unconditional outputs; guidance itself is not distilled (a
guidance scale != 1 mixes the student's two outputs, as with any model).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import distillation
from diffusion import guidance
from diffusion import parameterization
from diffusion import samplers
from diffusion import schedules
from training import sharding
from training import train_step as train_step_lib

METHOD = "progressive"  # config.distill.method of this task.


def with_student_sampler(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config, for a progressive run, with the sampler the student is trained for: deterministic DDIM in

  config.distill.student_steps steps on the student's grid ("trailing"), x0 not clipped (the student's
  x0 is Alg. 2's target, not an estimate of the data, and may leave [-1, 1]). The run records these
  in its config, so --mode=sample with config.sample.steps=None draws the student as trained.
  """
  if config.distill.method != METHOD:
    return config
  wanted = {"sampler": "ddim", "steps": config.distill.student_steps, "grid": "trailing",
            "grid_file": None, "preset": None, "eta": 0.0, "clip_x0": False}
  changed = {k: v for k, v in wanted.items() if config.sample[k] != v}
  if not changed:
    return config
  config = config.copy_and_resolve_references()
  config.sample.update(changed)
  logging.info("The student samples with %s (config.sample, recorded with the run).",
               ", ".join(f"{k}={v!r}" for k, v in wanted.items()))
  return config


def per_example_denoiser(apply_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                         schedule: schedules.Schedule, prediction: str,
                         clip_x0: bool = False) -> samplers.DenoiseFn:
  """denoise_fn(z, t) -> (x0_hat, eps_hat) for times t of shape [B, 1, 1, 1], one per example.

  apply_fn(network input, model time [B]) -> network output; clip_x0 clips x0_hat to [-1, 1] and
  recomputes eps_hat from it, as guidance.make_denoise_fn does for the samplers.
  """
  def denoise_fn(z, t):
    alpha, sigma = schedule.alpha_sigma(t)
    level = dict(alpha=alpha, sigma=sigma, sigma_data=schedule.sigma_data)
    x_in = parameterization.network_input(prediction, x_t=z, **level)
    out = apply_fn(x_in, schedule.model_time(t.reshape(-1))).astype(jnp.float32)
    x0, eps = parameterization.to_x0_eps(prediction, out, x_t=z, **level)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = parameterization.x0_to_eps(x_t=z, x0=x0, alpha=alpha, sigma=sigma)
    return x0, eps
  return denoise_fn


def train_step(state: train_step_lib.TrainState, batch: dict[str, jax.Array], constants: dict[str, Any],
               *, model: nn.Module, schedule: schedules.Schedule, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, student_steps: int, prediction: str, teacher_prediction: str,
               teacher_clip_x0: bool, weighting: str, p_uncond: float, num_classes: int,
               ema_decay: float, rng: jax.Array, encode: train_step_lib.Encode,
               condition: train_step_lib.Condition) -> tuple[train_step_lib.TrainState, dict]:
  """One optimizer step of the student on Alg. 2's loss; a non-finite loss or gradient changes nothing.

  constants: {"teacher": the teacher's parameters, "space": the space's frozen parameters}. The
  student's step t -> t'' is a uniform draw from its grid of student_steps steps; the target is the
  x whose one DDIM step from z_t reaches the teacher's two (distillation.ddim_x_target), weighted by
  distillation.x_loss_weight. The randomness is fold_in(rng, step), so a resumed run repeats it.
  """
  rng = jax.random.fold_in(rng, state.step)
  step_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  encode_rng, cond_rng = jax.random.split(jax.random.fold_in(rng, 1))
  frozen = constants["space"]
  x0 = encode(frozen, batch["image"], encode_rng)
  batch_size = x0.shape[0]
  bcast = lambda a: a.reshape((batch_size,) + (1,) * (x0.ndim - 1))

  # A step of the student's grid, t -> t'', and the teacher's midpoint t' between them.
  k = jax.random.randint(step_rng, (batch_size,), 0, student_steps)
  student = distillation.student_grid(schedule=schedule, steps=student_steps)
  teacher = distillation.teacher_grid(schedule=schedule, steps=student_steps)
  t, t_mid, t_next = bcast(student[k]), bcast(teacher[2 * k + 1]), bcast(student[k + 1])
  logsnr_t, alpha_t, sigma_t = samplers.noise_level(schedule, t)
  _, alpha_next, sigma_next = samplers.noise_level(schedule, t_next)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  z_t = parameterization.diffuse(x0=x0, noise=noise, alpha=alpha_t, sigma=sigma_t)

  cond = condition(frozen, batch, cond_rng)
  drop = jax.random.uniform(drop_rng, (batch_size,)) < p_uncond
  cond = guidance.drop_cond(cond, null=guidance.null_cond(num_classes=num_classes,
                                                          batch_size=batch_size), drop=drop)

  # The teacher's two DDIM steps and the x-space target of the student's one.
  teacher_fn = per_example_denoiser(
      lambda x, time: model.apply({"params": constants["teacher"]}, x, time, cond, train=False),
      schedule=schedule, prediction=teacher_prediction, clip_x0=teacher_clip_x0)
  z_next = distillation.two_teacher_steps(teacher_fn, z_t, t=t, t_mid=t_mid, t_next=t_next,
                                          schedule=schedule)
  x_target = jax.lax.stop_gradient(distillation.ddim_x_target(
      z_t=z_t, z_next=z_next, alpha_t=alpha_t, sigma_t=sigma_t, alpha_next=alpha_next,
      sigma_next=sigma_next))
  weight = distillation.x_loss_weight(weighting, logsnr=logsnr_t.reshape(-1))

  def loss_fn(params):
    student_fn = per_example_denoiser(
        lambda x, time: model.apply({"params": params}, x, time, cond, train=True,
                                    rngs={"dropout": dropout_rng}),
        schedule=schedule, prediction=prediction)
    x0_hat, _ = student_fn(z_t, t)
    mse = jnp.mean(jnp.square(x0_hat - x_target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(weight * mse)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = train_step_lib.apply_if_finite(finite, state, grads, tx=tx, ema_decay=ema_decay)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_fn(state.step),
             "finite": finite, "step": state.step}
  return new_state, metrics


def check_teacher(teacher: Any, config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...]) -> None:
  """The teacher fits this round: same image shape, and a student of 2N steps if it is one."""
  key = f"config.distill.teacher={config.distill.teacher!r}"
  if tuple(teacher.image_shape) != tuple(image_shape):
    raise ValueError(f"{key} sees images of shape {list(teacher.image_shape)}, the student "
                     f"{list(image_shape)} (config.data.image_size, the data's channels).")
  method = teacher.config.distill.method
  if method is None:
    return
  if method != METHOD:
    raise ValueError(f"{key} is a config.distill.method={method!r} student, not a model sampled by "
                     "DDIM; progressive distillation needs a diffusion model or a progressive student.")
  steps, wanted = teacher.config.distill.student_steps, config.distill.student_steps
  if steps != 2 * wanted:
    raise ValueError(f"config.distill.student_steps={wanted}: the teacher {config.distill.teacher!r} is "
                     f"a progressive student of {steps} steps; the next round has {steps // 2}.")


def progressive_task(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...], rng: jax.Array,
                     mesh: Optional[jax.sharding.Mesh] = None, space=None):
  """tasks.Task of a progressive-distillation round; with a mesh it reads the teacher (teacher.py).

  Without a mesh (shapes of the state: abstract_state, restoring a student to sample it) the teacher
  is not read: the student's state has the shapes of any state of config.model.
  """
  # pylint: disable=g-import-not-at-top
  import models
  from training import generate
  from training import spaces
  from training import tasks
  from training import teacher as teacher_lib
  from training import train as train_lib
  from training import writers
  # pylint: enable=g-import-not-at-top

  space = space or spaces.PixelSpace(data_shape=tuple(image_shape))
  model = models.create_model(config.model)
  schedule = train_lib.create_schedule(config.diffusion)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  init_state = functools.partial(train_step_lib.init_state, model=model, tx=tx, image_shape=image_shape,
                                 num_classes=config.model.num_classes,
                                 concat_channels=spaces.concat_channels(config, image_shape))
  teacher_prediction, teacher_clip, constants, visualise = config.diffusion.prediction, False, None, None
  if mesh is not None:
    teacher = teacher_lib.load_teacher(config.distill.teacher, config=config, same_network=True)
    check_teacher(teacher, config, image_shape=image_shape)
    logging.info("Teacher: step %d of %s (%s prediction); the student samples in %d DDIM steps.",
                 teacher.step, config.distill.teacher, teacher.config.diffusion.prediction,
                 config.distill.student_steps)
    teacher_prediction = teacher.config.diffusion.prediction
    teacher_clip = teacher.config.sample.clip_x0 and teacher.space.bounded  # The teacher steps as it samples.
    params = teacher.params
    init_state = lambda rng: train_step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))
    # The frozen teacher is laid out as the student's params are (fsdp-sharded where config.mesh says),
    # in buffers of its own: the step donates the state, so the two must not share any.
    shardings = sharding.state_shardings(params, mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
    constants = {"teacher": jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params),
                 "space": jax.device_put(space.params, NamedSharding(mesh, P()))}
    if config.training.sample_every:
      sampler = generate.Sampler.from_config(config, model=model, schedule=schedule, mesh=mesh,
                                             image_shape=image_shape, space=space)

      def visualise(state):
        images, _ = sampler.sample(state.ema_params, seed=config.sample.seed, num=config.sample.num)
        return writers.image_grid(images, cols=config.model.num_classes or None), {}

  step = functools.partial(
      train_step, model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
      student_steps=config.distill.student_steps, prediction=config.diffusion.prediction,
      teacher_prediction=teacher_prediction, teacher_clip_x0=teacher_clip,
      weighting=config.distill.weighting, p_uncond=config.diffusion.p_uncond,
      num_classes=config.model.num_classes, ema_decay=config.optim.ema_decay, rng=rng,
      encode=space.encode_batch, condition=spaces.make_condition(config, space))
  return tasks.Task(init_state=init_state, train_step=step, constants=constants,
                    metric_names=("loss", "grad_norm"), visualise=visualise, image_tag="samples",
                    png_prefix="train_step_")
