"""Checks of a whole config, run before anything is compiled; errors name the config key."""

from __future__ import annotations

import math
import os
import re

import ml_collections

import models
from diffusion import consistency
from diffusion import distillation
from diffusion import grids
from diffusion import losses
from diffusion import parameterization
from diffusion import samplers
from diffusion import schedules
from models import sd_unet
from training import autoencoder_step
from training import lora as lora_lib
from training import sharding
from training import train_step
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
  _require(isinstance(dit.get("learn_sigma", False), bool),
           f"config.model.dit.learn_sigma={dit.get('learn_sigma')!r} must be True or False.")
  _require(image_size % dit.patch_size == 0, f"config.data.image_size={image_size} is not divisible by "
           f"config.model.dit.patch_size={dit.patch_size}.")
  _require(dit.hidden_size % dit.num_heads == 0, f"config.model.dit.num_heads={dit.num_heads} does not "
           f"divide config.model.dit.hidden_size={dit.hidden_size}.")
  _require(dit.hidden_size % 4 == 0, f"config.model.dit.hidden_size={dit.hidden_size} must be divisible "
           "by 4 (2-D sin-cos position embeddings).")


def _validate_autoencoder(autoencoder: ml_collections.ConfigDict, *, image_size: int) -> None:
  for key in ("ch", "num_res_blocks", "latent_channels", "groups"):
    _require(isinstance(autoencoder[key], int) and autoencoder[key] > 0,
             f"config.model.autoencoder.{key}={autoencoder[key]!r} must be a positive integer.")
  ch_mult = tuple(autoencoder.ch_mult)
  _require(len(ch_mult) > 0 and all(isinstance(m, int) and m > 0 for m in ch_mult),
           f"config.model.autoencoder.ch_mult={ch_mult} must be a non-empty tuple of positive ints.")
  for mult in ch_mult:
    _require((autoencoder.ch * mult) % autoencoder.groups == 0,
             f"config.model.autoencoder.groups={autoencoder.groups} does not divide the "
             f"{autoencoder.ch * mult} channels of a level with ch_mult {mult}.")
  factor = 2 ** (len(ch_mult) - 1)
  _require(image_size % factor == 0,
           f"config.data.image_size={image_size} is not divisible by {factor}, the autoencoder's "
           f"downsampling for config.model.autoencoder.ch_mult={ch_mult}.")


def _validate_sd_unet(sd: ml_collections.ConfigDict, *, image_size: int) -> None:
  del image_size  # The SD UNet sees latents, whose size the autoencoder sets.
  widths, levels = tuple(sd.block_out_channels), len(sd.block_out_channels)
  _require(levels > 0 and all(isinstance(w, int) and w > 0 for w in widths),
           f"config.model.sd_unet.block_out_channels={widths} must be a non-empty tuple of positive ints.")
  for key in ("layers_per_block", "cross_attention_dim", "in_channels", "out_channels", "norm_num_groups"):
    _require(isinstance(sd[key], int) and sd[key] > 0,
             f"config.model.sd_unet.{key}={sd[key]!r} must be a positive integer.")
  _require(0.0 <= sd.dropout < 1.0, f"config.model.sd_unet.dropout={sd.dropout} must be in [0, 1).")
  for key, allowed in (("down_block_types", sd_unet.DOWN_BLOCKS), ("up_block_types", sd_unet.UP_BLOCKS)):
    types = tuple(sd[key])
    _require(len(types) == levels and all(t in allowed for t in types),
             f"config.model.sd_unet.{key}={types} must have {levels} entries (one per block_out_channels), "
             f"each one of {', '.join(allowed)}.")
  heads = sd.attention_head_dim
  heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
  _require(len(heads) == levels and all(isinstance(h, int) and h > 0 for h in heads),
           f"config.model.sd_unet.attention_head_dim={sd.attention_head_dim} must be a positive int or "
           f"{levels} of them (the heads of each level).")
  for width, h in zip(widths, heads):
    _require(width % h == 0, f"config.model.sd_unet.attention_head_dim: {h} heads do not divide the {width} "
             "channels of their level.")
    _require(width % sd.norm_num_groups == 0, f"config.model.sd_unet.norm_num_groups={sd.norm_num_groups} "
             f"does not divide block_out_channels entry {width}.")



