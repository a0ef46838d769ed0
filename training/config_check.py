"""Checks of a whole config, run before anything is compiled; errors name the config key."""

from __future__ import annotations

import ml_collections

import input_pipeline
import models
from diffusion import grids
from diffusion import losses
from diffusion import parameterization
from diffusion import samplers
from diffusion import schedules
from training import xla_cpu


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _choice(key: str, value, allowed) -> None:
  _require(value in allowed, f"config.{key}={value!r} is not one of {', '.join(map(str, allowed))}.")


def _validate_unet(unet: ml_collections.ConfigDict, *, image_size: int) -> None:
  _require(unet.ch > 0, f"config.model.unet.ch={unet.ch} must be positive.")
  _require(len(unet.ch_mult) > 0 and all(m > 0 for m in unet.ch_mult),
           f"config.model.unet.ch_mult={tuple(unet.ch_mult)} must be a non-empty tuple of positive ints.")
  _require(unet.num_res_blocks > 0,
           f"config.model.unet.num_res_blocks={unet.num_res_blocks} must be positive.")
  _require(0.0 <= unet.dropout < 1.0, f"config.model.unet.dropout={unet.dropout} must be in [0, 1).")
  _require(unet.num_heads > 0, f"config.model.unet.num_heads={unet.num_heads} must be positive.")
  factor = 2 ** (len(unet.ch_mult) - 1)
  _require(image_size % factor == 0,
           f"config.data.image_size={image_size} is not divisible by {factor}, the UNet's downsampling "
           f"for config.model.unet.ch_mult={tuple(unet.ch_mult)} ({len(unet.ch_mult)} levels).")
  resolutions = [image_size // 2**i for i in range(len(unet.ch_mult))]
  for res in unet.attn_resolutions:
    _require(res in resolutions, f"config.model.unet.attn_resolutions contains {res}, which is none of "
             f"the UNet's resolutions {resolutions} for image_size={image_size}.")
  for mult in unet.ch_mult:
    ch = unet.ch * mult
    _require(ch % unet.num_heads == 0, f"config.model.unet.num_heads={unet.num_heads} does not divide "
             f"the {ch} channels of a level with ch_mult {mult}.")


def _validate_dit(dit: ml_collections.ConfigDict, *, image_size: int) -> None:
  for key in ("patch_size", "hidden_size", "depth", "num_heads"):
    _require(isinstance(dit[key], int) and dit[key] > 0,
             f"config.model.dit.{key}={dit[key]!r} must be a positive integer.")
  _require(dit.mlp_ratio > 0, f"config.model.dit.mlp_ratio={dit.mlp_ratio} must be positive.")
  _require(image_size % dit.patch_size == 0, f"config.data.image_size={image_size} is not divisible by "
           f"config.model.dit.patch_size={dit.patch_size}.")
  _require(dit.hidden_size % dit.num_heads == 0, f"config.model.dit.num_heads={dit.num_heads} does not "
           f"divide config.model.dit.hidden_size={dit.hidden_size}.")
  _require(dit.hidden_size % 4 == 0, f"config.model.dit.hidden_size={dit.hidden_size} must be divisible "
           "by 4 (2-D sin-cos position embeddings).")


# config.model.name -> the checks of its config.model.<name> section.
_MODEL_CHECKS = {"unet": _validate_unet, "dit": _validate_dit}


def validate_model(model: ml_collections.ConfigDict, *, image_size: int) -> None:
  _choice("model.name", model.name, tuple(models.MODELS))
  models.model_fields(model)  # The section exists and holds only the model's own fields.
  _MODEL_CHECKS[model.name](model[model.name], image_size=image_size)
  _require(model.num_classes >= 0, f"config.model.num_classes={model.num_classes} must be >= 0.")
  _choice("model.dtype", model.dtype, tuple(models.DTYPES))
  _choice("model.attention", model.attention, models.ATTENTION)
  _require(model.attention != "cudnn" or model.dtype == "bfloat16",
           f"config.model.attention='cudnn' needs config.model.dtype='bfloat16' (cuDNN's fused attention "
           f"takes 16-bit inputs), got {model.dtype!r}; use attention 'xla' or None for float32.")
  _require(isinstance(model.remat, bool), f"config.model.remat={model.remat!r} is not one of False, True.")


def validate_diffusion(diffusion: ml_collections.ConfigDict, *, num_classes: int) -> None:
  _choice("diffusion.schedule", diffusion.schedule, schedules.SCHEDULES)
  _require(diffusion.num_timesteps >= 0,
           f"config.diffusion.num_timesteps={diffusion.num_timesteps} must be >= 0 (0 = continuous time).")
  _choice("diffusion.prediction", diffusion.prediction, parameterization.PREDICTIONS)
  _choice("diffusion.loss_weighting", diffusion.loss_weighting, losses.WEIGHTINGS)
  _require(diffusion.min_snr_gamma > 0, f"config.diffusion.min_snr_gamma={diffusion.min_snr_gamma} must be > 0.")
  _require(0.0 <= diffusion.p_uncond <= 1.0, f"config.diffusion.p_uncond={diffusion.p_uncond} must be in [0, 1].")
  _require(diffusion.p_uncond == 0 or num_classes > 0,
           f"config.diffusion.p_uncond={diffusion.p_uncond} needs a class-conditional model "
           "(config.model.num_classes > 0).")
  _require(not (diffusion.zero_terminal_snr and diffusion.prediction == "eps"),
           "config.diffusion.zero_terminal_snr=True needs config.diffusion.prediction='v' or 'x0': "
           "at SNR 0 the noise is the input and eps prediction cannot recover x0 (Lin et al. 2023, Sec. 3.2).")
  if diffusion.schedule == "linear":
    _require(0 < diffusion.beta_start < diffusion.beta_end < 1,
             f"config.diffusion.beta_start={diffusion.beta_start} and beta_end={diffusion.beta_end} must "
             "satisfy 0 < beta_start < beta_end < 1.")
  model_time = diffusion.get("model_time", "index")  # Configs saved before the key mean "index".
  _choice("diffusion.model_time", model_time, schedules.MODEL_TIMES)
  _require(model_time != "index_from_zero" or diffusion.num_timesteps > 0,
           "config.diffusion.model_time='index_from_zero' numbers discrete steps; it needs "
           f"config.diffusion.num_timesteps > 0, got {diffusion.num_timesteps}.")


def validate_optim(optim: ml_collections.ConfigDict) -> None:
  _require(optim.learning_rate > 0, f"config.optim.learning_rate={optim.learning_rate} must be > 0.")
  _require(optim.warmup_steps >= 0, f"config.optim.warmup_steps={optim.warmup_steps} must be >= 0.")
  _require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1,
           f"config.optim.b1={optim.b1} and b2={optim.b2} must be in [0, 1).")
  _require(optim.eps > 0, f"config.optim.eps={optim.eps} must be > 0.")
  _require(optim.weight_decay >= 0, f"config.optim.weight_decay={optim.weight_decay} must be >= 0.")
  _require(optim.grad_clip >= 0, f"config.optim.grad_clip={optim.grad_clip} must be >= 0 (0 disables).")
  _require(0 <= optim.ema_decay <= 1, f"config.optim.ema_decay={optim.ema_decay} must be in [0, 1].")


