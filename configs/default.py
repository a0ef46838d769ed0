"""Every knob of the codebase, with its default. Dataset configs import this and override."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order, noise and dropout.

  config.data = data = ml_collections.ConfigDict()
  data.name = "cifar10"  # A tfds dataset name, or "digits" (sklearn's digits, offline).
  data.split = "train"  # tfds split to train on.
  data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir; None = tfds default.
  data.image_size = 32  # Side of the square training images, in pixels.
  data.resize = "center_crop"  # How images reach image_size: "center_crop" (crop then resize) or "resize".
  data.random_flip = True  # Random horizontal flip of training images.
  data.num_workers = 0  # grain worker processes per host; 0 reads in the main process.
  data.prefetch = 2  # Batches prefetched to the devices ahead of the train step.

  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # Backbone in models.MODELS: "unet" (DDPM/ADM) or "dit" (Peebles & Xie 2023); its knobs are in config.model.<name>.
  model.num_classes = 0  # Class-conditional if > 0; label num_classes is the "null" class.
  model.dtype = "float32"  # Compute dtype, "float32" or "bfloat16" (params, optimizer state, EMA and loss stay float32).
  model.attention = "xla"  # jax.nn.dot_product_attention implementation: None (jax picks), "xla" or "cudnn" (GPU, bfloat16).
  model.remat = False  # Rematerialise each residual or transformer block in the backward pass (less memory, ~1/3 more compute).

  model.unet = unet = ml_collections.ConfigDict()  # models/unet.py; the defaults are Ho et al. 2020's CIFAR-10 UNet.
  unet.ch = 128  # Base channel count.
  unet.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
  unet.num_res_blocks = 2  # Residual blocks per resolution level.
  unet.attn_resolutions = (16,)  # Resolutions (in pixels) with self-attention.
  unet.num_heads = 1  # Attention heads (DDPM uses one).
  unet.dropout = 0.1  # Dropout in residual blocks.
  unet.scale_shift = False  # ADM scale-shift (FiLM) conditioning; DDPM adds the embedding instead.
  unet.resamp_with_conv = True  # Convolutions in down/up sampling (DDPM).

  model.dit = dit = ml_collections.ConfigDict()  # models/dit.py; the defaults are DiT-S/2 (sizes: models.dit.SIZES).
  dit.patch_size = 2  # Side of the square patches that become tokens (2, 4 or 8 in the paper).
  dit.hidden_size = 384  # Token width (S 384, B 768, L 1024, XL 1152).
  dit.depth = 12  # Transformer blocks (S 12, B 12, L 24, XL 28).
  dit.num_heads = 6  # Attention heads (S 6, B 12, L 16, XL 16).
  dit.mlp_ratio = 4.0  # MLP width / hidden size.

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "linear"  # "linear" (DDPM betas) or "cosine" (Nichol & Dhariwal 2021).
  diffusion.num_timesteps = 1000  # Discrete DDPM steps T; 0 trains in continuous time.
  diffusion.beta_start = 1e-4  # Linear schedule: first beta.
  diffusion.beta_end = 0.02  # Linear schedule: last beta.
  diffusion.zero_terminal_snr = False  # Rescale so that SNR(t=1) = 0 (Lin et al. 2023); use with v.
  diffusion.prediction = "eps"  # What the network predicts: "eps", "x0" or "v".
  diffusion.loss_weighting = "simple"  # "simple" (DDPM) or "min_snr" (Hang et al. 2023).
  diffusion.min_snr_gamma = 5.0  # gamma of min-SNR weighting.
  diffusion.p_uncond = 0.0  # Probability of dropping the label (classifier-free guidance training).
  diffusion.model_time = "index"  # Network time input: "index" (1000 t, step i as i) or "index_from_zero" (step i as i - 1: DDPM's code, diffusers; converted checkpoints).

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4  # Peak learning rate.
  optim.warmup_steps = 5000  # Linear warm-up steps.
  optim.b1 = 0.9  # Adam beta1.
  optim.b2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # Decoupled weight decay (AdamW) if > 0.
  optim.grad_clip = 1.0  # Global gradient-norm clip; 0 disables.
  optim.ema_decay = 0.9999  # EMA decay of the parameters used for sampling.

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch size, over all devices and hosts.
  training.num_steps = 800_000  # Total training steps.
  training.log_every = 100  # Steps between metric writes.
  training.sample_every = 10_000  # Steps between sample grids (0 disables).
  training.checkpoint_every = 5_000  # Steps between checkpoints.
  training.keep_every = 50_000  # Checkpoints at multiples of this are kept for good (0 disables).
  training.max_to_keep = 3  # Most recent checkpoints kept.

  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = "ddim"  # Sampler name, looked up in diffusion.samplers.SAMPLERS.
  sample.steps = 100  # Number of sampler steps.
  sample.grid = ml_collections.config_dict.placeholder(str)  # Time grid (diffusion.grids.GRIDS); None = the sampler's default.
  sample.grid_file = ml_collections.config_dict.placeholder(str)  # JSON {"timesteps": [1, ..., 0]} of steps + 1 times (scripts/optimize_grid.py); replaces grid. None = off.
  sample.eta = 0.0  # DDIM eta (0 = deterministic, 1 = DDPM ancestral).
  sample.ddpm_variance = "small"  # DDPM posterior variance: "small" (beta-tilde) or "large" (beta).
  sample.s_churn = 0.0  # Euler / Heun stochastic churn (Karras et al. 2022, Alg. 2).
  sample.guidance_scale = 1.0  # Classifier-free guidance scale w (1 = conditional, 0 = unconditional).
  sample.guidance_rescale = 0.0  # Guidance rescale phi (Lin et al. 2023); 0 disables.
  sample.clip_x0 = True  # Clip predicted x0 to [-1, 1] at every step (DDPM's clip_denoised).
  sample.dynamic_threshold = ml_collections.config_dict.placeholder(float)  # Percentile p of x0 thresholding (Saharia et al. 2022); None disables.
  sample.checkpoint_step = ml_collections.config_dict.placeholder(int)  # --mode=sample: checkpoint to use; None = latest.
  sample.num = 64  # Images drawn (grid during training; total in --mode=sample).
  sample.seed = 0  # Seed of the starting noise.
  sample.batch_size = 64  # Global batch of one sampling call.

  config.eval = eval_ = ml_collections.ConfigDict()
  eval_.inception_path = "~/.cache/fid/pt_inception-2015-12-05.npz"  # FID Inception weights, converted by scripts/convert_inception.py.
  eval_.num_samples = 50_000  # Images sampled per checkpoint for FID and IS; papers use 50k.
  eval_.fid_stats_path = ml_collections.config_dict.placeholder(str)  # Reference mu/sigma .npz (--mode=fid_stats); None = workdir/eval/fid_stats_<data>.npz.
  eval_.batch_size = 256  # Global batch of sampling, the Inception network and NLL.
  eval_.nll = False  # Also report NLL in bits/dim: PF-ODE, and the variational bound for discrete-time models.
  eval_.nll_num = 1000  # Images of config.data.split whose NLL is averaged.
  eval_.nll_hutchinson = True  # Hutchinson-Skilling trace estimate in the PF-ODE; False = exact trace (D JVPs).
  eval_.step = ml_collections.config_dict.placeholder(int)  # Checkpoint to evaluate; None = every one not yet evaluated.

  # JAX's CPU backend only (training/xla_cpu.py); XLA_FLAGS or JAX_NUM_CPU_DEVICES set by the user win.
  config.cpu = cpu = ml_collections.ConfigDict()
  cpu.devices = 1  # CPU devices per host (data parallel over the cores); 0 = one per core, at most 8, as the batch sizes allow.
  cpu.ynn_convolutions = False  # Convolutions through YNNPACK (XLA:CPU's default) instead of Eigen, which trains faster.

  return config
