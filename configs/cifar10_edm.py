"""Karras et al. 2022 (EDM) on CIFAR-10: their preconditioning, noise distribution and loss, and their
training hyperparameters (Table 7, App. F.2; the EDM code's defaults) for the DDPM++ UNet, as closely as
the DDPM UNet here allows.

The UNet has the DDPM++ widths (128 x (2, 2, 2), 4 residual blocks per level, attention at 16x16,
dropout 0.13): 53.6M parameters (DDPM++: 55.7M); DDPM++'s other changes (skip-connection scaling, its
resampling filters) are not in models/unet.py.
Adam at 1e-3 (betas 0.9, 0.999, eps 1e-8), the learning rate ramped up over 10 Mimg = 19,531 steps of
512, no gradient clipping, 200 Mimg = 390,625 steps. EMA half-life 0.5 Mimg: 500,000 / 512 = 976.6 steps,
so decay = 0.5^(512 / 500,000) = 0.999290 per step (EDM also ramps the half-life up early in training;
here the decay is constant). EDM's augmentation pipeline (p = 0.12, with x-flips) is not implemented, so
augmentation is off, flips included. Sampling: the "edm" preset, deterministic Heun on the rho = 7
grid, 18 steps = 35 model calls (the paper's unconditional FID 1.97, Table 2, with their network and
augmentation).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = False

  unet = config.model.unet
  unet.ch = 128
  unet.ch_mult = (2, 2, 2)
  unet.num_res_blocks = 4
  unet.attn_resolutions = (16,)
  unet.dropout = 0.13

  d = config.diffusion
  d.process = "edm"
  d.num_timesteps = 0
  d.sigma_min = 0.002
  d.sigma_max = 80.0
  d.prediction = "edm"
  d.sigma_data = 0.5
  d.model_time = "c_noise"
  d.time_sampling = "lognormal_sigma"
  d.p_mean = -1.2
  d.p_std = 1.2
  d.loss_weighting = "simple"  # Unit weight on F is EDM's lambda(sigma) = 1 / c_out(sigma)^2 on D.

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 19_531
  config.optim.grad_clip = 0.0
  config.optim.ema_decay = 0.5 ** (512 / 500_000)

  config.training.batch_size = 512
  config.training.num_steps = 390_625

  config.sample.preset = "edm"
  config.sample.steps = 18
  return config
