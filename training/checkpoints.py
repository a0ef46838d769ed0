"""Orbax checkpoints of the train state and the data iterator under workdir/checkpoints.

Every run restores through `restore`: it refuses a checkpoint saved with a different state-defining
config (STATE_SECTIONS), and when the latest checkpoint cannot be read it resumes from the newest one
that can, moving the unreadable ones to checkpoints/damaged/<step>.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import json
import logging as logging_std
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

import models
from configs import default as default_config

# Config sections whose every key gives the saved state its meaning (its shapes, or what the parameters
# compute), keys added in the future included: a run resumes only where all of them are unchanged...
STATE_SECTIONS = ("model", "diffusion", "latent", "distill", "lora")
# ...except these, which change how the same function is computed or trained, not the state.
RESUMABLE_KEYS = frozenset({
    "model.remat", "model.attention", "model.dtype",
    "model.pretrained",  # Only where a new run starts from.  # Parameters stay float32 whatever the compute dtype.
    "diffusion.loss_weighting", "diffusion.min_snr_gamma", "diffusion.p_uncond",
    "diffusion.time_sampling", "diffusion.p_mean", "diffusion.p_std", "diffusion.logit_mean",
    "diffusion.logit_std",  # Where training spends its effort, not what the network computes.
    "latent.scale_batches",  # Only estimates the scale factor, which is itself saved.
    "distill.weighting",  # Where a student's training spends its effort, as loss_weighting.
    "lora.load", "lora.scale",  # A file merged at sampling time, not part of the trained state.
    "latent.cache",  # The same posteriors, encoded once rather than every step.
})
# Besides these sections: the optimizer state's structure (clipping adds a stage to optax's chain)
# and the image shape the model was built for.
DERIVED_STATE_KEYS = {
    "optim.grad_clip > 0": lambda config, image_shape: config["optim"]["grad_clip"] > 0,
    "image shape [H, W, C] (config.data.image_size, the dataset's channels)":
        lambda config, image_shape: list(image_shape),
}
# An autoencoder run (config.model.name="autoencoder") has no config.diffusion; its state is defined by
# config.model, DERIVED_STATE_KEYS and whether it has a discriminator, and of which shape.
AUTOENCODER_STATE_KEYS = {
    "autoencoder_loss.disc_weight > 0": lambda config, image_shape: config["autoencoder_loss"]["disc_weight"] > 0,
    "autoencoder_loss.disc_ch": lambda config, image_shape: config["autoencoder_loss"]["disc_ch"],
    "autoencoder_loss.disc_layers": lambda config, image_shape: config["autoencoder_loss"]["disc_layers"],
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, missing, or saved with a different config."""


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves each process's data-iterator state as process_<i>-of-<n>.json (as grain's own handler)."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.write_text(json.dumps(args.iterator.get_state(), indent=2))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    """Restores the position, whatever the number of processes that saved it.

    The position is the global step (input_pipeline: {"step": k}), the same in every process's file, so
    a run may resume on more or fewer processes; files that disagree are an error.
    """
    paths = sorted(glob.glob(os.path.join(os.fspath(directory), "process_*-of-*.json")))
    states = {path: json.loads(epath.Path(path).read_text()) for path in paths}
    if not states:
      raise FileNotFoundError(f"No process_<i>-of-<n>.json data-iterator state in {directory}.")
    distinct = {json.dumps(state, sort_keys=True) for state in states.values()}
    if len(distinct) > 1:
      raise ValueError(f"The data-iterator states in {directory} differ between processes: "
                       f"{sorted(distinct)}; they must all hold the same global position.")
    args.iterator.set_state(next(iter(states.values())))
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
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1)
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


def check_workdir(workdir: str) -> None:
  """Raises an OSError naming the path if workdir is a file, is not writable or cannot be created."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise NotADirectoryError(f"--workdir={workdir}: {path} exists and is not a directory; pass the "
                               "directory of a run, or a new path.")
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"--workdir={workdir}: the directory {path} is not writable.")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"--workdir={workdir} cannot be created: {parent} is a file, not a directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"--workdir={workdir} cannot be created: {parent} is not writable.")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, (tuple, list)) else value
  return flat


