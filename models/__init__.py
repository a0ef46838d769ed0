"""Models by name, and building one from the `config.model` section."""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.autoencoder import AutoencoderKL
from models.dit import DiT
from models.sd_unet import SDUNet
from models.unet import UNet

# config.model.name -> the backbone; its own knobs are config.model.<name>, the shared ones config.model.*.
MODELS = {"unet": UNet, "dit": DiT, "autoencoder": AutoencoderKL, "sd_unet": SDUNet}
SHARED_FIELDS = ("num_classes", "dtype", "attention", "remat")
# config.model.dtype: the compute dtype; parameters, optimizer state and EMA stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = (None, "xla", "cudnn")  # config.model.attention, jax.nn.dot_product_attention's implementation.


def model_fields(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of MODELS[config.model.name]: the shared keys and those of its own section."""
  fields = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  name = fields.get("name")
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is not one of {', '.join(MODELS)}.")
  if not isinstance(fields.get(name), Mapping):
    raise ValueError(f"config.model.{name} is missing: the section of the {name!r} model's own knobs.")
  cls = MODELS[name]
  allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
  # The shared keys a model has no field for (an autoencoder's num_classes) do not apply to it.
  shared = {k: fields[k] for k in SHARED_FIELDS if k in fields and k in allowed}
  own = dict(fields[name])
  unknown = sorted(set(own) - set(allowed))
  if unknown:
    raise ValueError(f"config.model.{name}.{unknown[0]} is not a field of {cls.__name__}; "
                     f"allowed: {', '.join(k for k in allowed if k not in SHARED_FIELDS)}.")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in {**shared, **own}.items()}


def create_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Builds MODELS[config.model.name] from config.model's shared keys and its config.model.<name> section."""
  kwargs = model_fields(model_config)
  if "dtype" in kwargs:
    if kwargs["dtype"] not in DTYPES:
      raise ValueError(f"config.model.dtype={kwargs['dtype']!r} is not one of {', '.join(DTYPES)}.")
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  return MODELS[model_config["name"]](**kwargs)


def learns_variance(model_config: Mapping[str, Any]) -> bool:
  """Whether config.model's network also outputs its variances (config.model.dit.learn_sigma)."""
  section = model_config.get(model_config.get("name")) or {}
  return bool(section.get("learn_sigma", False))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
