"""--mode=sample: draw images from a workdir's checkpoint with any sampler, whatever it was trained with.

The model, schedule and parameterisation come from the config saved with the checkpoint; the sampling
settings (config.sample) from the command line. Results go to workdir/samples/ as a .npz (uint8 images,
labels, the settings used) and a PNG grid, under a new name each time. With config.sample.image and
config.sample.mask, every image is an inpainting of that image (`_inpaint` in the file name).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

import models
from evaluation import run as run_lib
from training import checkpoints
from training import config_check
from training import generate
from training import lora
from training import sharding
from training import spaces
from training import text as text_lib
from training import train as train_lib
from training import writers


def unique_path(directory: str, stem: str, suffixes: tuple[str, ...]) -> str:
  """directory/stem, or stem_1, stem_2, ... so that no file stem + suffix exists yet."""
  candidate, n = stem, 0
  while any(os.path.exists(os.path.join(directory, candidate + s)) for s in suffixes):
    n += 1
    candidate = f"{stem}_{n}"
  return os.path.join(directory, candidate)


def _pretrained_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(config, params, model, schedule, image_shape) of config.model.pretrained, for a workdir without
  checkpoints: the command line's config describes the model (configs/stable_diffusion.py)."""
  if config.model.name != "sd_unet":
    raise ValueError(f"config.model.pretrained={config.model.pretrained!r} is sampled without a checkpoint "
                     f"for config.model.name='sd_unet' only, not {config.model.name!r}.")
  config_check.validate_latent(config)
  config_check.validate_diffusion(config.diffusion, num_classes=config.model.num_classes,
                                  text=config.text.encoder is not None)
  factor, channels = 1, config.model.sd_unet.in_channels
  if config.latent.autoencoder is not None:
    factor = spaces.load_autoencoder(config.latent.autoencoder)[0].downsampling_factor
  config_check.validate_model(config.model, image_size=config.data.image_size // factor)
  size = config.data.image_size // factor
  image_shape = (size, size, channels - spaces.concat_channels(config, (size, size, 0)))
  model = models.create_model(config.model)
  cond = {"context": jax.ShapeDtypeStruct((1, 1, config.model.sd_unet.cross_attention_dim), np.float32)}
  if spaces.concat_channels(config, image_shape):
    cond["concat"] = jax.ShapeDtypeStruct((1, size, size, spaces.concat_channels(config, image_shape)),
                                          np.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *image_shape), np.float32),
                          jax.ShapeDtypeStruct((1,), np.float32), cond)["params"]
  shardings = sharding.state_shardings(shapes, mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        shardings)
  params = train_lib.pretrained_params(config, target)
  return config, params, model, train_lib.create_schedule(config.diffusion), image_shape


def _has_checkpoint(workdir: str) -> bool:
  manager = checkpoints.create_manager(workdir, read_only=True)
  try:
    return manager.latest_step() is not None
  finally:
    manager.close()


