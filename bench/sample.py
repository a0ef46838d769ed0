"""Sampling speed in images/s: DPM-Solver++(2M) and DDPM through our Sampler, against the PyTorch peer.

Ours is training/generate.py's Sampler (one compiled program per batch: the whole loop under lax.scan);
the peer is diffusers' DPMSolverMultistepScheduler / DDPMScheduler loop around the same UNet
(bench/peer_torch.py --mode sample). One "run" draws one batch with all its steps; ours and the peer
alternate runs. The parameters are freshly initialised: speed does not depend on training. Prints a
table, writes bench/results/<device>-<date>-sample.json.

  python bench/sample.py [--config configs/cifar10.py] [--batch_sizes 64,256]
                         [--samplers dpmpp_2m:20,ddpm:1000] [--variants fp32,bf16] [--peer] [--quick]
"""

from __future__ import annotations

import argparse
import os
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
from training import generate
from training import train as train_lib


class OursSample:
  """Our Sampler on fresh parameters; run(n) times n sampling runs of one batch each."""

  def __init__(self, config: ml_collections.ConfigDict, *, batch: int, sampler: str, steps: int,
               channels: int):
    self.batch = batch
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    model = models.create_model(config.model)
    d = config.diffusion
    schedule = train_lib.create_schedule(d)  # The config's process (the peer always runs VP eps: same calls).
    size = config.data.image_size
    x = jnp.zeros((1, size, size, channels))
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    self.params = jax.jit(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), y,
                                             train=False)["params"])()
    self.num_params = models.count_params(self.params)
    options = generate.SampleOptions(sampler=sampler, steps=steps, batch_size=batch,
                                     prediction=d.prediction)
    self.sampler = generate.Sampler(model=model, schedule=schedule, options=options, mesh=mesh,
                                    image_shape=(size, size, channels),
                                    num_classes=config.model.num_classes)
    self._seed = 0
    start = time.perf_counter()
    self.run(1)
    self.first_call_s = time.perf_counter() - start
    steady = float(np.median(self.run(1)))
    self.compile_s = self.first_call_s - steady  # The first call's extra time: tracing and compiling.
    self.peak_memory = bench_train.peak_memory()

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      self._seed += 1
      start = time.perf_counter()
      self.sampler.sample(self.params, seed=self._seed, num=self.batch)  # Returns host uint8 images.
      times.append(time.perf_counter() - start)
    return times


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--batch_sizes", default="64", help="Sampling batch sizes, comma-separated.")
  parser.add_argument("--samplers", default="dpmpp_2m:20,ddpm:1000",
                      help="sampler:steps pairs; the peer has dpmpp_2m and ddpm.")
  parser.add_argument("--variants", default="fp32",
                      help=f"Model switches, from {', '.join(bench_train.VARIANTS)}.")
  parser.add_argument("--runs", type=int, default=4, help="Timed sampling runs (batches) per variant.")
  parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds the runs are split into.")
  parser.add_argument("--peer", action="store_true", help="Also run the PyTorch peer.")
  parser.add_argument("--peer_python", default=None, help="Python with torch and diffusers.")
  parser.add_argument("--peer_modes", default="peer_eager", help="peer_eager and/or peer_compiled.")
  parser.add_argument("--peer_dtypes", default=None, help="Peer dtypes; default: those of --variants.")
  parser.add_argument("--quick", action="store_true", help="Tiny model, batch 4, a few steps (for tests).")
  parser.add_argument("--cpu_setting", default="config",
                      help=f"XLA:CPU setting, from {', '.join(bench_train.CPU_SETTINGS)}.")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>-sample.json).")
  return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.quick:
    args.config, args.batch_sizes, args.samplers = "configs/tiny.py", "4", "dpmpp_2m:3,ddpm:4"
    args.variants, args.runs, args.rounds, args.peer_modes = "fp32", 2, 1, "peer_eager"
    args.peer_dtypes = "float32"
  # config.cpu, as main.py applies it, or another of bench/train.py's CPU_SETTINGS.
  base, channels, peer_python, results = bench_train.prepare(
      args, bench="sample", cpu_setting=args.cpu_setting,
      batch_sizes=[int(b) for b in args.batch_sizes.split(",")])

  for batch in map(int, args.batch_sizes.split(",")):
    for pair in args.samplers.split(","):
      sampler, steps = pair.split(":")
      steps = int(steps)
      runners, rows = {}, {}
      for name in args.variants.split(","):
        config = ml_collections.ConfigDict(base.to_dict())
        config.model.update(bench_train.VARIANTS[name])
        try:
          ours = OursSample(config, batch=batch, sampler=sampler, steps=steps, channels=channels)
        except Exception as e:  # pylint: disable=broad-except
          print(f"batch {batch} {sampler} {name}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
          results.setdefault("variant_errors", {})[f"{name}@{batch}/{sampler}"] = str(e)[:2000]
          continue
        runners[name] = ours
        rows[name] = dict(compile_s=ours.compile_s, first_call_s=ours.first_call_s,
                          peak_memory_bytes=ours.peak_memory[0],
                          peak_memory_kind=ours.peak_memory[1] + " (running peak of this process)",
                          params=ours.num_params, dtype=config.model.dtype)
        print(f"batch {batch} {sampler}:{steps} {name}: first call {ours.first_call_s:.1f} s", flush=True)
      peers = {}
      if peer_python:
        peers, peer_rows = bench_train.start_peers(
            args, base, batch, channels, peer_python, results,
            extra_args=("--mode", "sample", "--sampler", sampler, "--sample_steps", str(steps),
                        "--warmup", "1"))
        rows.update(peer_rows)
      table = bench_train.measure(runners, peers, rows, batch=batch, steps=args.runs,
                                  rounds=args.rounds, sampler=sampler, sampler_steps=steps)
      for row in table:
        row["run_s"] = row.pop("step_s")
        row["step_ms_per_model_call"] = row["run_s"] / steps * 1e3
      results["rows"] += table
      print_table(table, f"{args.config}, {sampler} {steps} steps, batch {batch} "
                         f"({results['device']['device_kind']}; ours/peer = images/s ratio)")
  results["device"]["load_average_end"] = os.getloadavg()
  path = bench_train.write_json(results, "sample", args.out)
  print(f"\nwrote {path}")
  return results


def print_table(rows: list[dict], title: str) -> None:
  print(f"\n{title}")
  header = (f"{'name':14s} {'batch':>5s} {'steps':>5s} {'compile s':>9s} {'run s':>8s} "
            f"{'ms/call':>8s} {'img/s':>8s} {'mem MiB':>8s}  ours/peer")
  print(header)
  print("-" * len(header))
  for r in rows:
    ratios = bench_train.ratio_text(r)
    mem = r.get("peak_memory_bytes")
    print(f"{r['name']:14s} {r['batch']:5d} {r['sampler_steps']:5d} "
          f"{bench_train._fmt(r.get('compile_s'), '9.1f')} {r['run_s']:8.2f} "
          f"{r['step_ms_per_model_call']:8.1f} {r['images_per_s']:8.2f} "
          f"{bench_train._fmt(mem and mem / 2**20, '8.0f')}  {ratios}")


if __name__ == "__main__":
  main()