def state_defining(config: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The values a checkpoint's state depends on (STATE_SECTIONS, DERIVED_STATE_KEYS), by key.

  Of the models' own sections (config.model.<name>) only the one of config.model.name counts.
  """
  unused = tuple(f"model.{name}." for name in models.MODELS if name != config["model"]["name"])
  autoencoder = config["model"]["name"] == "autoencoder"
  sections = ("model",) if autoencoder else STATE_SECTIONS
  values = {key: value for key, value in _flatten(config).items()
            if key.split(".")[0] in sections and key not in RESUMABLE_KEYS
            and not key.startswith(unused)}
  derived = {**DERIVED_STATE_KEYS, **(AUTOENCODER_STATE_KEYS if autoencoder else {})}
  values.update({key: fn(config, image_shape) for key, fn in derived.items()})
  return values


def compare_configs(saved: dict[str, Any], current: dict[str, Any], *, saved_image_shape: tuple[int, ...],
                    image_shape: tuple[int, ...]) -> tuple[dict[str, tuple[Any, Any]],
                                                           dict[str, tuple[Any, Any]]]:
  """The keys whose values differ, as {key: (saved, current)}: (state-defining ones, the others).

  saved is laid over configs/default.py first, so keys added since it was written take their defaults.
  """
  saved = as_current_config(saved).to_dict()
  before, after = state_defining(saved, saved_image_shape), state_defining(current, image_shape)
  mismatched = {key: (before.get(key), after[key]) for key in after if before.get(key) != after[key]}
  flat_before, flat_after = _flatten(saved), _flatten(current)
  changed = {key: (flat_before.get(key), value) for key, value in flat_after.items()
             if key not in after and flat_before.get(key) != value}
  return mismatched, changed


def _mismatch_message(directory: str, step: int, mismatched: dict[str, tuple[Any, Any]]) -> str:
  lines = [f"  {key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items()]
  return (f"The checkpoint at step {step} in {directory} was trained with a different config; these "
          "keys define its state and must match:\n" + "\n".join(lines) + "\n"
          "Resume with the config it was saved with (the same command line), or pass a new --workdir "
          "to train a new model.")


def _one_line(error: BaseException) -> str:
  """The innermost cause of error (Orbax wraps TensorStore's precise message), on one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def _quiet_async_teardown():
  """Finalises, silently, the tasks a failed Orbax read leaves on its closed event loop.

  Orbax reads arrays in concurrent asyncio tasks; when one fails, the others are left on a closed
  loop, and when they are garbage collected (later, or at exit) each logs "Task exception was never
  retrieved" or "Event loop is closed" with a traceback. The error itself is reported by the caller.
  """
  try:
    yield
  finally:
    asyncio_logger, hook = logging_std.getLogger("asyncio"), sys.unraisablehook
    disabled, asyncio_logger.disabled = asyncio_logger.disabled, True
    sys.unraisablehook = lambda unraisable: None
    try:
      gc.collect()
    finally:
      asyncio_logger.disabled, sys.unraisablehook = disabled, hook


def _read(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> tuple[Any, str | None]:
  """(restored items, None), or (None, the error in one line) if the checkpoint cannot be read."""
  with _quiet_async_teardown():
    try:
      return manager.restore(step, args=ocp.args.Composite(**items)), None
    except Exception as e:  # pylint: disable=broad-exception-caught
      return None, _one_line(e)


def _agreed(value: int | None) -> int | None:
  """Process 0's value on every process (None stays None)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  value = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if value is None else value)))
  return None if value < 0 else value


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> dict[int, str]:
  """Moves the checkpoints at steps to checkpoints/damaged/<step> (process 0); returns where to."""
  directory = os.fspath(manager.directory)
  moved = {}
  for step in steps:
    target = os.path.join(directory, "damaged", str(step))
    n = 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(directory, "damaged", f"{step}_{n}")
    moved[step] = target
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(directory, str(step)), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("checkpoints moved aside")
  manager.reload()
  return moved


def restore(manager: ocp.CheckpointManager, target: Any, *, step: int | None = None,
            data_iterator: Any = None, config: ml_collections.ConfigDict | None = None,
            image_shape: tuple[int, ...] | None = None) -> tuple[Any, int] | None:
  """(state, step) of the checkpoint at step, default the newest that restores; None if there is none.

  target: the abstract state, or a function of (saved config, saved image shape) that returns it.
  config, image_shape: the current run's; if given, a state-defining difference (STATE_SECTIONS) is a
  CheckpointError listing every differing key, and the other changed keys are logged.
  data_iterator: if given, moved to the position it had when the checkpoint was saved.
  Without step, a checkpoint that cannot be read is skipped for the previous one and, once one
  restores, moved to checkpoints/damaged/<step>; process 0 decides which step every process loads.
  An explicit step that cannot be read is a CheckpointError.
  """
  directory = os.fspath(manager.directory)
  # Agreed by all processes, so that a step training deletes meanwhile fails everywhere, not on some.
  if step is not None and not _all_processes(step in manager.all_steps()):
    raise CheckpointError(f"No checkpoint at step {step} in {directory}; there are "
                          f"{sorted(manager.all_steps())}.")
  explicit = step is not None
  step = step if explicit else _agreed(manager.latest_step())
  failed = {}
  while step is not None:
    restored, error = _restore_step(manager, step, target, data_iterator=data_iterator, config=config,
                                    image_shape=image_shape)
    if _all_processes(error is None):
      break
    if explicit:
      raise CheckpointError(f"The checkpoint at step {step} in {directory} cannot be read: {error}")
    failed[step] = error or "unreadable on another process"
    step = _agreed(max((s for s in manager.all_steps() if s < step), default=None))
  if step is None:
    if not failed:
      return None
    raise CheckpointError(
        f"No checkpoint in {directory} can be read (none was moved): " +
        "; ".join(f"step {s}: {e}" for s, e in failed.items()) + ". Repair or remove them, or pass a "
        "new --workdir.")
  for s, path in (_move_aside(manager, list(failed)) if failed else {}).items():
    logging.warning("The checkpoint at step %d cannot be read (%s); moved it aside to %s.", s,
                    failed[s], path)
  return restored, step


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any, *, data_iterator: Any,
                  config: ml_collections.ConfigDict | None,
                  image_shape: tuple[int, ...] | None) -> tuple[Any, str | None]:
  """The state at step, or (None, why it cannot be read); a config mismatch raises CheckpointError."""
  saved, error = _read(manager, step, {"config": ocp.args.JsonRestore(), "image": ocp.args.JsonRestore()})
  if error is not None:
    return None, error
  saved_config, saved_shape = saved["config"], tuple(saved["image"]["shape"])
  if config is not None:
    mismatched, changed = compare_configs(saved_config, config.to_dict(), saved_image_shape=saved_shape,
                                          image_shape=tuple(image_shape))
    if mismatched:
      raise CheckpointError(_mismatch_message(os.fspath(manager.directory), step, mismatched))
    if changed:
      logging.info("Resuming from step %d with changed settings: %s.", step, ", ".join(
          f"{key} {before!r} -> {now!r}" for key, (before, now) in changed.items()))
  if callable(target):
    target = target(as_current_config(saved_config), saved_shape)
  items = {"state": ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items["data"] = DataIteratorRestore(data_iterator)
  restored, error = _read(manager, step, items)
  return (None, error) if error is not None else (restored["state"], None)


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


def as_current_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A saved config laid over configs/default.py, so keys added since it was written take their defaults.

  Runs saved before the backbones had their own config.model.<name> sections held the UNet's knobs
  directly in config.model; they are read as config.model.unet.
  """
  saved = json.loads(json.dumps(saved))  # A copy: the caller's dict stays as it was read.
  model = saved.get("model", {})
  if "ch" in model and "unet" not in model:
    model["unet"] = {k: model.pop(k) for k in _UNET_KEYS if k in model}
  config = default_config.get_config()
  _merge(config, saved)
  return config


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
  return as_current_config(saved)


def restore_image_shape(manager: ocp.CheckpointManager, step: int) -> tuple[int, ...]:
  """The [H, W, C] shape of the images the checkpoint's model was trained on."""
  restored = manager.restore(step, args=ocp.args.Composite(image=ocp.args.JsonRestore()))
  return tuple(restored["image"]["shape"])
