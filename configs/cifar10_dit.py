"""CIFAR-10 in pixel space with a DiT-B/2 backbone (Peebles & Xie 2023) instead of the UNet.

DiT's recipe: AdamW at a constant 1e-4, no weight decay, no warm-up and no gradient clipping, EMA
0.9999; 32x32 pixels in 2x2 patches make 256 tokens, as a 256px image in SD latents does for DiT-XL/2.
The diffusion process (linear betas, T = 1000, eps prediction) is Ho et al.'s, as in cifar10.py.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.name = "dit"
  config.model.dit.update(patch_size=2, hidden_size=768, depth=12, num_heads=12)  # DiT-B/2, 130M.
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.9999
  config.training.batch_size = 128
  return config
