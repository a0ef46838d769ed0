"""The training loop: restore, step, log, sample, checkpoint, and stop cleanly on preemption."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import input_pipeline
import models
from models import pretrained
from diffusion import schedules
from training import checkpoints
from training import config_check
from training import latent_cache
from training import progressive
from training import sharding
from training import spaces
from training import tasks
from training import text as text_lib
from training import train_step as train_step_lib
from training import writers


def create_mesh(mesh_config: ml_collections.ConfigDict | None = None) -> jax.sharding.Mesh:
  """The ("data", "fsdp") mesh of config.mesh over all devices of all processes (sharding.py).

  Without mesh_config: pure data parallelism, every device on "data".
  """
  return sharding.create_mesh(mesh_config)


def create_schedule(diffusion_config: ml_collections.ConfigDict) -> schedules.Schedule:
  """The process of config.diffusion; configs saved before a key existed mean its old value ("vp", "index")."""
  d = diffusion_config
  return schedules.create_schedule(
      schedule=d.schedule, num_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
      zero_terminal_snr=d.zero_terminal_snr, model_time=d.get("model_time", "index"),
      process=d.get("process", "vp"), sigma_min=d.get("sigma_min", 0.002),
      sigma_max=d.get("sigma_max", 80.0), sigma_data=d.get("sigma_data", 0.5))


def abstract_state(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...],
                   mesh: jax.sharding.Mesh):
  """Shapes, dtypes and shardings (sharding.state_shardings) of the train state, not allocated."""
  init = tasks.create_task(config, image_shape=image_shape, rng=jax.random.key(0)).init_state
  shapes = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def pretrained_params(config: ml_collections.ConfigDict, target: Any) -> Any:
  """config.model.pretrained's params, laid out as the abstract params target (abstract_state's)."""
  params = pretrained.load_params_like(config.model.pretrained, target)
  return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)


def pretrained_state(config: ml_collections.ConfigDict, target: Any, *, init_state: Any,
                     init_rng: jax.Array) -> train_step_lib.TrainState:
  """The step-0 state of a run from config.model.pretrained: its params and EMA, fresh optimizer state.

  The model's random initialisation is neither compiled nor run (for a large UNet, the longest part of
  a start), except with a trainable text encoder, whose converted weights init_state puts in the state.
  """
  shardings = jax.tree.map(lambda s: s.sharding, target)
  if config.text.encoder is not None and config.text.trainable:
    state = jax.jit(init_state, out_shardings=shardings)(init_rng)
    params = {**state.params, text_lib.MODEL: pretrained_params(config, target.params[text_lib.MODEL])}
  else:
    params = pretrained_params(config, target.params)
  tx, _ = train_step_lib.create_optimizer(config.optim)
  return train_step_lib.TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))


class _Preemption:
  """Turns SIGTERM into a flag the loop reads between steps (saved, then a clean exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._calls = 0

  def __enter__(self):
    if jax.process_count() == 1:  # Several processes agree through jax's preemption sync point instead.
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self) -> bool:
    """Whether to save and stop now; called once per step, by every process."""
    self._calls += 1
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      # jax's sync point is a call number that starts at 1 in each process (a SIGTERM before the first
      # call sets it to 1), so count calls: a resumed run's first step is not 1. All processes resume
      # from the same checkpoint, so their call counts agree.
      return multihost_utils.reached_preemption_sync_point(self._calls)
    return self.requested


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json(indent=2))
    os.replace(path + ".tmp", path)


def train(config: ml_collections.ConfigDict, workdir: str) -> train_step_lib.TrainState:
  """Trains (or resumes training) the model of config in workdir; returns the final state."""
  config = progressive.with_student_sampler(config)  # A progressive student records its sampler.
  config_check.validate_latent(config)
  autoencoder = None
  if config.latent.autoencoder is not None:
    autoencoder = spaces.load_autoencoder(config.latent.autoencoder)
  config_check.validate_config(config, device_count=jax.device_count(),
                               process_count=jax.process_count(),
                               latent_factor=autoencoder[0].downsampling_factor if autoencoder else 1)
  checkpoints.check_workdir(workdir)
  mesh = create_mesh(config.mesh)
  logging.info("Mesh: data %d x fsdp %d.", mesh.shape[sharding.DATA], mesh.shape[sharding.FSDP])
  config = text_lib.prepare_tokenizer(config, workdir)
  encoder = text_lib.create_text_encoder(config)
  # Images, or with config.latent.cache their posteriors, encoded once (--mode=encode).
  data = latent_cache.create_dataset(config, global_batch_size=config.training.batch_size,
                                     seed=config.seed, mesh=mesh,
                                     tokenizer=encoder.tokenizer if encoder is not None else None)
  try:
    config_check.validate_against_data(config, num_classes=data.num_classes)
    config, space = _create_space(config, workdir, data=data, autoencoder=autoencoder)
    image_shape = space.shape  # The diffusion model's input: the images, or their latents.
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    task = tasks.create_task(config, image_shape=image_shape, rng=train_rng, mesh=mesh, space=space)
  except BaseException:
    data.close()
    raise

  manager = checkpoints.create_manager(workdir, max_to_keep=config.training.max_to_keep,
                                       keep_every=config.training.keep_every)
  try:
    return _train(config, workdir, manager=manager, data=data, mesh=mesh, image_shape=image_shape,
                  task=task, init_rng=init_rng)
  finally:
    manager.close()  # Waits for the saves in flight; its background threads end here, error or not.
    data.close()


