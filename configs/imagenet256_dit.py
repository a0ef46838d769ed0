"""ImageNet 256x256, class-conditional DiT-XL/2 (Peebles & Xie 2023) in the latent space of Stable
Diffusion's autoencoder: 32x32x4 latents in 2x2 patches, 256 tokens, 675M parameters.

The paper's recipe: AdamW at a constant 1e-4, no weight decay, no warm-up, no gradient clipping, batch
256, EMA 0.9999, class dropout 0.1 for classifier-free guidance, the linear DDPM schedule (T = 1000,
eps prediction) with learned variances (Nichol & Dhariwal 2021's hybrid loss), horizontal flips;
samples with 250 DDPM steps at the learned variance and guidance scale 1.5 (its FID 2.27 row).

tfds's imagenet2012 needs the ImageNet archives downloaded by hand into its manual_dir first. Convert
the autoencoder once (scripts/convert_diffusers_vae.py on stabilityai/sd-vae-ft-ema's folder, into
~/models/sd-vae-ft-ema or wherever --config.latent.autoencoder says), then:
  python main.py --config=configs/imagenet256_dit.py --workdir=runs/imagenet256_dit \
    --config.latent.autoencoder=~/models/sd-vae-ft-ema
On a pod, shard parameters, EMA and Adam state along fsdp (README, "Large models and many devices"):
  --config.mesh.fsdp=8
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "imagenet2012"
  config.data.image_size = 256
  config.data.resize = "center_crop"  # ADM's center crop, as DiT's data loader.
  config.data.random_flip = True
  config.data.num_workers = 8  # JPEG decoding of 256 images a step needs worker processes.

  config.latent.autoencoder = "~/models/sd-vae-ft-ema"  # sd-vae-ft-ema converted; a missing one is an error, never pixels.
  config.latent.scale_factor = 0.18215  # The SD autoencoder's scaling_factor, as DiT uses it.

  config.model.name = "dit"
  config.model.num_classes = 1000
  config.model.dtype = "bfloat16"  # bf16 compute; parameters, Adam state and EMA stay float32.
  # On GPUs pass --config.model.attention=cudnn: with XLA's attention the whole batch of 256 on one
  # H200 asked for 89 GiB more than it has (bench/README.md); cuDNN's fused attention ran at 412 ms/step.
  config.model.dit.update(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                          learn_sigma=True)

  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.prediction = "eps"
  config.diffusion.p_uncond = 0.1

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  config.optim.grad_clip = 0.0
  config.optim.ema_decay = 0.9999

  config.training.batch_size = 256
  config.training.num_steps = 400_000  # The paper's comparisons; its best model trained 7M steps.
  config.training.log_every = 100
  config.training.sample_every = 20_000
  config.training.checkpoint_every = 10_000
  config.training.keep_every = 100_000

  config.sample.sampler = "ddpm"
  config.sample.ddpm_variance = "learned"
  config.sample.steps = 250
  config.sample.guidance_scale = 1.5
  config.sample.clip_x0 = False  # Latents are not bounded to [-1, 1].
  config.sample.num = 64
  config.sample.batch_size = 64

  config.eval.num_samples = 50_000
  config.eval.batch_size = 256
  return config
