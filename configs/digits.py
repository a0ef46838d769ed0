"""Offline demo: sklearn's 8x8 digits upsampled to 16x16, a small UNet, a few minutes on two CPU cores."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.random_flip = False  # Flipped digits are not digits.

  config.model.unet.ch = 32
  config.model.unet.ch_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attn_resolutions = (8,)
  config.model.unet.dropout = 0.0
  config.model.unet.scale_shift = True
  config.model.num_classes = 10  # Class-conditional: each column of a sample grid is one digit.

  # Flow matching (x_t = (1 - t) x0 + t eps, velocity eps - x0, logit-normal t; Esser et al. 2024): at
  # the same 1000 steps it reaches the digits FD floor, where VP cosine v and EDM do not (README, "The
  # demo's process at the same budget").
  config.diffusion.process = "flow"
  config.diffusion.num_timesteps = 0
  config.diffusion.prediction = "velocity"
  config.diffusion.time_sampling = "logit_normal"
  config.diffusion.p_uncond = 0.1  # Also learn the unconditional model, for classifier-free guidance.

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995

  config.training.batch_size = 64
  config.training.num_steps = 1000
  config.training.log_every = 50
  config.training.sample_every = 500
  config.training.checkpoint_every = 250
  config.training.keep_every = 0

  config.sample.sampler = "ddim"
  config.sample.steps = 50
  config.sample.num = 100
  config.sample.batch_size = 100
  return config
