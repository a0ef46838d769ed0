"""CelebA 64x64 in the 8x8x4 latent space of Stable Diffusion's autoencoder (factor 8, scale 0.18215).

Convert the autoencoder once (scripts/convert_diffusers_vae.py) and pass its directory:
  python main.py --config=configs/celeba64_latent.py --workdir=runs/celeba64_latent \
    --config.latent.autoencoder=~/models/sd15_vae
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "celeb_a"
  config.data.image_size = 64
  config.data.random_flip = True
  config.latent.autoencoder = "~/models/sd15_vae"  # An SD 1.x autoencoder, converted; a missing one is an error.
  config.latent.scale_factor = 0.18215  # SD 1.x's scaling_factor (its vae/config.json).

  config.model.unet.ch = 128
  config.model.unet.ch_mult = (1, 2, 2)
  config.model.unet.num_res_blocks = 2
  config.model.unet.attn_resolutions = (4, 2)  # Latent cells: 8x8 latents at levels 8, 4, 2.
  config.model.unet.dropout = 0.1

  config.diffusion.schedule = "linear"
  config.diffusion.beta_start = 0.00085  # LDM's schedule for latents (linear in sqrt(beta)
  config.diffusion.beta_end = 0.012  # in SD; linear in beta here).
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1000
  config.training.batch_size = 128
  config.training.num_steps = 200_000
  config.sample.clip_x0 = False
  return config
