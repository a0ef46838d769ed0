"""Where the train step's time goes: the model's convolutions one at a time, ours against the peer.

The trace of a JAX train step on CPU does not name the convolutions XLA hands to Eigen, so this bench
measures them directly. It collects every convolution of one forward pass of the config's UNet (shapes,
strides and padding, from the jaxpr), and times each distinct one alone at the bench's batch: the
forward pass, the input gradient and the weight gradient. Ours runs under the CPU setting, the peer
(--peer) with torch.nn.functional.conv2d and aten.convolution_backward. Weighted by how often each occurs,
the sums are the convolutions' share of a train step; with --steps the full steps of bench/train.py run
too (alternating with the peer's), and step minus convolutions is everything else: normalisation,
activations, attention, the layout copies around the convolutions, the optimizer and the EMA.

  python bench/convs.py [--config configs/cifar10.py] [--batch 32] [--cpu_setting config]
                        [--peer --peer_python .venv-peer/bin/python] [--steps 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from bench import train as bench_train

NHWC = ("NHWC", "HWIO", "NHWC")  # flax.linen.Conv's layout.
KINDS = ("forward", "input_grad", "weight_grad")


def _all_eqns(jaxpr):
  """The equations of a jaxpr and of every jaxpr nested in their parameters (jit, remat, custom_vjp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)


def model_convolutions(config: ml_collections.ConfigDict, *, batch: int,
                       channels: int) -> list[dict[str, Any]]:
  """The distinct convolutions of one forward pass, in call order, each with how often it occurs.

  The first one reads the images: the train step needs no input gradient of it.
  """
  model = models.create_model(config.model)
  size = config.data.image_size
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = {"label": jax.ShapeDtypeStruct((batch,), jnp.int32)} if config.model.num_classes else None
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                             jnp.zeros((1,)),
                                             None if y is None else {"label": jnp.zeros((1,), jnp.int32)},
                                             train=False))
  jaxpr = jax.make_jaxpr(lambda p, x, t, y: model.apply(p, x, t, y, train=False))(params, x, t, y)
  found: dict[tuple, dict[str, Any]] = {}
  for eqn in _all_eqns(jaxpr.jaxpr):
    if eqn.primitive.name != "conv_general_dilated":
      continue
    p = eqn.params
    if (tuple(p["lhs_dilation"]) != (1, 1) or tuple(p["rhs_dilation"]) != (1, 1)
        or p["feature_group_count"] != 1 or p["batch_group_count"] != 1):
      raise NotImplementedError(f"a dilated or grouped convolution: {p}")
    spec = {"lhs": list(eqn.invars[0].aval.shape), "rhs": list(eqn.invars[1].aval.shape),
            "strides": list(p["window_strides"]), "padding": [list(pad) for pad in p["padding"]],
            "out": list(eqn.outvars[0].aval.shape)}
    key = json.dumps(spec)
    if key not in found:
      n, ho, wo, cout = spec["out"]
      kh, kw, cin, _ = spec["rhs"]
      found[key] = {**spec, "count": 0, "gflop": 2 * n * ho * wo * cout * kh * kw * cin / 1e9,
                    "input_grad_needed": bool(found)}
    found[key]["count"] += 1
  return list(found.values())


def _median_ms(fn, args, runs: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def time_ours(spec: dict[str, Any], runs: int) -> dict[str, float]:
  """Median ms of our forward, input gradient and weight gradient of one convolution, each jitted."""
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=spec["strides"],
                           padding=[tuple(p) for p in spec["padding"]], dimension_numbers=NHWC)
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, spec["lhs"])
  w = jax.random.normal(kw, spec["rhs"]) * 0.05
  g = jax.random.normal(kg, spec["out"])
  calls = {"forward": (jax.jit(conv), (x, w)),
           "input_grad": (jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]), (x, w, g)),
           "weight_grad": (jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]), (x, w, g))}
  return {name: _median_ms(fn, args, runs) for name, (fn, args) in calls.items()}


