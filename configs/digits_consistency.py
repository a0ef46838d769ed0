"""Consistency training (iCT, Song & Dhariwal 2023) on the digits demo's data and UNet; no teacher.

Distillation (CM, Song et al. 2023) from the digits demo's run instead:
  --config.distill.teacher=runs/digits --config.consistency.s0=17 --config.consistency.s1=17
(N = 18 Karras levels, as CM's CIFAR-10 distillation). Sampled in 1 or a few steps by the
"consistency" sampler.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.distill.method = "consistency"
  config.diffusion.process = "edm"  # Karras's sigma from sigma_min 0.002 to sigma_max 80.
  config.diffusion.num_timesteps = 0
  config.diffusion.prediction = "consistency"
  config.diffusion.model_time = "c_noise"
  config.diffusion.time_sampling = "uniform"  # Unused: consistency.noise_sampling draws the levels.
  config.diffusion.p_uncond = 0.0

  # iCT's recipe, with the curriculum shortened to the run: N doubles from 11 to 161 levels every
  # 2000 / 5 = 400 steps.
  config.consistency.s0 = 10
  config.consistency.s1 = 160

  config.training.num_steps = 2000
  config.training.sample_every = 1000
  config.training.checkpoint_every = 500

  config.sample.sampler = "consistency"
  config.sample.steps = 2
  config.sample.guidance_scale = 1.0
  return config
