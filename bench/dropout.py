"""Dropout's random bits in the train step: jax.random.bernoulli (32 bits per element) against
models.layers.dropout (16 bits per element), at every dropout of the config's model.

The dropout shapes come from one forward pass of the model (flax's method interceptor); each distinct
shape is timed alone, both ways, in alternating rounds, and the sums weighted by count are the time one
train step spends drawing dropout masks (the backward pass reuses the mask, so it adds no bits).

  python bench/dropout.py [--config configs/cifar10.py] [--batch 32] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

import models
from bench import train as bench_train
from models import layers


def dropout_shapes(config, *, batch: int, channels: int) -> dict[tuple[int, ...], int]:
  """{input shape: count} of the model's Dropout calls in one training forward pass."""
  model = models.create_model(config.model)
  size = config.data.image_size
  x = jnp.zeros((batch, size, size, channels))
  t = jnp.zeros((batch,))
  y = jnp.zeros((batch,), jnp.int32) if config.model.num_classes else None
  seen: collections.Counter = collections.Counter()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Dropout) and context.method_name == "__call__":
      seen[tuple(args[0].shape)] += 1
    return next_fun(*args, **kwargs)

  def forward(rng):
    params = model.init(rng, x, t, y, train=False)
    with nn.intercept_methods(record):
      return model.apply(params, x, t, y, train=True, rngs={"dropout": rng})

  jax.eval_shape(forward, jax.random.key(0))
  return dict(seen)


def bernoulli_dropout(rng, x, rate):
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--batch", type=int, default=32, help="Global batch size.")
  parser.add_argument("--runs", type=int, default=3, help="Timed calls per shape and round.")
  parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds (median over them).")
  parser.add_argument("--quick", action="store_true", help="Tiny config, batch 4 (for tests).")
  parser.add_argument("--out", default=None,
                      help="JSON path (default bench/results/<device>-<date>-dropout.json).")
  args = parser.parse_args(argv)
  args.peer, args.peer_python = False, None
  if args.quick:
    args.config, args.batch, args.runs, args.rounds = "configs/tiny.py", 4, 1, 2
  base, channels, _, results = bench_train.prepare(
      args, bench="dropout", cpu_setting="config", batch_sizes=[args.batch], cpu_devices=1)
  rate = base.model.unet.dropout
  shapes = dropout_shapes(base, batch=args.batch, channels=channels)
  ways = {"bernoulli_32bit": jax.jit(bernoulli_dropout, static_argnums=2),
          "layers_16bit": jax.jit(layers.dropout, static_argnums=2)}
  inputs = {s: jnp.ones(s) for s in shapes}
  rng = jax.random.key(0)
  for fn in ways.values():
    for x in inputs.values():
      jax.block_until_ready(fn(rng, x, rate))
  per_round = {name: [] for name in ways}
  for _ in range(args.rounds):
    for name, fn in ways.items():
      total = 0.0
      for shape, count in shapes.items():
        start = time.perf_counter()
        for _ in range(args.runs):
          jax.block_until_ready(fn(rng, inputs[shape], rate))
        total += count * (time.perf_counter() - start) / args.runs
      per_round[name].append(total)
  rows = [{"name": name, "ms_per_step": float(np.median(v)) * 1e3,
           "ms_per_step_rounds": [t * 1e3 for t in v]} for name, v in per_round.items()]
  elements = sum(int(np.prod(s)) * c for s, c in shapes.items())
  print(f"{args.config}, batch {args.batch}: {sum(shapes.values())} dropouts, {elements:,} elements, "
        f"rate {rate}")
  print(f"{'way':18s} {'ms / step':>10s}")
  for row in rows:
    print(f"{row['name']:18s} {row['ms_per_step']:10.1f}")
  print(f"ratio bernoulli / 16-bit: {rows[0]['ms_per_step'] / rows[1]['ms_per_step']:.2f}")
  results.update(rows=rows, elements=elements, rate=rate,
                 shapes=[{"shape": list(s), "count": c} for s, c in shapes.items()])
  results["device"]["load_average_end"] = os.getloadavg()
  path = bench_train.write_json(results, "dropout", args.out)
  print(f"\nwrote {path}")
  return results


if __name__ == "__main__":
  main()