# config.model.name -> the checks of its config.model.<name> section.
_MODEL_CHECKS = {"unet": _validate_unet, "dit": _validate_dit, "autoencoder": _validate_autoencoder,
                 "sd_unet": _validate_sd_unet}


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


def _validate_process(diffusion: ml_collections.ConfigDict) -> None:
  """config.diffusion.process and its keys (sigma_min, sigma_max), and the time sampling."""
  _choice("diffusion.process", diffusion.process, schedules.PROCESSES)
  _require(0 < diffusion.sigma_min < diffusion.sigma_max,
           f"config.diffusion.sigma_min={diffusion.sigma_min} and config.diffusion.sigma_max="
           f"{diffusion.sigma_max} must satisfy 0 < sigma_min < sigma_max.")
  _require(diffusion.sigma_data > 0, f"config.diffusion.sigma_data={diffusion.sigma_data} must be > 0.")
  if diffusion.process != "vp":
    _require(diffusion.num_timesteps == 0,
             f"config.diffusion.process={diffusion.process!r} is a continuous-time process; it needs "
             f"config.diffusion.num_timesteps=0, got {diffusion.num_timesteps}.")
    _require(not diffusion.zero_terminal_snr,
             "config.diffusion.zero_terminal_snr=True rescales a 'vp' schedule; it does not apply to "
             f"config.diffusion.process={diffusion.process!r}.")
  _choice("diffusion.time_sampling", diffusion.time_sampling, train_step.TIME_SAMPLINGS)
  _require(diffusion.time_sampling == "uniform" or diffusion.num_timesteps == 0,
           f"config.diffusion.time_sampling={diffusion.time_sampling!r} needs continuous time "
           f"(config.diffusion.num_timesteps=0), got {diffusion.num_timesteps}.")
  for key in ("p_std", "logit_std"):
    _require(diffusion[key] > 0, f"config.diffusion.{key}={diffusion[key]} must be > 0.")


def validate_diffusion(diffusion: ml_collections.ConfigDict, *, num_classes: int,
                       text: bool = False) -> None:
  _choice("diffusion.schedule", diffusion.schedule, schedules.SCHEDULES)
  _require(diffusion.num_timesteps >= 0,
           f"config.diffusion.num_timesteps={diffusion.num_timesteps} must be >= 0 (0 = continuous time).")
  _validate_process(diffusion)
  _choice("diffusion.prediction", diffusion.prediction, parameterization.PREDICTIONS)
  _choice("diffusion.loss_weighting", diffusion.loss_weighting, losses.WEIGHTINGS)
  _require(diffusion.min_snr_gamma > 0, f"config.diffusion.min_snr_gamma={diffusion.min_snr_gamma} must be > 0.")
  _require(0.0 <= diffusion.p_uncond <= 1.0, f"config.diffusion.p_uncond={diffusion.p_uncond} must be in [0, 1].")
  _require(diffusion.p_uncond == 0 or num_classes > 0 or text,
           f"config.diffusion.p_uncond={diffusion.p_uncond} needs a class-conditional model "
           "(config.model.num_classes > 0) or a text model (config.text.encoder).")
  _require(not (diffusion.zero_terminal_snr and diffusion.prediction == "eps"),
           "config.diffusion.zero_terminal_snr=True needs config.diffusion.prediction='v' or 'x0': "
           "at SNR 0 the noise is the input and eps prediction cannot recover x0 (Lin et al. 2023, Sec. 3.2).")
  _require(not (diffusion.process == "flow" and diffusion.prediction == "eps"),
           "config.diffusion.process='flow' reaches SNR 0 at t = 1, where eps prediction cannot recover "
           "x0; use config.diffusion.prediction='velocity' (flow matching), 'v' or 'x0'.")
  if diffusion.process == "vp" and diffusion.schedule in ("linear", "scaled_linear"):
    _require(0 < diffusion.beta_start < diffusion.beta_end < 1,
             f"config.diffusion.beta_start={diffusion.beta_start} and beta_end={diffusion.beta_end} must "
             "satisfy 0 < beta_start < beta_end < 1.")
  _require(diffusion.schedule != "scaled_linear" or diffusion.num_timesteps > 0,
           "config.diffusion.schedule='scaled_linear' is a discrete schedule; it needs "
           f"config.diffusion.num_timesteps > 0, got {diffusion.num_timesteps}.")
  model_time = diffusion.get("model_time", "index")  # Configs saved before the key mean "index".
  _choice("diffusion.model_time", model_time, schedules.MODEL_TIMES)
  _require(model_time != "index_from_zero" or diffusion.num_timesteps > 0,
           "config.diffusion.model_time='index_from_zero' numbers discrete steps; it needs "
           f"config.diffusion.num_timesteps > 0, got {diffusion.num_timesteps}.")


