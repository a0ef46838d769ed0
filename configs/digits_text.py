"""Offline text-to-image toy: two digits side by side, drawn from captions like "a 3 left of a 7".

A tiny SD UNet (cross-attention to the text context) in pixel space on 16x16 canvases of two 8x8
sklearn digits (input_pipeline/sources.py: TwoDigitsSource), with a small CLIP text transformer
trained from scratch and a word-level tokenizer of the captions' words. Which digit goes left and
which right is said only by word order, so a class embedding of the digits cannot do it; the prompt's
words reach the image through cross-attention. bench/digits_text.py checks it with a digit classifier.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "two_digits"
  config.data.image_size = 16
  config.data.random_flip = False  # A flip would swap left and right (and mirror the digits).
  config.data.caption_feature = "caption"
  config.data.holdout_split = "test"  # Training sample grids are drawn for its first captions.

  config.model.name = "sd_unet"
  sd = config.model.sd_unet
  sd.block_out_channels = (32, 64)  # 16x16, then 8x8 with cross-attention (and the middle block).
  sd.layers_per_block = 1
  sd.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  sd.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  sd.attention_head_dim = (2, 4)  # Heads per level: 16 channels each.
  sd.cross_attention_dim = 64  # = config.text.clip.hidden_size.
  sd.in_channels = 1  # Grey pixels: this toy diffuses in pixel space.
  sd.out_channels = 1
  sd.norm_num_groups = 8

  config.text.encoder = "new"
  config.text.trainable = True
  config.text.max_length = 8  # <bos> a 3 left of a 7 <eos>.
  config.text.clip.vocab_size = 32  # 13 words and 4 special tokens.
  config.text.clip.hidden_size = 64
  config.text.clip.num_hidden_layers = 2
  config.text.clip.num_attention_heads = 4
  config.text.clip.intermediate_size = 128

  config.diffusion.schedule = "cosine"
  config.diffusion.prediction = "v"  # As configs/digits.py: well posed where alpha(t) nears 0.
  config.diffusion.p_uncond = 0.1  # Captions dropped to the empty prompt: classifier-free guidance.

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995

  config.training.batch_size = 32
  config.training.num_steps = 1500  # About 8.5 minutes on two CPU cores from a cold compilation cache.
  config.training.log_every = 100
  config.training.sample_every = 0  # bench/digits_text.py draws and checks samples.
  config.training.checkpoint_every = 500
  config.training.keep_every = 0

  config.sample.sampler = "ddim"
  config.sample.steps = 50
  config.sample.num = 100
  config.sample.batch_size = 100
  config.sample.guidance_scale = 2.0
  return config
