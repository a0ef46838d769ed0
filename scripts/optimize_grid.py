"""Fits an N-step time grid to a trained model (diffusion/optimize_grid.py) and writes it for --mode=sample.

  python scripts/optimize_grid.py --workdir runs/digits --sampler unipc --steps 5
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample \
    --config.sample.sampler=unipc --config.sample.steps=5 --config.sample.grid_file=runs/digits/grids/unipc_5.json

The grid minimises the RMS distance of the sampler's result from --num starting noises (seed
--seed, not the sampling seeds 0, 1, ... of --mode=sample) to a reference solution from the same noise:
--reference_sampler at --reference_steps steps on its default grid. The EMA parameters of the latest
checkpoint (or --step) are used, with the classes 0, 1, 2, ... as --mode=sample draws them. The file
is workdir/grids/<sampler>_<steps>.json (a _1, _2, ... suffix where it exists already).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import models  # pylint: disable=wrong-import-position
from diffusion import guidance  # pylint: disable=wrong-import-position
from diffusion import optimize_grid as optimize_lib  # pylint: disable=wrong-import-position
from diffusion import samplers  # pylint: disable=wrong-import-position
from evaluation import run as run_lib  # pylint: disable=wrong-import-position
from training import sample as sample_lib  # pylint: disable=wrong-import-position


def optimize_run_grid(workdir: str, *, sampler: str, steps: int, num: int = 64, seed: int = 1000,
                      reference_sampler: str = "unipc", reference_steps: int = 200,
                      guidance_scale: float = 1.0, num_iters: int = 300, learning_rate: float = 0.05,
                      step: int | None = None) -> str:
  """Optimises the grid of `sampler` at `steps` steps for the checkpoint of workdir; returns the file written."""
  if sampler not in optimize_lib.DETERMINISTIC:
    raise ValueError(f"--sampler={sampler!r} is not one of {', '.join(optimize_lib.DETERMINISTIC)}.")
  if reference_sampler not in optimize_lib.DETERMINISTIC:
    raise ValueError(f"--reference_sampler={reference_sampler!r} is not one of "
                     f"{', '.join(optimize_lib.DETERMINISTIC)}.")
  config, state, model, schedule = run_lib.load_run(workdir, step, step_key="--step")
  shape = run_lib.image_shape(workdir, int(state.step))
  num_classes = config.model.num_classes
  labels = jnp.asarray(np.arange(num) % max(num_classes, 1), jnp.int32) if num_classes else None
  params = state.ema_params

  def apply_fn(x, model_time, y):
    return model.apply({"params": params}, x, model_time, y, train=False)

  denoise_fn = guidance.make_denoise_fn(
      apply_fn, schedule=schedule, prediction=config.diffusion.prediction,
      cond={"label": labels} if num_classes else None,
      uncond=guidance.null_cond(num_classes=num_classes, batch_size=num) if num_classes else None,
      guidance_scale=guidance_scale, clip_x0=config.sample.clip_x0,
      learned=models.learns_variance(config.model))
  x_T = jax.random.normal(jax.random.key(seed), (num, *shape))
  start = time.perf_counter()
  reference = jax.jit(lambda x: samplers.sample(reference_sampler, denoise_fn, x, jax.random.key(0),
                                                schedule=schedule, steps=reference_steps))(x_T)
  print(f"reference: {reference_sampler} at {reference_steps} steps, {time.perf_counter() - start:.1f} s")

  def report(i, loss):
    if i % 50 == 0:
      print(f"iteration {i}: rmse {loss:.4f}")

  timesteps, losses = optimize_lib.optimize_grid(
      denoise_fn, sampler=sampler, schedule=schedule, steps=steps, x_T=x_T, reference=reference,
      num_iters=num_iters, learning_rate=learning_rate, callback=report)
  out_dir = os.path.join(workdir, "grids")
  os.makedirs(out_dir, exist_ok=True)
  path = sample_lib.unique_path(out_dir, f"{sampler}_{steps}", (".json",)) + ".json"
  record = {"timesteps": [float(t) for t in np.asarray(timesteps, np.float64)], "sampler": sampler,
            "steps": steps, "checkpoint_step": int(state.step), "rmse": losses, "num": num, "seed": seed,
            "reference": f"{reference_sampler} at {reference_steps} steps", "guidance_scale": guidance_scale,
            "default_grid": samplers.default_grid(sampler, schedule)}
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)
  print(f"rmse to the reference: {losses['initial']:.4f} on the default grid, {losses['optimized']:.4f} "
        f"optimized\ntimesteps {record['timesteps']}\nwrote {path}")
  return path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sampler", required=True, help=", ".join(optimize_lib.DETERMINISTIC))
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--num", type=int, default=64, help="starting noises the grid is fitted on")
  parser.add_argument("--seed", type=int, default=1000)
  parser.add_argument("--reference_sampler", default="unipc")
  parser.add_argument("--reference_steps", type=int, default=200)
  parser.add_argument("--guidance_scale", type=float, default=1.0)
  parser.add_argument("--iters", type=int, default=300)
  parser.add_argument("--learning_rate", type=float, default=0.05)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = parser.parse_args(argv)
  try:
    optimize_run_grid(args.workdir, sampler=args.sampler, steps=args.steps, num=args.num, seed=args.seed,
                      reference_sampler=args.reference_sampler, reference_steps=args.reference_steps,
                      guidance_scale=args.guidance_scale, num_iters=args.iters,
                      learning_rate=args.learning_rate, step=args.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  main()
