"""--mode=sample: draw images from a workdir's checkpoint with any sampler, whatever it was trained with.

The model, schedule and parameterisation come from the config saved with the checkpoint; the sampling
settings (config.sample) from the command line. Results go to workdir/samples/ as a .npz (uint8 images,
labels, the settings used) and a PNG grid, under a new name each time. With config.sample.image and
config.sample.mask, every image is an inpainting of that image (`_inpaint` in the file name).
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from evaluation import run as run_lib
from training import checkpoints
from training import config_check
from training import generate
from training import lora
from training import spaces
from training import train as train_lib
from training import writers


def unique_path(directory: str, stem: str, suffixes: tuple[str, ...]) -> str:
  """directory/stem, or stem_1, stem_2, ... so that no file stem + suffix exists yet."""
  candidate, n = stem, 0
  while any(os.path.exists(os.path.join(directory, candidate + s)) for s in suffixes):
    n += 1
    candidate = f"{stem}_{n}"
  return os.path.join(directory, candidate)


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Draws config.sample.num images from the EMA params; returns the path stem of the files written.

  config.sample.steps=None takes the run's own (a progressive student's N: its sampler is recorded).
  """
  if config.sample.steps is None:
    config = config.copy_and_resolve_references()
    config.sample.steps = checkpoints.restore_config(workdir).sample.steps
  config_check.validate_sample(config.sample, device_count=jax.device_count())
  config_check.validate_mesh(config.mesh, device_count=jax.device_count())
  config_check.validate_lora(config.lora, model_name=config.model.name)
  mesh = train_lib.create_mesh(config.mesh)  # This run's mesh, whatever the checkpoint was trained on.
  trained, state, model, schedule = run_lib.load_run(workdir, config.sample.checkpoint_step, mesh=mesh,
                                                     step_key="config.sample.checkpoint_step")
  step = int(state.step)
  params = state.ema_params
  if config.lora.load is not None:  # A LoRA file, merged once before the sampler runs.
    params = lora.merge_file(os.path.expanduser(config.lora.load), {"unet": params},
                             scale=config.lora.scale)["unet"]
  # The checkpoint's own model, schedule and space; the sampling settings of the command line.
  trained = run_lib.with_command_line(trained, config, sections=("sample",))
  image_shape = run_lib.image_shape(workdir, step)
  space = spaces.space_for_run(trained, image_shape)
  image = mask = None
  if config.sample.image is not None or config.sample.mask is not None:
    image, mask = config_check.read_inpaint_files(config.sample, data_shape=space.data_shape)
  sampler = generate.Sampler.from_config(trained, model=model, schedule=schedule,
                                         mesh=mesh, image_shape=image_shape, space=space)
  start = time.perf_counter()
  images, labels = sampler.sample(params, seed=trained.sample.seed, num=trained.sample.num,
                                  image=image, mask=mask)
  seconds = time.perf_counter() - start

  s, o = trained.sample, sampler.options  # o: after config.sample.preset.
  stem = f"step{step}_{o.sampler}_{o.steps}steps_w{o.guidance_scale:g}_seed{s.seed}"
  if image is not None:
    stem += "_inpaint"
  out_dir = os.path.join(workdir, "samples")
  path = unique_path(out_dir, stem, (".npz", ".png"))
  settings = {"checkpoint_step": step, "seconds": seconds, "num_devices": jax.device_count(),
              **sampler.options.__dict__, "seed": s.seed, "num": s.num, "space": space.description,
              "image": s.image, "mask": s.mask, "lora": config.lora.load, "lora_scale": config.lora.scale}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".npz.tmp", "wb") as f:
      np.savez(f, images=images, labels=labels, settings=json.dumps(settings))
    os.replace(path + ".npz.tmp", path + ".npz")
    writers.save_png(path + ".png", writers.image_grid(images, cols=trained.model.num_classes or None))
  logging.info("Drew %d images with %s, %d steps, in %.1f s: %s.{npz,png}", len(images), o.sampler,
               o.steps, seconds, path)
  return path