# config.distill.method: None trains a diffusion model; each name distils config.distill.teacher, or for
# "consistency" without a teacher trains a consistency model (training/tasks.py, DISTILLATION_TASKS).
DISTILL_METHODS = ("progressive", "consistency")


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """config.distill and what its method needs (config.consistency for "consistency").

  The teacher's workdir itself is checked where it is read (training/teacher.py).
  """
  distill, cm = config.distill, config.consistency
  if distill.method is not None:
    _choice("distill.method", distill.method, DISTILL_METHODS)
    _require(config.model.name != "autoencoder", f"config.distill.method={distill.method!r} distils a "
             "diffusion model; config.model.name='autoencoder' trains an autoencoder.")
  if distill.teacher is not None:
    _require(distill.method is not None, f"config.distill.teacher={distill.teacher!r} is set but "
             f"config.distill.method is None; set it to one of {', '.join(DISTILL_METHODS)}.")
    _require(os.path.isdir(os.path.expanduser(distill.teacher)), f"config.distill.teacher="
             f"{distill.teacher!r} does not exist; give the workdir of a trained diffusion run.")
  consistent = distill.method == "consistency"
  _require(consistent == (config.diffusion.prediction == "consistency"),
           f"config.diffusion.prediction={config.diffusion.prediction!r} and config.distill.method="
           f"{distill.method!r}: a consistency model (prediction 'consistency') is trained by "
           "distill.method='consistency', and only it.")
  if distill.method == "progressive":
    _require(isinstance(distill.teacher, str) and distill.teacher != "",
             f"config.distill.teacher={distill.teacher!r} must be the workdir of a trained diffusion run.")
    n = distill.student_steps
    _require(isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0,
             f"config.distill.student_steps={n!r} must be a power of two (1, 2, 4, ...): each round of "
             "progressive distillation halves the steps.")
    num = config.diffusion.num_timesteps
    _require(num == 0 or 2 * n <= num, f"config.distill.student_steps={n}: the teacher's grid of {2 * n} "
             f"steps needs at most config.diffusion.num_timesteps={num} steps.")
    _choice("distill.weighting", distill.weighting, distillation.WEIGHTINGS)
    _require(config.diffusion.prediction != "eps",
             "config.diffusion.prediction='eps' cannot be a progressive student: its few large steps "
             "start where SNR is near 0, where x0 = (z - sigma eps) / alpha is lost (Salimans & Ho "
             "2022, Sec. 4). Use 'v' (theirs), 'x0', 'velocity' or 'edm'; the student starts from the "
             "teacher's weights, whatever those predict.")
  if not consistent:
    return
  _require(config.diffusion.process == "edm", f"config.distill.method='consistency' needs "
           f"config.diffusion.process='edm' (Karras's sigma), got {config.diffusion.process!r}.")
  _choice("consistency.loss", cm.loss, consistency.LOSSES)
  _choice("consistency.weighting", cm.weighting, consistency.WEIGHTINGS)
  _choice("consistency.noise_sampling", cm.noise_sampling, consistency.NOISE_SAMPLINGS)
  _require(cm.huber_c is None or cm.huber_c > 0, f"config.consistency.huber_c={cm.huber_c} must be > 0 "
           "or None (0.00054 sqrt(d)).")
  _require(cm.p_std > 0, f"config.consistency.p_std={cm.p_std} must be > 0.")
  _require(isinstance(cm.s0, int) and isinstance(cm.s1, int) and 1 <= cm.s0 <= cm.s1,
           f"config.consistency.s0={cm.s0!r} and s1={cm.s1!r} must be integers with 1 <= s0 <= s1.")
  _require(0 <= cm.target_decay < 1, f"config.consistency.target_decay={cm.target_decay} must be in [0, 1).")
  _require(cm.teacher_guidance_scale >= 0,
           f"config.consistency.teacher_guidance_scale={cm.teacher_guidance_scale} must be >= 0.")
  _require(cm.teacher_guidance_scale == 1.0 or config.model.num_classes > 0,
           f"config.consistency.teacher_guidance_scale={cm.teacher_guidance_scale} guides a "
           "class-conditional teacher; config.model.num_classes is 0.")


