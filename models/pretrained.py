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


def load_autoencoder(directory: str) -> tuple[autoencoder.AutoencoderKL, Any, dict[str, Any]]:
  """(module, params, description) of a converted KL autoencoder (scripts/convert_diffusers_vae.py)."""
  description, params = load(directory, kind="autoencoder_kl")
  return autoencoder.AutoencoderKL(**description["kwargs"]), params, description


def load_text_encoder(directory: str) -> tuple[clip.CLIPTextTransformer, Any, dict[str, Any]]:
  """(module, params, description) of a converted CLIP text encoder (scripts/convert_clip.py)."""
  description, params = load(directory, kind="clip_text")
  return clip.CLIPTextTransformer(**description["kwargs"]), params, description


def sd_unet_module(kwargs: dict[str, Any]) -> sd_unet.SDUNet:
  """The SDUNet of a model.json's kwargs (JSON lists become the module's tuples)."""
  return sd_unet.SDUNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def load_sd_unet(directory: str) -> tuple[sd_unet.SDUNet, Any, dict[str, Any]]:
  """(module, params, description) of a converted SD UNet (scripts/convert_diffusers_unet.py)."""
  description, params = load(directory, kind="sd_unet")
  return sd_unet_module(description["kwargs"]), params, description