def _create_space(config, workdir, *, data, autoencoder):
  """(config, space): in latent space without a given scale factor, the one of a previous start in
  workdir, or else 1/std of the first config.latent.scale_batches batches' latents (the data iterator
  is put back); the config returned holds it, so it is saved with every checkpoint and config.json.
  """
  space = spaces.create_space(config, channels=data.num_channels, autoencoder=autoencoder)
  if config.latent.autoencoder is None or config.latent.scale_factor is not None:
    return config, space
  scale = spaces.saved_scale_factor(workdir, config.latent.autoencoder)
  if scale is None:
    position = data.get_state()
    batches = [next(data)["image"] for _ in range(config.latent.scale_batches)]
    data.set_state(position)
    scale = spaces.estimate_scale_factor(space, batches)
    logging.info("Latent scale factor 1/std of %d batches' latents: %.6g.", len(batches), scale)
  else:
    logging.info("Latent scale factor of the previous start in %s: %.6g.", workdir, scale)
  config = config.copy_and_resolve_references()
  config.latent.scale_factor = float(scale)
  return config, spaces.create_space(config, channels=data.num_channels, autoencoder=autoencoder)


def _train(config, workdir, *, manager, data, mesh, image_shape, task, init_rng):
  """train()'s restore and loop, with the checkpoint manager and data iterator it closes afterwards."""
  replicated = NamedSharding(mesh, P())
  target = abstract_state(config, image_shape=image_shape, mesh=mesh)
  state_shardings = jax.tree.map(lambda s: s.sharding, target)
  state_bytes = sharding.bytes_per_device(target)
  logging.info("Train state: %.1f MiB (%d bytes) per device.", state_bytes / 2**20, state_bytes)
  # Nothing is written into the workdir before the checkpoint's config has been checked.
  restored = checkpoints.restore(manager, target, data_iterator=data, config=config,
                                 image_shape=image_shape)
  _write_config(workdir, config)
  if restored is None:
    # A LoRA run's state is adapters on config.lora.base; config.model.pretrained starts the others.
    if config.model.get("pretrained") is not None and not config.lora.rank:
      state = pretrained_state(config, target, init_state=task.init_state, init_rng=init_rng)
      logging.info("Parameters and EMA from config.model.pretrained=%s.", config.model.pretrained)
    else:
      state = jax.jit(task.init_state, out_shardings=state_shardings)(init_rng)
    logging.info("Initialised %s parameters.", f"{models.count_params(state.params):,}")
  else:
    state, step = restored
    logging.info("Resumed from the checkpoint at step %d in %s.", step, manager.directory)
  start_step = int(state.step)

  step_fn = jax.jit(task.train_step,
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)

  writer = writers.MetricWriter(os.path.join(workdir, "train"))
  num_steps = config.training.num_steps
  progress = _progress_bar(start_step, num_steps)
  pending = None  # (metrics, step) of the step in flight; read once the next one is queued.
  window = []
  window_start = time.perf_counter()
  step = start_step

  def check(metrics_step):
    metrics, at = metrics_step
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      raise FloatingPointError(
          f"Non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at step "
          f"{at}; the update was refused. The last good checkpoint is in {manager.directory}.")
    return metrics

  with _Preemption() as preemption:
    try:
      while step < num_steps:
        batch = next(data)
        if step == start_step and jax.process_count() > 1:
          step_fn = _compile_on_every_process(step_fn, state, batch, task.constants)
        state, metrics = step_fn(state, batch, task.constants)
        step += 1
        if pending is not None:
          window.append(check(pending))
        pending = (metrics, step)
        progress.update(1)

        if step % config.training.log_every == 0 or step == num_steps:
          window.append(check(pending))
          pending = None
          elapsed = time.perf_counter() - window_start
          scalars = {k: float(np.mean([m[k] for m in window])) for k in task.metric_names}
          scalars["learning_rate"] = float(window[-1]["learning_rate"])
          scalars["steps_per_sec"] = len(window) / elapsed
          scalars["images_per_sec"] = scalars["steps_per_sec"] * config.training.batch_size
          writer.write_scalars(step, scalars)
          writers.log_scalars(step, scalars)
          progress.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
          window, window_start = [], time.perf_counter()

        if task.visualise is not None and step % config.training.sample_every == 0:
          grid, visual_scalars = task.visualise(state)
          if jax.process_index() == 0:
            writers.save_png(os.path.join(workdir, "samples", f"{task.png_prefix}{step:08d}.png"), grid)
          writer.write_image(step, task.image_tag, grid)
          if visual_scalars:
            writer.write_scalars(step, visual_scalars)
            writers.log_scalars(step, visual_scalars)

        preempted = preemption.reached()
        if step % config.training.checkpoint_every == 0 or step == num_steps or preempted:
          if pending is not None:  # Never save a state whose step has not been checked finite.
            window.append(check(pending))
            pending = None
          checkpoints.save(manager, step, state, data_iterator=data, config=config,
                           image_shape=image_shape)
        if preempted:
          logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
          break
      if pending is not None:
        check(pending)
    finally:
      progress.close()
      writer.close()
  return state


def _compile_on_every_process(step_fn, state, batch, constants):
  """The step compiled ahead of time, once every process has it.

  A process whose compilation is a cache hit would otherwise wait in the step's first collective
  while another still compiles, and the collectives' set-up (gloo on CPU) times out after 30 s.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  compiled = step_fn.lower(state, batch, constants).compile()
  multihost_utils.sync_global_devices("train step compiled")
  return compiled


def _progress_bar(start: int, total: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(initial=start, total=total, disable=jax.process_index() != 0, dynamic_ncols=True,
              unit="step", mininterval=2.0)