def validate_text(config: ml_collections.ConfigDict) -> None:
  """config.text against the model and the data; a converted encoder's width is checked on loading."""
  text, name = config.text, config.model.name
  if text.encoder is None:
    _require(name != "sd_unet", "config.model.name='sd_unet' reads cond['context']: set "
             "config.text.encoder (a converted text encoder, or 'new') and config.data.caption_feature.")
    _require(config.data.caption_feature is None, f"config.data.caption_feature="
             f"{config.data.caption_feature!r} needs a text encoder: set config.text.encoder.")
    return
  _require(name == "sd_unet", f"config.text.encoder={text.encoder!r} conditions through cross-attention: "
           f"config.model.name must be 'sd_unet', got {name!r}.")
  _require(config.data.caption_feature is not None, f"config.text.encoder={text.encoder!r} trains on "
           "captions: set config.data.caption_feature (e.g. 'caption' for config.data.name='two_digits').")
  _require(isinstance(text.trainable, bool), f"config.text.trainable={text.trainable!r} is not one of False, True.")
  if text.encoder != "new":
    return
  _require(text.trainable, "config.text.encoder='new' is trained from scratch: it needs "
           "config.text.trainable=True (a frozen random encoder would be saved nowhere).")
  _require(isinstance(text.max_length, int) and text.max_length >= 2, f"config.text.max_length="
           f"{text.max_length!r} must be an integer >= 2 for config.text.encoder='new' (<bos>, <eos>).")
  clip = text.clip
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
    _require(isinstance(clip[key], int) and clip[key] > 0,
             f"config.text.clip.{key}={clip[key]!r} must be a positive integer.")
  _require(clip.vocab_size > 4, f"config.text.clip.vocab_size={clip.vocab_size} must exceed the 4 special "
           "tokens (<pad>, <eos>, <bos>, <unk>).")
  _require(clip.hidden_size % clip.num_attention_heads == 0, f"config.text.clip.num_attention_heads="
           f"{clip.num_attention_heads} does not divide config.text.clip.hidden_size={clip.hidden_size}.")
  dim = config.model.sd_unet.cross_attention_dim
  _require(dim == clip.hidden_size, f"config.model.sd_unet.cross_attention_dim={dim} is not "
           f"config.text.clip.hidden_size={clip.hidden_size}: the UNet's cross-attention reads the text "
           "encoder's context.")


def validate_autoencoder_loss(loss: ml_collections.ConfigDict, *, image_size: int) -> None:
  """config.autoencoder_loss, including that the LPIPS weights exist when the term is on."""
  _choice("autoencoder_loss.reconstruction", loss.reconstruction, autoencoder_step.RECONSTRUCTIONS)
  for key in ("kl_weight", "disc_weight", "lpips_weight"):
    _require(loss[key] >= 0, f"config.autoencoder_loss.{key}={loss[key]} must be >= 0 (0 disables).")
  for key in ("sample_posterior", "adaptive_weight"):
    _require(isinstance(loss[key], bool), f"config.autoencoder_loss.{key}={loss[key]!r} is not one of "
             "False, True.")
  _require(isinstance(loss.disc_start, int) and loss.disc_start >= 0,
           f"config.autoencoder_loss.disc_start={loss.disc_start!r} must be an integer step >= 0.")
  _require(isinstance(loss.disc_ch, int) and loss.disc_ch > 0,
           f"config.autoencoder_loss.disc_ch={loss.disc_ch!r} must be a positive integer.")
  _require(isinstance(loss.disc_layers, int) and loss.disc_layers > 0,
           f"config.autoencoder_loss.disc_layers={loss.disc_layers!r} must be a positive integer.")
  if loss.disc_weight > 0:
    patches = image_size // 2**loss.disc_layers - 2
    _require(patches >= 1, f"config.autoencoder_loss.disc_layers={loss.disc_layers} halves "
             f"config.data.image_size={image_size} to nothing ({patches} patches); use fewer layers.")
  if loss.lpips_weight > 0:
    _require(image_size >= 16, f"config.autoencoder_loss.lpips_weight > 0 needs config.data.image_size "
             f">= 16 (VGG16 pools four times), got {image_size}.")
    path = os.path.expanduser(loss.lpips_path)
    _require(os.path.isfile(path), f"config.autoencoder_loss.lpips_path={loss.lpips_path!r} does not "
             "exist, and config.autoencoder_loss.lpips_weight > 0 needs the LPIPS-VGG weights: convert "
             "them with scripts/convert_lpips.py, or set lpips_weight=0.")


