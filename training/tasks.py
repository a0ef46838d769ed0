"""What the training loop trains, behind one interface: a diffusion model, or the KL autoencoder.

The loop (training/train.py) restores, steps, logs, visualises and checkpoints whatever `Task` it is
given; config.model.name and config.distill.method pick the task (TASKS). A task gives the state's initialiser, the pure step
(state, batch, constants) -> (state, metrics), the metrics averaged over each log window, and what
is drawn every config.training.sample_every steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from models import autoencoder as autoencoder_lib
from models import discriminator as discriminator_lib
from models import lpips as lpips_lib
from training import autoencoder_step
from training import consistency
from training import lora
from training import progressive
from training import spaces
from training import text as text_lib
from training import train_step as train_step_lib
from training import writers


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between kinds of training; the loop calls only these."""

  init_state: Callable[[jax.Array], Any]  # rng -> a fresh train state (a pytree with .step).
  train_step: Callable[[Any, dict, Any], tuple[Any, dict]]  # (state, batch, constants) -> (state, metrics).
  constants: Any  # Frozen arrays the step reads (LPIPS weights), an argument rather than compiled in.
  metric_names: tuple[str, ...]  # Metrics averaged over each log window; "loss" and "grad_norm" first.
  visualise: Optional[Callable[[Any], tuple[np.ndarray, dict[str, float]]]]  # state -> (grid, scalars).
  image_tag: str  # TensorBoard tag of the grid; its PNG is samples/<png_prefix><step>.png.
  png_prefix: str


def task_name(config: ml_collections.ConfigDict) -> str:
  """The key of TASKS that trains config: its autoencoder, its distillation method, or diffusion."""
  if config.model.name == "autoencoder":
    return "autoencoder"
  return DISTILLATION_TASKS.get(config.distill.method, "diffusion")


def diffusion_task(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...], rng: jax.Array,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   space: Optional[spaces.Space] = None) -> Task:
  """Denoising training (training/train_step.py) in space; sample grids from the EMA parameters.

  The step's constants are the space's frozen parameters (the autoencoder's in latent space).
  """
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  model = models.create_model(config.model)
  schedule = train_lib.create_schedule(config.diffusion)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  text = text_lib.create_conditioning(config)  # None without config.text.encoder.
  init_state = _base_init(config, model=model, tx=tx, image_shape=image_shape, text=text)
  encode = space.encode_batch if space is not None else None
  condition = spaces.make_condition(config, space) if space is not None else None
  params_fn = None
  adapters = lora.Settings.from_config(config.lora) if config.lora.rank else None
  if adapters is not None:  # Low-rank adapters on a frozen base (training/lora.py): frozen {"space", "base"}.
    init_state = functools.partial(lora.init_state, base_init=init_state, tx=tx, settings=adapters,
                                   text_params=None if text is None else text.encoder.params)
    encode, condition = lora.on_space(encode), lora.on_space(condition)
    params_fn = lora.base_params_fn(adapters)
  step = train_step_lib.make_train_step(
      model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
      hparams=train_step_lib.DiffusionHParams.from_config(
          config.diffusion, learn_sigma=models.learns_variance(config.model)),
      num_classes=config.model.num_classes, ema_decay=config.optim.ema_decay, rng=rng,
      encode=encode, condition=condition, params_fn=params_fn, text=text)
  constants = None
  if mesh is not None and space is not None:
    constants = jax.device_put(space.params, NamedSharding(mesh, P()))
    if adapters is not None:
      base = lora.load_base(config.lora.base, expected=base_shapes(config, image_shape=image_shape),
                            mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
      constants = {"space": constants, "base": base}
    if text is not None:  # A frozen text encoder's params join the step's constants.
      text_params = jax.device_put(text.frozen_params, NamedSharding(mesh, P()))
      constants = {**(constants if adapters is not None else {"space": constants}), "text": text_params}
  sampled_params = None
  if adapters is not None:  # Merged once per grid, outside the sampler's program.
    sampled_params = lambda state: lora.merge_model(constants["base"], state.ema_params, settings=adapters)
  return Task(
      init_state=init_state, train_step=step, constants=constants,
      metric_names=("loss", "grad_norm"),
      visualise=sample_grids(config, model=model, schedule=schedule, mesh=mesh, image_shape=image_shape,
                             space=space, sampled_params=sampled_params, text=text),
      image_tag="samples", png_prefix="train_step_")


def sample_grids(config: ml_collections.ConfigDict, *, model: Any, schedule: Any,
                 mesh: Optional[jax.sharding.Mesh], image_shape: tuple[int, ...],
                 space: Optional[spaces.Space],
                 sampled_params: Optional[Callable[[Any], Any]] = None,
                 text: Optional[text_lib.TextConditioning] = None,
                 ) -> Optional[Callable[[Any], tuple[np.ndarray, dict]]]:
  """state -> (a grid of config.sample.num images drawn from its EMA parameters, {}); None without a mesh
  or with config.training.sample_every = 0. sampled_params(state) replaces state.ema_params (LoRA); a
  text model draws the held-out captions' prompts."""
  from training import generate  # pylint: disable=g-import-not-at-top

  if mesh is None or not config.training.sample_every:
    return None
  sampler = generate.Sampler.from_config(config, model=model, schedule=schedule, mesh=mesh,
                                         image_shape=image_shape, space=space)
  prompts = holdout_captions(config) if text is not None else None

  def visualise(state):
    params = state.ema_params if sampled_params is None else sampled_params(state)
    cond = null = None
    if text is not None:
      params, cond, null = text.sampling_inputs(params, prompts)
    images, _ = sampler.sample(params, seed=config.sample.seed, num=config.sample.num, cond=cond,
                               null=null)
    return writers.image_grid(images, cols=config.model.num_classes or None), {}
  return visualise


def _base_init(config: ml_collections.ConfigDict, *, model: Any, tx: Any,
               image_shape: tuple[int, ...], text: Any = None) -> Callable[[jax.Array], Any]:
  """rng -> a fresh train state of the diffusion model's own parameters (and a trainable text encoder's)."""
  context_width = config.model.sd_unet.cross_attention_dim if config.model.name == "sd_unet" else 0
  return functools.partial(train_step_lib.init_state, model=model, tx=tx, image_shape=image_shape,
                           num_classes=config.model.num_classes,
                           concat_channels=spaces.concat_channels(config, image_shape), text=text,
                           context_width=context_width)


def base_shapes(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...]) -> Any:
  """Shapes of the diffusion model's parameters (a LoRA run's base), without allocating them."""
  init = _base_init(config, model=models.create_model(config.model),
                    tx=train_step_lib.create_optimizer(config.optim)[0], image_shape=image_shape)
  return jax.eval_shape(init, jax.random.key(0)).params


