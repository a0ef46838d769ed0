"""Offline demo, stage 1 of latent diffusion: a factor-4 KL autoencoder of digits, 32x32x1 -> 8x8x4.

sklearn's digits upsampled to 32x32; the last 200 images are held out (PSNR and reconstruction grids).
L1 + 1e-6 KL as Stable Diffusion; no discriminator or LPIPS (no weights offline, and on digits the
pixel loss alone reaches a high PSNR). A few minutes on two CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 32
  config.data.random_flip = False  # Flipped digits are not digits.
  config.data.split = "train[:1597]"
  config.data.holdout_split = "train[1597:]"

  config.model.name = "autoencoder"
  ae = config.model.autoencoder
  ae.ch = 16
  ae.ch_mult = (1, 2, 2)  # Factor 4: 32x32 -> 8x8.
  ae.num_res_blocks = 1
  ae.latent_channels = 4
  ae.groups = 8
  ae.mid_attention = True

  config.autoencoder_loss.reconstruction = "l1"
  config.autoencoder_loss.kl_weight = 1e-6

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.grad_clip = 0.0  # The loss is summed over pixels (as SD's); Adam is indifferent to its scale.
  config.optim.ema_decay = 0.99

  config.training.batch_size = 32
  config.training.num_steps = 600
  config.training.log_every = 100
  config.training.sample_every = 200
  config.training.checkpoint_every = 200
  config.training.keep_every = 0

  config.sample.num = 32  # Held-out images reconstructed for PSNR and grids.
  return config