def validate_optim(optim: ml_collections.ConfigDict) -> None:
  _require(optim.learning_rate > 0, f"config.optim.learning_rate={optim.learning_rate} must be > 0.")
  _require(optim.warmup_steps >= 0, f"config.optim.warmup_steps={optim.warmup_steps} must be >= 0.")
  _require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1,
           f"config.optim.b1={optim.b1} and b2={optim.b2} must be in [0, 1).")
  _require(optim.eps > 0, f"config.optim.eps={optim.eps} must be > 0.")
  _require(optim.weight_decay >= 0, f"config.optim.weight_decay={optim.weight_decay} must be >= 0.")
  _require(optim.grad_clip >= 0, f"config.optim.grad_clip={optim.grad_clip} must be >= 0 (0 disables).")
  _require(0 <= optim.ema_decay <= 1, f"config.optim.ema_decay={optim.ema_decay} must be in [0, 1].")


def validate_mesh(mesh: ml_collections.ConfigDict, *, device_count: int) -> tuple[int, int]:
  """The (data, fsdp) sizes of config.mesh on device_count devices; ValueError naming the key."""
  data, fsdp = sharding.mesh_shape(mesh, device_count=device_count)
  min_size = mesh.fsdp_min_size
  _require(isinstance(min_size, int) and not isinstance(min_size, bool) and min_size >= 0,
           f"config.mesh.fsdp_min_size={min_size!r} must be an integer >= 0 (elements).")
  return data, fsdp


def validate_training(training: ml_collections.ConfigDict, *, device_count: int,
                      mesh_shape: tuple[int, int] | None = None) -> None:
  _require(training.batch_size > 0, f"config.training.batch_size={training.batch_size} must be positive.")
  data, fsdp = mesh_shape or (device_count, 1)
  _require(training.batch_size % (data * fsdp) == 0,
           f"config.training.batch_size={training.batch_size} is not divisible by the {data * fsdp} "
           f"devices (config.mesh.data x config.mesh.fsdp = {data} x {fsdp}): the global batch is split "
           "evenly over all devices (on CPU, config.cpu.devices sets how many).")
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
  _require(isinstance(sample.steps, int) and sample.steps > 0,
           f"config.sample.steps={sample.steps!r} must be a positive integer (None, the run's own, is "
           "for --mode=sample).")
  _require(sample.num > 0, f"config.sample.num={sample.num} must be positive.")
  _require(sample.batch_size > 0, f"config.sample.batch_size={sample.batch_size} must be positive.")
  _require(sample.eta >= 0, f"config.sample.eta={sample.eta} must be >= 0.")
  if sample.grid is not None:
    _choice("sample.grid", sample.grid, tuple(grids.GRIDS))
  if sample.get("grid_file") is not None:
    _require(sample.grid is None, f"config.sample.grid={sample.grid!r} and config.sample.grid_file="
             f"{sample.grid_file!r} both name a grid; set one of them.")
    grids.read_grid_file(sample.grid_file, steps=sample.steps)
  _choice("sample.ddpm_variance", sample.ddpm_variance, samplers.DDPM_VARIANCES)
  if sample.preset is not None:
    _choice("sample.preset", sample.preset, tuple(samplers.PRESETS))
  _require(sample.s_churn >= 0, f"config.sample.s_churn={sample.s_churn} must be >= 0.")
  _require(sample.s_tmin >= 0, f"config.sample.s_tmin={sample.s_tmin} must be >= 0.")
  _require(sample.s_tmax is None or sample.s_tmax > sample.s_tmin, f"config.sample.s_tmax="
           f"{sample.s_tmax} must be above config.sample.s_tmin={sample.s_tmin}, or None (no bound).")
  _require(sample.s_noise > 0, f"config.sample.s_noise={sample.s_noise} must be > 0.")
  _require(sample.guidance_scale >= 0, f"config.sample.guidance_scale={sample.guidance_scale} must be >= 0.")
  _require(0 <= sample.guidance_rescale <= 1,
           f"config.sample.guidance_rescale={sample.guidance_rescale} must be in [0, 1].")
  _require(sample.get("steps_offset", 0) >= 0,
           f"config.sample.steps_offset={sample.get('steps_offset')} must be >= 0.")
  _require(sample.get("prompt") is None or sample.get("prompts_file") is None,
           "config.sample.prompt and config.sample.prompts_file both give prompts; set one of them.")
  _require(sample.dynamic_threshold is None or 0 < sample.dynamic_threshold <= 1,
           f"config.sample.dynamic_threshold={sample.dynamic_threshold} must be a quantile in (0, 1] "
           "(e.g. 0.995) or None.")


