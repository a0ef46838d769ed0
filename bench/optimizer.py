"""The train step's update after the gradients: clipping, AdamW, the EMA and the non-finite guard.

Three ways, on the config's parameters with constant gradients, in alternating rounds:
- `select`: update, then jnp.where(finite, new, old) over the whole state (the guard before);
- `cond`: training/train_step.apply_if_finite, a lax.cond around the update (the guard now);
- `unguarded`: the update alone, the floor any guard is measured against.

  python bench/optimizer.py [--config configs/cifar10.py] [--rounds 4] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import models
from bench import train as bench_train
from training import train_step as train_step_lib


def update_ways(tx: optax.GradientTransformation, ema_decay: float) -> dict[str, Any]:
  """name -> jitted, donated (state, grads) -> state."""
  def unguarded(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return train_step_lib.TrainState(
        step=state.step + 1, params=params,
        ema_params=train_step_lib.ema_update(state.ema_params, params, ema_decay), opt_state=opt_state)

  def finite(grads):
    return jnp.isfinite(optax.global_norm(grads))

  def select(state, grads):
    new = unguarded(state, grads)
    ok = finite(grads)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)

  def cond(state, grads):
    return train_step_lib.apply_if_finite(finite(grads), state, grads, tx=tx, ema_decay=ema_decay)

  return {name: jax.jit(fn, donate_argnums=0)
          for name, fn in (("select", select), ("cond", cond), ("unguarded", unguarded))}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--runs", type=int, default=3, help="Timed updates per way and round.")
  parser.add_argument("--rounds", type=int, default=4, help="Alternating rounds (median over all runs).")
  parser.add_argument("--quick", action="store_true", help="Tiny config (for tests).")
  parser.add_argument("--out", default=None,
                      help="JSON path (default bench/results/<device>-<date>-optimizer.json).")
  args = parser.parse_args(argv)
  args.peer, args.peer_python = False, None
  if args.quick:
    args.config, args.runs, args.rounds = "configs/tiny.py", 1, 2
  base, channels, _, results = bench_train.prepare(
      args, bench="optimizer", cpu_setting="config", batch_sizes=[1], cpu_devices=1)
  model = models.create_model(base.model)
  tx, _ = train_step_lib.create_optimizer(base.optim)
  size = base.data.image_size
  init = jax.jit(functools.partial(train_step_lib.init_state, model=model, tx=tx,
                                   image_shape=(size, size, channels), num_classes=base.model.num_classes))
  state = init(jax.random.key(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  ways = update_ways(tx, base.optim.ema_decay)
  for fn in ways.values():
    state = jax.block_until_ready(fn(state, grads))
  times = {name: [] for name in ways}
  for _ in range(args.rounds):
    for name, fn in ways.items():
      for _ in range(args.runs):
        start = time.perf_counter()
        state = jax.block_until_ready(fn(state, grads))
        times[name].append(time.perf_counter() - start)
  num_params = models.count_params(state.params)
  rows = [{"name": name, "ms": float(np.median(v)) * 1e3, "ms_runs": [t * 1e3 for t in v]}
          for name, v in times.items()]
  print(f"{args.config}: {num_params:,} parameters")
  print(f"{'way':12s} {'ms / update':>12s}")
  for row in rows:
    print(f"{row['name']:12s} {row['ms']:12.1f}")
  results.update(rows=rows, params=num_params)
  results["device"]["load_average_end"] = os.getloadavg()
  path = bench_train.write_json(results, "optimizer", args.out)
  print(f"\nwrote {path}")
  return results


if __name__ == "__main__":
  main()
