"""Orbax checkpoints of the train state and the data iterator under workdir/checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from configs import default as default_config


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves each process's data-iterator state as process_<i>-of-<n>.json (as grain's own handler)."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.write_text(json.dumps(args.iterator.get_state(), indent=2))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not path.exists():
      raise FileNotFoundError(
          f"{path} does not exist: the checkpoint was written by a different number of processes. "
          "Resume with the same process count, or delete the workdir's checkpoints to start over.")
    args.iterator.set_state(json.loads(path.read_text()))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, max_to_keep: int = 3, keep_every: int = 0,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The run's one CheckpointManager: async saves, the latest max_to_keep and every keep_every-th kept."""
  policies = [ocp.checkpoint_managers.LatestN(max_to_keep)]
  if keep_every:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_iterator: Any = None,
         config: ml_collections.ConfigDict | None = None, image_shape: tuple[int, ...] | None = None) -> bool:
  """Starts an async save of the state (and data position, config and image shape) at step."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = DataIteratorSave(data_iterator)
  if config is not None:
    items["config"] = ocp.args.JsonSave(config.to_dict())
  if image_shape is not None:
    items["image"] = ocp.args.JsonSave({"shape": list(image_shape)})
  return manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None,
            data_iterator: Any = None) -> tuple[Any, int] | None:
  """The state at step (default: the latest) laid out like abstract_state, or None if there is none.

  The data iterator, if given, is moved to the position it had when the checkpoint was saved.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  if step not in manager.all_steps():
    raise ValueError(f"No checkpoint at step {step} in {manager.directory}; "
                     f"there are {sorted(manager.all_steps())}.")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = DataIteratorRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, dict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(config[key], tuple) else value


_UNET_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_heads", "dropout", "scale_shift",
              "resamp_with_conv")


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config in today's layout: runs saved before config.model.<name> sections had the UNet's
  knobs directly in config.model."""
  model = saved.get("model", {})
  if "ch" in model and "unet" not in model:
    model["unet"] = {k: model.pop(k) for k in _UNET_KEYS if k in model}
  return saved


def restore_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run in workdir was trained with (saved beside each checkpoint).

  It is laid over configs/default.py, so keys added since the run was trained take their defaults.
  """
  manager = create_manager(workdir, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"No checkpoint and no config.json in {workdir}.")
    saved = json.loads(open(path).read())
  else:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = default_config.get_config()
  _merge(config, upgrade_saved_config(saved))
  return config


def restore_image_shape(manager: ocp.CheckpointManager, step: int) -> tuple[int, ...]:
  """The [H, W, C] shape of the images the checkpoint's model was trained on."""
  restored = manager.restore(step, args=ocp.args.Composite(image=ocp.args.JsonRestore()))
  return tuple(restored["image"]["shape"])
