"""FLOPs of a traced program, counted from its jaxpr: every matrix product and convolution, 2 per
multiply-add, through jit, remat, custom derivatives, conds (the costlier branch) and scans (times their
length).

XLA's cost analysis counts what stays an HLO op: on GPUs it leaves out the convolutions and attention
that become cuDNN or cuBLAS calls, and so undercounts a UNet's train step about tenfold. The jaxpr count
is the same on every backend, so MFU = counted FLOPs / step time / peak means the same thing on a CPU,
a GPU and a TPU. Elementwise work (normalisation, activations, the optimizer) is not counted, as in
the usual MFU (Chowdhery et al. 2022, App. B).

  python bench/flops.py --config configs/imagenet256_dit.py --latent_shape 32,32,4 --batch 256
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.extend
import jax.numpy as jnp


def _dot_flops(eqn) -> float:
  (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  contracted = math.prod(lhs[d] for d in lhs_contract)
  del rhs, lhs_batch
  return 2.0 * math.prod(out) * contracted


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out feature dim, in feature dim, spatial dims...).
  rhs_spec = dn.rhs_spec
  in_features = rhs[rhs_spec[1]]
  spatial = math.prod(rhs[d] for d in rhs_spec[2:])
  del lhs
  return 2.0 * math.prod(out) * in_features * spatial


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> float:
  """Matrix-product and convolution FLOPs of a jaxpr (see the module docstring)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "while":
      total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)  # Trip count unknown: counted once.
    else:
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def count_flops(fn, *args, **kwargs) -> float:
  """Matrix-product and convolution FLOPs of fn(*args, **kwargs), traced (nothing is run)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def train_step_flops(config, *, batch: int, channels: int) -> float:
  """FLOPs of one train step (forward, backward) of config's model at the global batch."""
  import models  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top
  from training import train_step as train_step_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  if config.model.get("attention") == "cudnn":  # The same products, traced through XLA's path.
    config.model.attention = "xla"
  model = models.create_model(config.model)
  schedule = train_lib.create_schedule(config.diffusion)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  size = config.data.image_size
  init = functools.partial(train_step_lib.init_state, model=model, tx=tx,
                           image_shape=(size, size, channels), num_classes=config.model.num_classes)
  state = jax.eval_shape(init, jax.random.key(0))
  data = {"image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  step = train_step_lib.make_train_step(
      model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
      hparams=train_step_lib.DiffusionHParams.from_config(d), num_classes=config.model.num_classes,
      ema_decay=config.optim.ema_decay, rng=jax.random.key(0))
  return count_flops(step, state, data)


def main(argv=None) -> None:
  from bench import train as bench_train  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--batch", type=int, default=128, help="Global batch size.")
  parser.add_argument("--latent_shape", default=None, metavar="H,W,C", help="As bench/train.py's.")
  args = parser.parse_args(argv)
  config = bench_train.load_config(args.config)
  channels = 1 if config.data.name == "digits" else 3
  if args.latent_shape:
    config.data.image_size, _, channels = (int(v) for v in args.latent_shape.split(","))
  flops = train_step_flops(config, batch=args.batch, channels=channels)
  print(f"{args.config}, batch {args.batch}: {flops / 1e12:.3f} TFLOP per train step "
        f"({flops / args.batch / 3e9:.2f} GFLOP forward per image)")


if __name__ == "__main__":
  main()