def autoencoder_model(model_config: ml_collections.ConfigDict, *,
                      channels: int) -> autoencoder_lib.AutoencoderKL:
  """The AutoencoderKL of config.model for images with the given channels."""
  return models.create_model(model_config).clone(out_channels=channels)


def holdout_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The first config.sample.num images of config.data.holdout_split (default config.data.split),

  in [-1, 1], as the model sees them (not flipped): the fixed images of PSNR and reconstruction grids.
  """
  from evaluation import run as run_lib  # pylint: disable=g-import-not-at-top

  data = ml_collections.ConfigDict(config.data.to_dict())
  data.split = config.data.get("holdout_split") or config.data.split
  images = run_lib.DatasetImages(data)
  if config.sample.num > len(images):
    raise ValueError(f"config.sample.num={config.sample.num} held-out images are more than the "
                     f"{len(images)} of config.data.holdout_split={data.split!r}.")
  return images.read(0, config.sample.num)[0].astype(np.float32) / 127.5 - 1.0


def holdout_captions(config: ml_collections.ConfigDict) -> list[str]:
  """The captions of the first config.sample.num examples of config.data.holdout_split (or split):
  the prompts of a text model's sample grids during training."""
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top

  split = config.data.get("holdout_split") or config.data.split
  info = sources.open_source(name=config.data.name, split=split, data_dir=config.data.data_dir,
                             image_size=config.data.image_size)
  texts = [info.source[i][config.data.caption_feature] for i in range(min(config.sample.num, len(info.source)))]
  return [t.decode() if isinstance(t, bytes) else str(t) for t in texts]


def reconstruction_grid(inputs: np.ndarray, outputs: np.ndarray, *, cols: int = 8) -> np.ndarray:
  """uint8 grid of rows of inputs, each above the row of their reconstructions."""
  cols = min(cols, len(inputs))
  rows = math.ceil(len(inputs) / cols)
  blank = np.full((rows * cols - len(inputs), *inputs.shape[1:]), 255, np.uint8)
  pad = lambda a: np.concatenate([writers.to_uint8(a), blank])
  a, b = pad(inputs), pad(outputs)
  pairs = [part for r in range(rows) for part in (a[r * cols:(r + 1) * cols], b[r * cols:(r + 1) * cols])]
  return writers.image_grid(np.concatenate(pairs), cols=cols)


def make_reconstruct(model: autoencoder_lib.AutoencoderKL,
                     mesh: jax.sharding.Mesh) -> Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """(params, images) -> (reconstructions from the posterior mode, PSNR per image) as numpy."""
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def reconstruct(params, x):
    x_hat, _ = model.apply({"params": params}, x)
    return x_hat, autoencoder_step.psnr(x_hat, x)

  def run(params, images):
    x_hat, psnr = reconstruct(params, jax.device_put(images, replicated))
    return np.asarray(jax.device_get(x_hat)), np.asarray(jax.device_get(psnr))
  return run


