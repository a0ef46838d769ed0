"""The teacher of a distillation: any diffusion run trained here, read from its workdir.

  teacher = load_teacher("runs/digits", config=student_config)

gives the model, the EMA parameters of the latest readable checkpoint, the run's config, schedule,
image shape and space. Every student needs the teacher's image size, classes and autoencoder; a
student initialised from the teacher's parameters (progressive distillation) also needs its network:
config.model, config.diffusion and config.latent must match, except the keys in STUDENT_MAY_DIFFER.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import ml_collections

from diffusion import schedules
from training import checkpoints
from training import spaces

# Keys the student may set apart from its teacher: its parameterisation (Salimans & Ho 2022, Sec. 4
# distil into v or x0 prediction) starts from the teacher's weights, whatever those predicted.
STUDENT_MAY_DIFFER = frozenset({"diffusion.prediction"})
_MODEL_SECTIONS = ("model", "diffusion", "latent")
# What any student shares with its teacher: the data it models and the conditioning it takes.
_SHARED_KEYS = ("data.image_size", "model.num_classes", "latent.autoencoder")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A trained diffusion run, frozen."""

  model: nn.Module
  params: Any  # The EMA parameters of checkpoint `step`.
  config: ml_collections.ConfigDict  # The run's config, as saved with that checkpoint.
  schedule: schedules.Schedule
  image_shape: tuple[int, ...]  # [H, W, C] the model sees (pixels, or latents).
  space: spaces.Space
  step: int


def _model_values(config: dict[str, Any]) -> dict[str, Any]:
  """The state-defining keys of config.model, config.diffusion and config.latent (checkpoints.py)."""
  values = checkpoints.state_defining(config, image_shape=())
  return {key: value for key, value in values.items()
          if key.split(".")[0] in _MODEL_SECTIONS and key not in STUDENT_MAY_DIFFER}


def model_differences(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{key: (teacher's, student's)} of the model-defining keys whose values differ."""
  teacher = checkpoints.as_current_config(teacher).to_dict()
  before, after = _model_values(teacher), _model_values(student)
  return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
          if before.get(key) != after.get(key)}


def load_teacher(workdir: str, *, config: ml_collections.ConfigDict,
                 same_network: bool = False) -> Teacher:
  """The diffusion run in workdir (config.distill.teacher), checked against the student's config.

  Raises ValueError naming config.distill.teacher, before any parameter is read, when workdir does not
  exist, is not the workdir of a diffusion run with a checkpoint (an autoencoder or a consistency model
  is not a teacher), models other data (image size, classes, autoencoder), or, with same_network (a
  student initialised from the teacher), when its network differs (every differing key listed). Its
  parameters lie on config.mesh as its checkpoint's rules say.
  """
  from evaluation import run as run_lib  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  key = f"config.distill.teacher={workdir!r}"
  if not workdir:
    raise ValueError("config.distill.teacher is not set: give the workdir of a trained diffusion run.")
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise ValueError(f"{key} does not exist: give the workdir of a trained diffusion run.")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{key} is not the workdir of a run trained here: it has no config.json.")
  with open(config_path) as f:
    name = json.load(f).get("model", {}).get("name")
  if name == "autoencoder":
    raise ValueError(f"{key} is an autoencoder run (config.model.name='autoencoder'), not a diffusion "
                     "model.")
  manager = checkpoints.create_manager(path, read_only=True)
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise ValueError(f"{key} has no checkpoint in {checkpoints.checkpoint_dir(path)}: train it first.")
  saved = checkpoints.restore_config(path, step)
  if saved.diffusion.prediction == "consistency":
    raise ValueError(f"{key} is a consistency model; a teacher is a diffusion model.")
  for shared in _SHARED_KEYS:
    section, name = shared.split(".")
    if config[section][name] != saved[section][name]:
      raise ValueError(f"{key} is a different model: its config.{shared}={saved[section][name]!r}, the "
                       f"student's {config[section][name]!r}.")
  differences = model_differences(saved.to_dict(), config.to_dict()) if same_network else {}
  if differences:
    lines = [f"  {k}: teacher {a!r}, student {b!r}" for k, a, b in
             ((k, *v) for k, v in differences.items())]
    raise ValueError(f"{key}: the student is initialised from the teacher, so its network must be the "
                     "teacher's; these keys differ:\n" + "\n".join(lines) + "\nUse the teacher's config "
                     "(only config.diffusion.prediction may differ).")
  trained, state, model, schedule = run_lib.load_run(path, step, mesh=train_lib.create_mesh(config.mesh))
  shape = run_lib.image_shape(path, step)
  return Teacher(model=model, params=state.ema_params, config=trained, schedule=schedule,
                 image_shape=tuple(shape), space=spaces.space_for_run(trained, shape), step=int(step))
