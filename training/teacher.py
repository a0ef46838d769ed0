"""A trained diffusion run as the frozen teacher of a distillation (config.distill.teacher)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import ml_collections

from diffusion import schedules
from training import checkpoints
from training import spaces


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The teacher's network, its EMA parameters, the config it was trained with and its process."""

  model: nn.Module
  params: Any
  config: ml_collections.ConfigDict
  schedule: schedules.Schedule
  image_shape: tuple[int, ...]
  space: spaces.Space


def _error(workdir: str, why: str) -> ValueError:
  return ValueError(f"config.distill.teacher={workdir!r} {why}")


def load_teacher(workdir: str, *, config: ml_collections.ConfigDict) -> Teacher:
  """The latest checkpoint of the diffusion run in workdir, checked against the student's config.

  The teacher must be a diffusion model (not an autoencoder, not a consistency model) of the student's
  image size, classes and autoencoder; every error names config.distill.teacher, and all are raised
  before its parameters are read. Its parameters lie on config.mesh as its checkpoint's rules say.
  """
  from evaluation import run as run_lib  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(os.path.expanduser(workdir)):
    raise _error(workdir, "does not exist; give the workdir of a trained diffusion run.")
  workdir = os.path.expanduser(workdir)
  manager = checkpoints.create_manager(workdir, read_only=True)
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise _error(workdir, f"has no checkpoint in {checkpoints.checkpoint_dir(workdir)}; train it first.")
  saved = checkpoints.restore_config(workdir, step)
  if saved.model.name == "autoencoder":
    raise _error(workdir, "is an autoencoder run; a teacher is a diffusion model.")
  if saved.diffusion.prediction == "consistency":
    raise _error(workdir, "is a consistency model; a teacher is a diffusion model.")
  for key in ("data.image_size", "model.num_classes", "latent.autoencoder"):
    section, name = key.split(".")
    if config[section][name] != saved[section][name]:
      raise _error(workdir, f"is a different model: its config.{key}={saved[section][name]!r}, the "
                   f"student's {config[section][name]!r}.")
  mesh = train_lib.create_mesh(config.mesh)
  saved, state, model, schedule = run_lib.load_run(workdir, step, mesh=mesh)
  image_shape = run_lib.image_shape(workdir, step)
  return Teacher(model=model, params=state.ema_params, config=saved, schedule=schedule,
                 image_shape=tuple(image_shape), space=spaces.space_for_run(saved, image_shape))