def autoencoder_task(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...],
                     rng: jax.Array, mesh: Optional[jax.sharding.Mesh] = None,
                     space: Optional[spaces.Space] = None) -> Task:
  """KL autoencoder training (training/autoencoder_step.py); held-out reconstructions and PSNR.

  An autoencoder is trained on pixels: space is not read.
  """
  del space
  loss_config = config.autoencoder_loss
  model = autoencoder_model(config.model, channels=image_shape[-1])
  discriminator = None
  if loss_config.disc_weight > 0:
    discriminator = discriminator_lib.NLayerDiscriminator(ch=loss_config.disc_ch,
                                                          n_layers=loss_config.disc_layers)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  lpips_fn = constants = None
  if loss_config.lpips_weight > 0:
    lpips_fn = lambda params, x_hat, x: lpips_lib.LPIPS().apply({"params": params}, x_hat, x)
    if mesh is not None:  # Only a run reads the weights; the state's shapes do not need them.
      constants = jax.device_put(lpips_lib.load_params(loss_config.lpips_path), NamedSharding(mesh, P()))
  step = functools.partial(
      autoencoder_step.train_step, model=model, discriminator=discriminator, lpips_fn=lpips_fn, tx=tx,
      lr_fn=lr_fn, loss=autoencoder_step.AutoencoderLoss.from_config(loss_config),
      ema_decay=config.optim.ema_decay, rng=rng)
  visualise = None
  if mesh is not None and config.training.sample_every:
    images = holdout_images(config)
    reconstruct = make_reconstruct(model, mesh)

    def visualise(state):
      x_hat, psnr = reconstruct(state.ema_params, images)
      return reconstruction_grid(images, x_hat), {"holdout_psnr": float(np.mean(psnr))}

  names = ("loss", "grad_norm", "reconstruction", "kl")
  names += ("lpips",) * (lpips_fn is not None)
  names += ("g_loss", "d_loss", "adaptive_weight") * (discriminator is not None)
  return Task(
      init_state=functools.partial(autoencoder_step.init_state, model=model, discriminator=discriminator,
                                   tx=tx, image_shape=image_shape),
      train_step=lambda state, batch, constants: step(state, batch, constants), constants=constants,
      metric_names=names, visualise=visualise, image_tag="reconstructions",
      png_prefix="reconstructions_step_")


# task_name(config) -> the function that builds the task.
TASKS = {"diffusion": diffusion_task, "autoencoder": autoencoder_task,
         "progressive_distillation": progressive.progressive_task,
         "consistency": consistency.consistency_task}
# config.distill.method -> its key of TASKS.
DISTILLATION_TASKS = {progressive.METHOD: "progressive_distillation", "consistency": "consistency"}


def create_task(config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...], rng: jax.Array,
                mesh: Optional[jax.sharding.Mesh] = None, space: Optional[spaces.Space] = None) -> Task:
  """The task of config; without a mesh only init_state and train_step's shapes are usable.

  space (training/spaces.py) is where a diffusion model's x0 comes from and its samples go: pixels
  when None.
  """
  return TASKS[task_name(config)](config, image_shape=image_shape, rng=rng, mesh=mesh, space=space)


def reconstruct(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample of an autoencoder run: reconstructs the held-out images with the latest EMA params.

  Writes workdir/samples/step<N>_reconstructions.{npz,png} (inputs, reconstructions, PSNR per image);
  returns the path stem.
  """
  from models import pretrained  # pylint: disable=g-import-not-at-top
  from training import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  model, params, description = pretrained.load_autoencoder(workdir)
  images = holdout_images(config)
  x_hat, psnr = make_reconstruct(model, train_lib.create_mesh())(params, images)
  out_dir = os.path.join(workdir, "samples")
  path = sample_lib.unique_path(out_dir, f"step{description['step']}_reconstructions", (".npz", ".png"))
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".npz.tmp", "wb") as f:
      np.savez(f, inputs=writers.to_uint8(images), reconstructions=writers.to_uint8(x_hat), psnr=psnr)
    os.replace(path + ".npz.tmp", path + ".npz")
    writers.save_png(path + ".png", reconstruction_grid(images, x_hat))
  logging.info("Reconstructed %d held-out images: PSNR %.2f dB; %s.{npz,png}", len(images),
               float(np.mean(psnr)), path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """--mode=eval of an autoencoder run: PSNR, rFID and LPIPS of held-out reconstructions."""
  from evaluation import autoencoder_eval  # pylint: disable=g-import-not-at-top
  return autoencoder_eval.evaluate_autoencoder(config, workdir)


# main.py's modes that differ for an autoencoder run.
AUTOENCODER_MODES = {"sample": reconstruct, "eval": evaluate}
