"""Models by name, and building one from the `config.model` section."""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.unet import UNet

MODELS = {"unet": UNet}
# config.model.dtype: the compute dtype; parameters, optimizer state and EMA stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION = (None, "xla", "cudnn")  # config.model.attention, jax.nn.dot_product_attention's implementation.


def create_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Builds `MODELS[config.model.name]` from the other fields of `config.model`."""
  fields = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  name = fields.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is not one of {', '.join(MODELS)}.")
  cls = MODELS[name]
  allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
  unknown = sorted(set(fields) - set(allowed))
  if unknown:
    raise ValueError(f"config.model.{unknown[0]} is not a field of {cls.__name__}; "
                     f"allowed: name, {', '.join(allowed)}.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if "dtype" in kwargs:
    if kwargs["dtype"] not in DTYPES:
      raise ValueError(f"config.model.dtype={kwargs['dtype']!r} is not one of {', '.join(DTYPES)}.")
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  return cls(**kwargs)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