def _merge_lora_file(lora_config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict, params: Any,
                     encoder: Optional[text_lib.TextEncoder]) -> tuple[Any, Optional[text_lib.TextEncoder]]:
  """(params, encoder) with config.lora.load's adapters merged: the UNet's, and the frozen text
  encoder's where the file has them (kohya's lora_te_*, PEFT's text_encoder.*)."""
  path = os.path.expanduser(lora_config.load)
  if trained.text.trainable or lora.adapts_text_encoder(trained.lora):
    raise ValueError(f"config.lora.load={lora_config.load!r}: this run trained its text encoder "
                     f"(config.text.trainable={trained.text.trainable}, config.lora.text_targets="
                     f"{tuple(trained.lora.get('text_targets') or ())}); a LoRA file is merged into a "
                     "frozen converted encoder and a UNet, so sample a converted workdir instead.")
  parts = {"unet": params}
  if encoder is not None and encoder.params is not None:
    parts["text_encoder"] = encoder.params
  merged = lora.merge_file(path, parts, scale=lora_config.scale)
  if "text_encoder" in merged:
    encoder = dataclasses.replace(encoder, params=merged["text_encoder"])
  return merged["unet"], encoder


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Draws config.sample.num images from the EMA params; returns the path stem of the files written.

  config.sample.steps=None takes the run's own (a progressive student's N: its sampler is recorded).
  A workdir without checkpoints samples config.model.pretrained's weights with the command line's config.
  """
  pretrained = config.model.get("pretrained") is not None and not _has_checkpoint(workdir)
  if config.sample.steps is None and not pretrained:
    config = config.copy_and_resolve_references()
    config.sample.steps = checkpoints.restore_config(workdir).sample.steps
  config_check.validate_sample(config.sample, device_count=jax.device_count())
  config_check.validate_mesh(config.mesh, device_count=jax.device_count())
  config_check.validate_lora(config.lora, model_name=config.model.name)
  prompts = config_check.read_prompts(config.sample)
  mesh = train_lib.create_mesh(config.mesh)  # This run's mesh, whatever the checkpoint was trained on.
  if pretrained:
    trained, params, model, schedule, image_shape = _pretrained_run(config, mesh)
    source, checkpoint = "pretrained", os.path.abspath(os.path.expanduser(config.model.pretrained))
  else:
    trained, state, model, schedule = run_lib.load_run(workdir, config.sample.checkpoint_step, mesh=mesh,
                                                       step_key="config.sample.checkpoint_step")
    step = int(state.step)
    params, source = state.ema_params, f"step{step}"
    checkpoint = os.path.join(os.path.abspath(checkpoints.checkpoint_dir(workdir)), str(step))
    image_shape = run_lib.image_shape(workdir, step)
  # The checkpoint's own model, schedule and space; the sampling settings of the command line.
  trained = run_lib.with_command_line(trained, config, sections=("sample",))
  space = spaces.space_for_run(trained, image_shape)
  encoder = text_lib.create_text_encoder(trained)
  config_check.validate_prompts(trained, context_width=encoder.width if encoder else None)
  if config.lora.load is not None:  # A LoRA file, merged once before the sampler runs.
    params, encoder = _merge_lora_file(config.lora, trained, params, encoder)
  text = text_lib.create_conditioning(trained, encoder)
  image = mask = None
  if config.sample.image is not None or config.sample.mask is not None:
    image, mask = config_check.read_inpaint_files(config.sample, data_shape=space.data_shape)
  sampler = generate.Sampler.from_config(trained, model=model, schedule=schedule, mesh=mesh,
                                         image_shape=image_shape, space=space)
  s, o = trained.sample, sampler.options  # o: after config.sample.preset.
  start = time.perf_counter()
  cond = null = None
  if text is not None:  # The run's own encoder: a trained one's EMA weights, else the converted ones.
    prompts = prompts or [""]
    params, cond, null = text.sampling_inputs(params, prompts, negative_prompt=s.negative_prompt, num=s.num)
  images, labels = sampler.sample(params, seed=s.seed, num=s.num, image=image, mask=mask, cond=cond,
                                  null=null)
  seconds = time.perf_counter() - start

  stem = f"{source}_{o.sampler}_{o.steps}steps_w{o.guidance_scale:g}_seed{s.seed}"
  if image is not None:
    stem += "_inpaint"
  out_dir = os.path.join(workdir, "samples")
  path = unique_path(out_dir, stem, (".npz", ".png"))
  settings = {"checkpoint": checkpoint, "seconds": seconds, "num_devices": jax.device_count(),
              **sampler.options.__dict__, "seed": s.seed, "num": s.num, "space": space.description,
              "image": s.image, "mask": s.mask, "lora": config.lora.load, "lora_scale": config.lora.scale}
  if source != "pretrained":
    settings["checkpoint_step"] = step
  extra = {}
  if text is not None:
    settings.update(prompts=prompts, negative_prompt=s.negative_prompt)
    extra["prompts"] = np.array([prompts[i % len(prompts)] for i in range(len(images))])
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".npz.tmp", "wb") as f:
      np.savez(f, images=images, labels=labels, settings=json.dumps(settings), **extra)
    os.replace(path + ".npz.tmp", path + ".npz")
    cols = len(prompts) if text is not None and len(prompts) > 1 else trained.model.num_classes
    writers.save_png(path + ".png", writers.image_grid(images, cols=cols or None),
                     metadata=png_metadata(settings))
  logging.info("Drew %d images with %s, %d steps, in %.1f s: %s.{npz,png}", len(images), o.sampler,
               o.steps, seconds, path)
  return path


def png_metadata(settings: dict) -> dict[str, str]:
  """The PNG text chunks of a sampling run: prompts, negative prompt, sampler, steps, scale, seed,
  checkpoint, and every setting as JSON."""
  keys = {"prompt": "prompts", "negative_prompt": "negative_prompt", "sampler": "sampler",
          "steps": "steps", "guidance_scale": "guidance_scale", "seed": "seed", "checkpoint": "checkpoint"}
  out = {}
  for chunk, key in keys.items():
    if key in settings:
      value = settings[key]
      out[chunk] = "\n".join(value) if isinstance(value, list) else str(value)
  out["settings"] = json.dumps(settings)
  return out
