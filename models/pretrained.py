"""Converted pretrained networks on disk: a parameter tree (Orbax) beside a JSON description.

A converted model is a directory holding `params/` (an Orbax PyTree checkpoint of the Flax parameters)
and `model.json` ({"kind": ..., "kwargs": the module's constructor arguments, plus anything the kind
needs, e.g. an autoencoder's latent scaling factor, and where it was converted from}). The conversion
scripts in scripts/ write it; training, sampling and notebooks read it with `load`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from models import autoencoder
from models import clip
from models import sd_unet


def save(directory: str, *, kind: str, kwargs: dict[str, Any], params: Any, **extra: Any) -> None:
  """Writes params and the description to directory, which must not exist yet (nothing is overwritten)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists already; give a new output directory.")
  params = jax.tree.map(np.asarray, params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "params"), params)
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump({"kind": kind, "kwargs": kwargs, **extra}, f, indent=2)


def load(directory: str, *, kind: str) -> tuple[dict[str, Any], Any]:
  """(description, params as numpy arrays) of a converted model of the given kind."""
  directory = os.path.abspath(os.path.expanduser(directory))
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {directory} is not a converted model (see scripts/).")
  with open(path) as f:
    description = json.load(f)
  if description.get("kind") != kind:
    raise ValueError(f"{directory} holds a converted {description.get('kind')!r}, not a {kind!r}.")
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, "params"))
  return description, jax.tree.map(np.asarray, params)


def load_params_like(directory: str, like: Any, *, key: str = "config.model.pretrained") -> Any:
  """The params of a converted model, checked to have like's tree and shapes (e.g. jax.eval_shape's).

  key names the setting that gave directory in errors.
  """
  path = os.path.join(os.path.abspath(os.path.expanduser(directory)), "model.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{key}={directory!r} is not a converted model: {path} does not exist.")
  with open(path) as f:
    kind = json.load(f).get("kind")
  _, params = load(directory, kind=kind)
  got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise ValueError(f"{key}={directory!r} does not fit config.model: {len(diff)} parameters differ, e.g. "
                     + ", ".join(f"{k} {got.get(k)} there, {want.get(k)} here" for k in diff[:3]) + ".")
  return params


def load_autoencoder(directory: str) -> tuple[autoencoder.AutoencoderKL, Any, dict[str, Any]]:
  """(module, params, description) of a KL autoencoder: converted, or a workdir trained here.

  A converted one (scripts/convert_diffusers_vae.py) has model.json; a workdir trained with
  config.model.name="autoencoder" has config.json and checkpoints/, and gives the EMA parameters of its
  latest readable checkpoint, with description {"kind", "kwargs", "step", "source"}.
  """
  path = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(os.path.join(path, "model.json")):
    description, params = load(directory, kind="autoencoder_kl")
    return autoencoder.AutoencoderKL(**module_kwargs(description["kwargs"])), params, description
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      name = json.load(f).get("model", {}).get("name")
    if name == "autoencoder":
      return _load_trained_autoencoder(path)
    raise ValueError(f"{path} is a workdir of config.model.name={name!r}, not of an autoencoder "
                     "(config.model.name='autoencoder').")
  raise FileNotFoundError(f"{path} is not a KL autoencoder: expected a converted model (model.json and "
                          "params/, scripts/convert_diffusers_vae.py) or the workdir of a run trained "
                          "with config.model.name='autoencoder' (config.json and checkpoints/).")


def _load_trained_autoencoder(workdir: str) -> tuple[autoencoder.AutoencoderKL, Any, dict[str, Any]]:
  """The latest readable checkpoint's EMA parameters of an autoencoder workdir."""
  # pylint: disable=g-import-not-at-top
  from training import checkpoints
  from training import tasks
  from training import train as train_lib
  # pylint: enable=g-import-not-at-top
  manager = checkpoints.create_manager(workdir, read_only=True)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"{workdir} is an autoencoder workdir without checkpoints: train it first.")
    mesh = train_lib.create_mesh()
    state, step = checkpoints.restore(
        manager, lambda saved, shape: train_lib.abstract_state(saved, image_shape=shape, mesh=mesh))
    config = checkpoints.restore_config(workdir, step)
    shape = checkpoints.restore_image_shape(manager, step)
  finally:
    manager.close()
  model = tasks.autoencoder_model(config.model, channels=shape[-1])
  kwargs = {f: getattr(model, f) for f in ("ch", "ch_mult", "num_res_blocks", "latent_channels",
                                           "out_channels", "groups", "mid_attention", "use_quant_conv")}
  kwargs["ch_mult"] = list(kwargs["ch_mult"])
  description = {"kind": "autoencoder_kl", "kwargs": kwargs, "step": int(step), "source": workdir,
                 "image_shape": list(shape)}
  return model, jax.tree.map(np.asarray, jax.device_get(state.ema_params)), description


def load_text_encoder(directory: str) -> tuple[clip.CLIPTextTransformer, Any, dict[str, Any]]:
  """(module, params, description) of a converted CLIP text encoder (scripts/convert_clip.py)."""
  description, params = load(directory, kind="clip_text")
  return clip.CLIPTextTransformer(**module_kwargs(description["kwargs"])), params, description


def module_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
  """A model.json's kwargs as a module takes them: JSON lists become tuples (modules stay hashable and
  equal to the ones they were saved from)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def sd_unet_module(kwargs: dict[str, Any]) -> sd_unet.SDUNet:
  """The SDUNet of a model.json's kwargs."""
  return sd_unet.SDUNet(**module_kwargs(kwargs))


def load_sd_unet(directory: str) -> tuple[sd_unet.SDUNet, Any, dict[str, Any]]:
  """(module, params, description) of a converted SD UNet (scripts/convert_diffusers_unet.py)."""
  description, params = load(directory, kind="sd_unet")
  return sd_unet_module(description["kwargs"]), params, description