def read_prompts(sample: ml_collections.ConfigDict) -> list[str] | None:
  """The prompts of config.sample.prompts_file (one a line, blank lines skipped) or config.sample.prompt."""
  if sample.get("prompts_file") is None:
    return None if sample.get("prompt") is None else [sample.prompt]
  path = os.path.expanduser(sample.prompts_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.sample.prompts_file={sample.prompts_file!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  _require(bool(prompts), f"config.sample.prompts_file={sample.prompts_file!r} holds no prompt.")
  return prompts


def validate_prompts(config: ml_collections.ConfigDict, *, context_width: int | None) -> None:
  """Prompts need a text encoder, whose width (None: no encoder) is the UNet's cross_attention_dim."""
  s = config.sample
  prompted = s.get("prompt") is not None or s.get("prompts_file") is not None
  key = "prompts_file" if s.get("prompts_file") is not None else "prompt"
  _require(not prompted or context_width is not None,
           f"config.sample.{key} is given, but the model has no text conditioning "
           f"(config.text.encoder is None, config.model.name={config.model.name!r}).")
  if context_width is None:
    return
  _require(config.model.name == "sd_unet", f"config.text.encoder={config.text.encoder!r} conditions a "
           f"cross-attention model (config.model.name='sd_unet'), not {config.model.name!r}.")
  dim = config.model.sd_unet.cross_attention_dim
  _require(context_width == dim, f"config.text.encoder={config.text.encoder!r} gives a context of width "
           f"{context_width}, but config.model.sd_unet.cross_attention_dim={dim}: they must be equal.")


def validate_latent(config: ml_collections.ConfigDict) -> None:
  """config.latent's own values; the autoencoder itself is checked where it is loaded (spaces.py)."""
  latent = config.latent
  if latent.autoencoder is not None:
    _require(isinstance(latent.autoencoder, str) and latent.autoencoder,
             f"config.latent.autoencoder={latent.autoencoder!r} must be a directory or None.")
  _require(latent.scale_factor is None or latent.scale_factor > 0,
           f"config.latent.scale_factor={latent.scale_factor} must be > 0, or None (estimated).")
  _require(isinstance(latent.scale_batches, int) and latent.scale_batches > 0,
           f"config.latent.scale_batches={latent.scale_batches!r} must be a positive integer.")
  _require(isinstance(config.diffusion.inpaint_training, bool),
           f"config.diffusion.inpaint_training={config.diffusion.inpaint_training!r} is not one of "
           "False, True.")
  cache = latent.get("cache")
  if cache is not None:
    _require(isinstance(cache, str) and cache, f"config.latent.cache={cache!r} must be a directory or "
             "None.")
    _require(latent.autoencoder is not None, f"config.latent.cache={cache!r} needs "
             "config.latent.autoencoder, the autoencoder whose posteriors it holds.")
    _require(not config.diffusion.inpaint_training, f"config.latent.cache={cache!r} holds no images, "
             "which config.diffusion.inpaint_training=True masks and encodes; pass "
             "--config.latent.cache=None.")


def validate_lora(lora: ml_collections.ConfigDict, *, model_name: str) -> None:
  """config.lora's own values; patterns are matched against the model's weights in training/lora.py."""
  _require(isinstance(lora.rank, int) and lora.rank >= 0,
           f"config.lora.rank={lora.rank!r} must be an integer >= 0 (0: no adapters).")
  _require(lora.alpha is None or lora.alpha > 0, f"config.lora.alpha={lora.alpha} must be > 0, or None (= rank).")
  _require(math.isfinite(lora.scale), f"config.lora.scale={lora.scale} must be a finite number.")
  if lora.load is not None:
    _require(str(lora.load).endswith(".safetensors"), f"config.lora.load={lora.load!r} must be a "
             ".safetensors file (pickled .bin/.ckpt/.pt files are not read: unpickling runs their code).")
    _require(os.path.isfile(os.path.expanduser(lora.load)),
             f"config.lora.load={lora.load!r} does not exist.")
  if not lora.rank:
    return
  _require(model_name != "autoencoder", "config.lora.rank > 0 trains adapters on a diffusion model; "
           "config.model.name='autoencoder' is not one.")
  _require(isinstance(lora.targets, (tuple, list)) and len(lora.targets) > 0
           and all(isinstance(t, str) for t in lora.targets),
           f"config.lora.targets={lora.targets!r} must be a non-empty tuple of regular expressions.")
  text_targets = lora.get("text_targets") or ()
  _require(isinstance(text_targets, (tuple, list)) and all(isinstance(t, str) for t in text_targets),
           f"config.lora.text_targets={text_targets!r} must be a tuple of regular expressions (() = none).")
  for key, patterns in (("targets", lora.targets), ("text_targets", text_targets)):
    for pattern in patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"config.lora.{key}: {pattern!r} is not a regular expression ({e}).") from e
  _require(lora.base is not None, f"config.lora.rank={lora.rank} trains adapters on a frozen base: set "
           "config.lora.base to a converted model directory or a trained workdir.")
  base = os.path.expanduser(lora.base)
  _require(os.path.isfile(os.path.join(base, "model.json")) or os.path.isfile(os.path.join(base, "config.json")),
           f"config.lora.base={lora.base!r} is neither a converted model (model.json and params/) nor a "
           "trained workdir (config.json and checkpoints/).")


def validate_autoencoder(config: ml_collections.ConfigDict, *, latent_channels: int, factor: int,
                         out_channels: int, data_channels: int | None = None,
                         model_channels: int | None = None, model_size: int | None = None) -> None:
  """The autoencoder of config.latent.autoencoder against the data and the diffusion model.

  model_channels, model_size: the latent channels and side a trained diffusion model was built for.
  """
  path, size = config.latent.autoencoder, config.data.image_size
  _require(size % factor == 0, f"config.data.image_size={size} is not divisible by {factor}, the "
           f"downsampling factor of config.latent.autoencoder={path!r}.")
  _require(data_channels is None or data_channels == out_channels,
           f"config.data.name={config.data.name!r} has {data_channels}-channel images but "
           f"config.latent.autoencoder={path!r} encodes {out_channels}-channel images.")
  _require(model_channels is None or model_channels == latent_channels,
           f"The diffusion model was built for {model_channels} latent channels but "
           f"config.latent.autoencoder={path!r} has {latent_channels}; use the autoencoder it was "
           "trained with.")
  _require(model_size is None or model_size * factor == size,
           f"The diffusion model was built for {model_size}x{model_size} latents of "
           f"config.data.image_size={size} but config.latent.autoencoder={path!r} downsamples "
           f"{factor}x; use an autoencoder of the run's factor.")
  if config.model.name == "unet":
    levels = len(config.model.unet.ch_mult) - 1
    _require((size // factor) % 2**levels == 0,
             f"The latents of config.data.image_size={size} are {size // factor}x{size // factor} "
             f"(config.latent.autoencoder={path!r} downsamples {factor}x), not divisible by "
             f"{2**levels}, the UNet's downsampling for config.model.unet.ch_mult="
             f"{tuple(config.model.unet.ch_mult)}.")


def read_inpaint_files(sample: ml_collections.ConfigDict, *,
                       data_shape: tuple[int, int, int]) -> tuple["np.ndarray", "np.ndarray"]:
  """(image in [-1, 1] [H, W, C], mask [H, W, 1], 1 = keep) of config.sample.image and config.sample.mask.

  The mask is white (255) where the image is kept and black (0) where it is filled; any other value,
  or a size other than the image's, is an error naming the file.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  _require((sample.image is None) == (sample.mask is None),
           "config.sample.image and config.sample.mask go together: give both PNGs, or neither.")

  def read(key):
    path = sample[key]
    if not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f"config.sample.{key}={path!r} does not exist.")
    try:
      with Image.open(os.path.expanduser(path)) as f:
        return np.asarray(f)
    except OSError as e:
      raise ValueError(f"config.sample.{key}={path!r} is not an image: {e}") from e

  image, mask = read("image"), read("mask")
  h, w, c = data_shape
  image = image[..., None] if image.ndim == 2 else image
  if image.shape[-1] == 4 and c != 4:
    image = image[..., :3]
  if image.shape[-1] == 3 and c == 1:
    image = image.mean(axis=-1, keepdims=True).round().astype(np.uint8)
  _require(image.shape == (h, w, c), f"config.sample.image={sample.image!r} is "
           f"{'x'.join(map(str, image.shape))} but the model's images are {h}x{w}x{c} "
           "(config.data.image_size, the data's channels).")
  mask = mask[..., 0] if mask.ndim == 3 else mask
  _require(mask.shape == (h, w), f"config.sample.mask={sample.mask!r} is "
           f"{'x'.join(map(str, mask.shape))} but config.sample.image is {h}x{w}.")
  values = sorted(set(np.unique(mask).tolist()))
  _require(set(values) <= {0, 255}, f"config.sample.mask={sample.mask!r} is not binary: it holds the "
           f"values {values[:8]}; use 0 (fill) and 255 (keep) only.")
  return (image.astype(np.float32) / 127.5 - 1.0), (mask == 255).astype(np.float32)[..., None]


def validate_learned_variance(config: ml_collections.ConfigDict) -> None:
  """Learned variances (config.model.dit.learn_sigma) live on the discrete VP bound, and only they

  give config.sample.ddpm_variance='learned'.
  """
  d = config.diffusion
  if models.learns_variance(config.model):
    _require(d.process == "vp" and d.num_timesteps > 0,
             f"config.model.dit.learn_sigma=True trains on the discrete DDPM bound: it needs "
             f"config.diffusion.process='vp' (got {d.process!r}) and config.diffusion.num_timesteps > 0 "
             f"(got {d.num_timesteps}).")
  else:
    _require(config.sample.ddpm_variance != "learned",
             "config.sample.ddpm_variance='learned' needs a model with learned variances "
             "(config.model.dit.learn_sigma=True).")


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, process_count: int,
                    latent_factor: int = 1) -> None:
  """Raises ValueError naming the first bad key of config; touches no data and compiles nothing.

  latent_factor: the downsampling of config.latent.autoencoder (1 in pixel space); the model is
  checked at the size it sees, config.data.image_size // latent_factor.
  """
  # Imported here: sampling imports this module, and needs no data readers.
  import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.validate_data_config(config.data, global_batch_size=config.training.batch_size,
                                      process_count=process_count)
  validate_latent(config)
  _require(config.data.image_size % latent_factor == 0,
           f"config.data.image_size={config.data.image_size} is not divisible by {latent_factor}, the "
           f"downsampling factor of config.latent.autoencoder={config.latent.autoencoder!r}.")
  validate_model(config.model, image_size=config.data.image_size // latent_factor)
  if config.model.name == "autoencoder":
    validate_autoencoder_loss(config.autoencoder_loss, image_size=config.data.image_size)
  else:
    validate_text(config)
    validate_diffusion(config.diffusion, num_classes=config.model.num_classes,
                       text=config.text.encoder is not None)
    validate_learned_variance(config)
  validate_distill(config)
  validate_optim(config.optim)
  validate_lora(config.lora, model_name=config.model.name)
  _require(not (config.lora.rank and config.text.encoder is not None and config.text.trainable),
           f"config.lora.rank={config.lora.rank} adapts a frozen base; config.text.trainable=True would "
           "train the whole text encoder beside it: set config.text.trainable=False (config.lora.text_targets "
           "puts adapters on the encoder instead).")
  _require(not (lora_lib.adapts_text_encoder(config.lora) and config.text.encoder is None),
           f"config.lora.text_targets={tuple(config.lora.text_targets)!r} adapts the text encoder, but "
           "config.text.encoder is None: name a converted encoder, or set config.lora.text_targets=().")
  mesh_shape = validate_mesh(config.mesh, device_count=device_count)
  validate_training(config.training, device_count=device_count, mesh_shape=mesh_shape)
  if config.training.sample_every:  # Settings of a disabled feature do not block a run.
    validate_sample(config.sample, device_count=device_count)
  xla_cpu.validate(config.cpu)


def validate_against_data(config: ml_collections.ConfigDict, *, num_classes: int) -> None:
  """Checks that need the dataset's metadata (its number of classes)."""
  _require(config.model.num_classes == 0 or config.model.num_classes == num_classes,
           f"config.model.num_classes={config.model.num_classes} but config.data.name="
           f"{config.data.name!r} has {num_classes} classes.")
