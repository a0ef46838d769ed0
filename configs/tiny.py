"""A tiny config for tests: a few thousand parameters, 8x8 images, every code path of the real ones."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.random_flip = True
  config.model.unet.ch = 8
  config.model.unet.ch_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attn_resolutions = (4,)
  config.model.unet.dropout = 0.1
  config.optim.warmup_steps = 2
  config.optim.ema_decay = 0.9
  config.training.batch_size = 16
  config.training.num_steps = 4
  config.training.log_every = 2
  config.training.sample_every = 0
  config.training.checkpoint_every = 2
  config.training.keep_every = 0
  config.sample.steps = 4
  config.sample.num = 8
  config.sample.batch_size = 8
  return config