def time_peer(specs: list[dict[str, Any]], *, peer_python: str, runs: int) -> dict[str, Any]:
  cmd = [peer_python, os.path.join(ROOT, "bench", "peer_torch.py"), "--mode", "convs",
         "--device", bench_train.peer_device(), "--steps", str(runs)]
  proc = subprocess.run(cmd, input=json.dumps(specs), capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def step_total_ms(row: dict[str, float], input_grad_needed: bool) -> float:
  """ms one occurrence of a convolution costs in a train step: forward, weight and input gradients."""
  return row["forward"] + row["weight_grad"] + (row["input_grad"] if input_grad_needed else 0.0)


def full_steps(args, base, channels: int, peer_python: str | None) -> dict[str, float]:
  """Median train-step seconds of ours (this process) and the eager peer, alternating."""
  config = bench_train.variant_config(base, "fp32")
  runners = {"ours": bench_train.OursTrain(config, batch=args.batch, channels=channels)}
  if peer_python:
    runners["peer"] = bench_train.start_peer(peer_python, base, channels, batch=args.batch,
                                             dtype="float32")
    if runners["peer"].error:
      raise RuntimeError(runners["peer"].error)
  try:
    times, _ = bench_train.alternate(runners, steps=args.steps, rounds=2)
  finally:
    if "peer" in runners:
      runners["peer"].close()
  return {name: float(np.median(t)) for name, t in times.items()}


def print_table(rows: list[dict], totals: dict[str, Any]) -> None:
  peer = any("peer" in r for r in rows)
  head = f"{'convolution (NHWC in, kernel, stride)':40s} {'count':>5s} {'GFLOP':>6s}  ours fwd/in/w ms"
  print("\n" + head + ("       peer fwd/in/w ms      ours/peer" if peer else ""))
  print("-" * (len(head) + (40 if peer else 0)))
  for r in rows:
    n, h, w, cin = r["lhs"]
    name = f"{h}x{w}x{cin} -> {r['out'][3]}, {r['rhs'][0]}x{r['rhs'][1]}, /{r['strides'][0]}"
    ours = "/".join(f"{r['ours'][k]:.1f}" for k in KINDS)
    line = f"{name:40s} {r['count']:5d} {r['gflop']:6.2f}  {ours:>20s}"
    if peer:
      theirs = "/".join(f"{r['peer'][k]:.1f}" for k in KINDS)
      line += f"  {theirs:>20s}  {r['peer_step_ms'] / r['ours_step_ms']:8.2f}x"
    print(line)
  print()
  for key, label in (("convolutions_s", "convolutions of one train step (x count)"),
                     ("step_s", "train step (bench/train.py's, median)"),
                     ("rest_s", "rest of the step (step - convolutions)")):
    if key in totals["ours"]:
      line = f"{label:53s} ours {totals['ours'][key]:7.3f} s"
      if "peer" in totals and key in totals["peer"]:
        line += (f"   peer {totals['peer'][key]:7.3f} s   ours/peer "
                 f"{totals['peer'][key] / totals['ours'][key]:.2f}x")
      print(line)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--batch", type=int, default=32, help="Global batch size.")
  parser.add_argument("--runs", type=int, default=10, help="Timed calls of each convolution (median).")
  parser.add_argument("--steps", type=int, default=8, help="Full train steps each (0: convolutions only).")
  parser.add_argument("--cpu_setting", default="config",
                      help=f"XLA:CPU setting, from {', '.join(bench_train.CPU_SETTINGS)}.")
  parser.add_argument("--peer", action="store_true", help="Also time the peer (PyTorch).")
  parser.add_argument("--peer_python", default=None, help="Python with torch and diffusers.")
  parser.add_argument("--quick", action="store_true", help="Tiny config, batch 4 (for tests).")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-convs.json).")
  args = parser.parse_args(argv)
  if args.quick:
    args.config, args.batch, args.runs, args.steps = "configs/tiny.py", 4, 2, 2
  # One device: the convolutions are timed at the whole batch.
  base, channels, peer_python, results = bench_train.prepare(
      args, bench="convs", cpu_setting=args.cpu_setting, batch_sizes=[args.batch], cpu_devices=1)

  rows = model_convolutions(base, batch=args.batch, channels=channels)
  print(f"{sum(r['count'] for r in rows)} convolutions, {len(rows)} distinct; timing them one by one",
        flush=True)
  for row in rows:
    row["ours"] = time_ours(row, args.runs)
    row["ours_step_ms"] = step_total_ms(row["ours"], row["input_grad_needed"])
  totals: dict[str, Any] = {"ours": {}}
  sides = ["ours"]
  if peer_python:
    peer = time_peer(rows, peer_python=peer_python, runs=args.runs)
    results["peer"] = {k: v for k, v in peer.items() if k != "convs"}
    for row, timed in zip(rows, peer["convs"]):
      row["peer"] = timed
      row["peer_step_ms"] = step_total_ms(timed, row["input_grad_needed"])
    totals["peer"] = {}
    sides.append("peer")
  for side in sides:
    totals[side]["convolutions_s"] = sum(r["count"] * r[f"{side}_step_ms"] for r in rows) / 1e3
    totals[side]["by_kind_s"] = {
        k: sum(r["count"] * r[side][k] for r in rows if k != "input_grad" or r["input_grad_needed"]) / 1e3
        for k in KINDS}
  if args.steps:
    for side, step_s in full_steps(args, base, channels, peer_python).items():
      totals[side].update(step_s=step_s, rest_s=step_s - totals[side]["convolutions_s"])
  results.update(rows=rows, totals=totals, gflop_per_step=3 * sum(r["count"] * r["gflop"] for r in rows))
  results["device"]["load_average_end"] = os.getloadavg()
  print_table(rows, totals)
  path = bench_train.write_json(results, "convs", args.out)
  print(f"\nwrote {path}")
  return results


if __name__ == "__main__":
  main()
