"""Latent diffusion's train step: encoding each batch with the frozen encoder against reading a latent
cache (config.latent.cache: posterior moments encoded once, a fresh posterior sample drawn each step).

Two setups, each with a randomly initialised autoencoder of the real one's shape (step time does not
depend on the weights): configs/digits_latent.py (the digits autoencoder of configs/digits_vae.py,
32x32 -> 8x8x4) and configs/celeba64_latent.py (SD's autoencoder, 64x64x3 -> 8x8x4). Each step is
compiled once, then timed over --steps steps after one warm-up, in alternating rounds.

  python bench/latent_cache.py [--steps 5] [--rounds 2] [--celeba_batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import celeba64_latent  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import digits_latent  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import digits_vae  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
from training import spaces  # pylint: disable=g-import-not-at-top,wrong-import-position
from training import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from training import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

SD_VAE = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, groups=32)


def setups(celeba_batch: int):
  """(name, diffusion config, autoencoder kwargs, image channels)."""
  vae = digits_vae.get_config().model.autoencoder
  digits = digits_latent.get_config()
  celeba = celeba64_latent.get_config()
  celeba.training.batch_size = celeba_batch
  digits_ae = dict(ch=vae.ch, ch_mult=tuple(vae.ch_mult), num_res_blocks=vae.num_res_blocks,
                   latent_channels=vae.latent_channels, groups=vae.groups)
  return [("digits_latent", digits, digits_ae, 1), ("celeba64_latent", celeba, SD_VAE, 3)]


def make_step(config, ae_kwargs, channels, *, cached: bool):
  """(jitted step, state, batch, constants) of the config's diffusion train step."""
  config = config.copy_and_resolve_references()
  config.training.sample_every = 0
  config.latent.scale_factor = 0.18215
  module = autoencoder.AutoencoderKL(**ae_kwargs, out_channels=channels)
  size, batch = config.data.image_size, config.training.batch_size
  params = module.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"]
  space = spaces.LatentSpace(data_shape=(size, size, channels), autoencoder=module,
                             params=params, scale_factor=0.18215, path="random", cached=cached)
  mesh = train_lib.create_mesh()
  task = tasks.diffusion_task(config, image_shape=space.shape, rng=jax.random.key(1), mesh=mesh,
                              space=space)
  state = jax.jit(task.init_state)(jax.random.key(2))
  h, w, c = space.shape
  shape = (batch, h, w, 2 * c) if cached else (batch, size, size, channels)
  batch_arrays = {"image": jax.random.normal(jax.random.key(3), shape) * (0.1 if cached else 0.5),
                  "label": jnp.zeros((batch,), jnp.int32)}
  step = jax.jit(task.train_step, donate_argnums=0)
  return step, state, batch_arrays, task.constants


def time_steps(step, state, batch, constants, *, steps: int):
  state, metrics = step(state, batch, constants)  # Warm-up.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, constants)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--celeba_batch", type=int, default=16)
  args = parser.parse_args()
  rows = []
  for name, config, ae_kwargs, channels in setups(args.celeba_batch):
    runs = {}
    for cached in (False, True):
      start = time.perf_counter()
      step, state, batch, constants = make_step(config, ae_kwargs, channels, cached=cached)
      state, metrics = step(state, batch, constants)  # Compiles; the state is donated.
      jax.block_until_ready(metrics)
      runs[cached] = [step, state, batch, constants, time.perf_counter() - start]
    times = {False: [], True: []}
    for _ in range(args.rounds):
      for cached in (False, True):
        step, state, batch, constants, _ = runs[cached]
        state, seconds = time_steps(step, state, batch, constants, steps=args.steps)
        runs[cached][1] = state
        times[cached].append(seconds)
    encode, cache = float(np.median(times[False])), float(np.median(times[True]))
    rows.append({"setup": name, "batch": config.training.batch_size,
                 "image": [config.data.image_size] * 2 + [channels],
                 "encode_step_s": encode, "cache_step_s": cache, "speedup": encode / cache,
                 "compile_encode_s": runs[False][4], "compile_cache_s": runs[True][4]})
  print(f"{'setup':<18}{'batch':>6}{'encode s/step':>15}{'cache s/step':>14}{'speed-up':>10}")
  for r in rows:
    print(f"{r['setup']:<18}{r['batch']:>6}{r['encode_step_s']:>15.4f}{r['cache_step_s']:>14.4f}"
          f"{r['speedup']:>9.2f}x")
  out = {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
         "jax": jax.__version__, "devices": jax.device_count(), "steps": args.steps,
         "rounds": args.rounds, "rows": rows}
  path = os.path.join(ROOT, "bench", "results",
                      f"{jax.devices()[0].platform}-{time.strftime('%Y-%m-%d')}-latent_cache.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