def validate_training(training: ml_collections.ConfigDict, *, device_count: int) -> None:
  _require(training.batch_size > 0, f"config.training.batch_size={training.batch_size} must be positive.")
  _require(training.batch_size % device_count == 0,
           f"config.training.batch_size={training.batch_size} is not divisible by the {device_count} "
           "devices: the global batch is split evenly over all devices (on CPU, config.cpu.devices sets "
           "how many).")
  _require(training.num_steps >= 0, f"config.training.num_steps={training.num_steps} must be >= 0.")
  for key in ("log_every", "checkpoint_every", "max_to_keep"):
    _require(training[key] > 0, f"config.training.{key}={training[key]} must be positive.")
  for key in ("sample_every", "keep_every"):
    _require(training[key] >= 0, f"config.training.{key}={training[key]} must be >= 0 (0 disables).")
  _require(training.keep_every % training.checkpoint_every == 0,
           f"config.training.keep_every={training.keep_every} is not a multiple of "
           f"config.training.checkpoint_every={training.checkpoint_every}: only checkpoints at multiples "
           "of both would be kept.")


def validate_sample(sample: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
  del device_count  # Any batch size runs on any devices: generate.Sampler pads each batch.
  _choice("sample.sampler", sample.sampler, tuple(samplers.SAMPLERS))
  _require(sample.steps > 0, f"config.sample.steps={sample.steps} must be positive.")
  _require(sample.num > 0, f"config.sample.num={sample.num} must be positive.")
  _require(sample.batch_size > 0, f"config.sample.batch_size={sample.batch_size} must be positive.")
  _require(sample.eta >= 0, f"config.sample.eta={sample.eta} must be >= 0.")
  if sample.grid is not None:
    _choice("sample.grid", sample.grid, tuple(grids.GRIDS))
  if sample.get("grid_file") is not None:
    _require(sample.grid is None, f"config.sample.grid={sample.grid!r} and config.sample.grid_file="
             f"{sample.grid_file!r} both name a grid; set one of them.")
    grids.read_grid_file(sample.grid_file, steps=sample.steps)
  _choice("sample.ddpm_variance", sample.ddpm_variance, ("small", "large"))
  _require(sample.s_churn >= 0, f"config.sample.s_churn={sample.s_churn} must be >= 0.")
  _require(sample.guidance_scale >= 0, f"config.sample.guidance_scale={sample.guidance_scale} must be >= 0.")
  _require(0 <= sample.guidance_rescale <= 1,
           f"config.sample.guidance_rescale={sample.guidance_rescale} must be in [0, 1].")
  _require(sample.dynamic_threshold is None or 0 < sample.dynamic_threshold <= 1,
           f"config.sample.dynamic_threshold={sample.dynamic_threshold} must be a quantile in (0, 1] "
           "(e.g. 0.995) or None.")


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, process_count: int) -> None:
  """Raises ValueError naming the first bad key of config; touches no data and compiles nothing."""
  input_pipeline.validate_data_config(config.data, global_batch_size=config.training.batch_size,
                                      process_count=process_count)
  validate_model(config.model, image_size=config.data.image_size)
  validate_diffusion(config.diffusion, num_classes=config.model.num_classes)
  validate_optim(config.optim)
  validate_training(config.training, device_count=device_count)
  if config.training.sample_every:  # Settings of a disabled feature do not block a run.
    validate_sample(config.sample, device_count=device_count)
  xla_cpu.validate(config.cpu)


def validate_against_data(config: ml_collections.ConfigDict, *, num_classes: int) -> None:
  """Checks that need the dataset's metadata (its number of classes)."""
  _require(config.model.num_classes == 0 or config.model.num_classes == num_classes,
           f"config.model.num_classes={config.model.num_classes} but config.data.name="
           f"{config.data.name!r} has {num_classes} classes.")
