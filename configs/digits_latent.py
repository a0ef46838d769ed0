"""Offline latent demo: digits at 32x32 in the 8x8x4 latent space of a factor-4 autoencoder.

The autoencoder is a directory given on the command line (--config.latent.autoencoder=DIR), e.g. one
converted with scripts/convert_diffusers_vae.py or trained here; its scale factor is estimated from the
first batches' latents and saved with the run.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.image_size = 32  # 32x32 pixels -> 8x8x4 latents with a factor-4 autoencoder.
  config.latent.autoencoder = "runs/digits_vae"  # What `main.py --config=configs/digits_vae.py --workdir=runs/digits_vae` trains.

  config.model.unet.ch = 32
  config.model.unet.ch_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attn_resolutions = (4,)  # In latent cells: the 4x4 level of the 8x8 latents.
  # The process its figures were measured with (README, "Latent diffusion"): VP, cosine, v.
  config.diffusion.process = "vp"
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction = "v"
  config.diffusion.time_sampling = "uniform"
  config.sample.clip_x0 = False  # Latents are not in [-1, 1] (not clipped in latent space anyway).
  return config
