"""A trained run as a notebook (and eval) sees it: its config, EMA state, model, schedule, data and logs.

  config, state, model, schedule = run.load_run("runs/digits")
  images, _ = run.make_sampler(config, model, schedule, image_shape=run.image_shape("runs/digits"),
                               sampler="dpmpp_2m", steps=20).sample(state.ema_params, seed=0, num=16)
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

import models
from diffusion import schedules
from input_pipeline import preprocess
from input_pipeline import sources
from training import checkpoints
from training import generate
from training import spaces
from training import train as train_lib
from training import writers


def _step_or_latest(manager, workdir: str, step: int | None, key: str = "step") -> int:
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(workdir)}: train first "
                              "(--mode=train) or pass the workdir of a trained run.")
  elif step not in manager.all_steps():
    raise ValueError(f"{key}={step} is not a checkpoint of {workdir}; there are "
                     f"{sorted(manager.all_steps())}.")
  return step


def load_run(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
             step_key: str = "step") -> tuple[ml_collections.ConfigDict, Any, nn.Module, schedules.Schedule]:
  """(config, state, model, schedule) of the checkpoint at step (default: the latest) of workdir.

  The config is the one saved with the checkpoint; state.ema_params are the sampling parameters (of a
  LoRA run, config.lora.rank > 0: its base with the EMA adapters merged; state.params the adapters), laid
  out on mesh (default: every device, replicated) by sharding.state_shardings, whatever the mesh the
  checkpoint was saved from (Orbax reshards). step_key names step in errors (a config key). The
  latest is the newest checkpoint that restores (checkpoints.restore); an explicit step must restore.
  """
  manager = checkpoints.create_manager(workdir, read_only=True)
  try:
    if step is not None or manager.latest_step() is None:
      step = _step_or_latest(manager, workdir, step, step_key)
    mesh = mesh or train_lib.create_mesh()
    # Without a step: the newest checkpoint that restores (an unreadable one is moved aside).
    state, step = checkpoints.restore(
        manager, lambda saved, shape: train_lib.abstract_state(saved, image_shape=shape, mesh=mesh),
        step=step)
  finally:
    manager.close()
  config = checkpoints.restore_config(workdir, step)
  if config.lora.rank:  # Adapters on a frozen base (training/lora.py): sample with both, merged once.
    from training import lora  # pylint: disable=g-import-not-at-top
    state = state.replace(ema_params=lora.sampling_params(
        config, state.ema_params, image_shape=image_shape(workdir, step), mesh=mesh))
  return config, state, models.create_model(config.model), train_lib.create_schedule(config.diffusion)


def image_shape(workdir: str, step: int | None = None) -> tuple[int, ...]:
  """[H, W, C] of the images the run's model was trained on."""
  manager = checkpoints.create_manager(workdir, read_only=True)
  return checkpoints.restore_image_shape(manager, _step_or_latest(manager, workdir, step))


def make_sampler(config: ml_collections.ConfigDict, model: nn.Module, schedule: schedules.Schedule, *,
                 image_shape: tuple[int, ...], mesh: jax.sharding.Mesh | None = None,
                 **sample_overrides) -> generate.Sampler:
  """generate.Sampler for config.sample with some settings replaced, e.g. sampler="heun", steps=18.

  A latent run's sampler decodes with the autoencoder of its config.latent (images come out as pixels).
  """
  options = generate.SampleOptions.from_config(config)
  options = dataclasses.replace(options, **sample_overrides)
  return generate.Sampler(model=model, schedule=schedule, options=options,
                          mesh=mesh or train_lib.create_mesh(), image_shape=image_shape,
                          num_classes=config.model.num_classes,
                          space=spaces.space_for_run(config, image_shape),
                          concat_channels=spaces.concat_channels(config, image_shape))


def with_command_line(trained: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *,
                      sections: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A run's saved config with the command line's sections (e.g. "sample", "eval") and autoencoder.

  The model, schedule and latent scale factor stay the run's. config.latent.autoencoder, where the
  command line names another than the run's (the directory moved, or a fine-tuned decoder), replaces
  it; spaces.space_for_run then checks it has the run's latent channels and downsampling factor.
  """
  trained = trained.copy_and_resolve_references()
  for section in sections:
    trained[section] = ml_collections.ConfigDict(config[section].to_dict())
  new, saved = config.latent.autoencoder, trained.latent.autoencoder
  expand = lambda path: os.path.abspath(os.path.expanduser(path))
  if new is not None and saved is not None and expand(new) != expand(saved):
    logging.warning("config.latent.autoencoder=%r replaces the run's %r.", new, saved)
    trained.latent.autoencoder = new
  return trained


def params_per_module(params: Any) -> dict[str, int]:
  """Number of parameters under each top-level module of a parameter tree."""
  return {name: models.count_params(sub) for name, sub in params.items()}


def read_scalars(logdir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a scalar in the TensorBoard event files of logdir (e.g. workdir/train, "loss")."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  if not glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    raise FileNotFoundError(f"No events.out.tfevents.* in {logdir}.")
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  if tag not in accumulator.Tags()["scalars"]:
    raise KeyError(f"No scalar {tag!r} in {logdir}; there are {accumulator.Tags()['scalars']}.")
  events = accumulator.Scalars(tag)
  return np.array([e.step for e in events]), np.array([e.value for e in events])


class DatasetImages:
  """The images of config.data.split in order, as the model sees them (cropped, resized, not flipped).

  read(begin, end) -> (uint8 [n, S, S, C], int32 labels [n]); each call reads only those examples.
  """

  def __init__(self, data_config: ml_collections.ConfigDict):
    info = sources.open_source(name=data_config.name, split=data_config.split,
                               data_dir=data_config.data_dir, image_size=data_config.image_size)
    self._source = info.source
    self.num_classes, self.num_channels = info.num_classes, info.num_channels
    self._preprocess = preprocess.Preprocess(data_config.image_size, data_config.resize,
                                             use_label=info.has_label)

  def __len__(self) -> int:
    return len(self._source)

  def read(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    examples = [self._preprocess.map(self._source[i]) for i in range(begin, end)]
    images = np.stack([writers.to_uint8(e["image"]) for e in examples])  # Exact: pixels / 127.5 - 1.
    return images, np.array([e["label"] for e in examples], np.int32)
