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
  data.caption_feature = ml_collections.config_dict.placeholder(str)  # Text models: the dataset's caption feature (a tfds Text feature; "caption" for two_digits), tokenised into batch["tokens"]; None = no captions.
  data.holdout_split = ml_collections.config_dict.placeholder(str)  # Autoencoder runs: split whose first sample.num images are reconstructed (PSNR, grids); None = config.data.split.

  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # Network in models.MODELS: "unet" (DDPM/ADM), "dit" (Peebles & Xie 2023) or "autoencoder" (trains the KL autoencoder); its knobs are in config.model.<name>.
  model.num_classes = 0  # Class-conditional if > 0; label num_classes is the "null" class.
  model.dtype = "float32"  # Compute dtype, "float32" or "bfloat16" (params, optimizer state, EMA and loss stay float32).
  model.attention = "xla"  # jax.nn.dot_product_attention implementation: None (jax picks), "xla" or "cudnn" (GPU, bfloat16).
  model.pretrained = ml_collections.config_dict.placeholder(str)  # Converted UNet directory (scripts/convert_stable_diffusion.py writes WORKDIR/unet): training starts from its weights (params and EMA) at step 0; --mode=sample uses them when the workdir has no checkpoint. None = random init.
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
  dit.learn_sigma = False  # Also learn the reverse variances (Nichol & Dhariwal 2021; DiT's setting): hybrid loss, discrete "vp" only.

  model.autoencoder = autoencoder = ml_collections.ConfigDict()  # models/autoencoder.py; the defaults are Stable Diffusion's factor-8 autoencoder.
  autoencoder.ch = 128  # Base channel count.
  autoencoder.ch_mult = (1, 2, 4, 4)  # Channel multiplier per level; downsampling factor 2^(len - 1).
  autoencoder.num_res_blocks = 2  # ResNet blocks per encoder level (the decoder has one more).
  autoencoder.latent_channels = 4  # Channels of the latents.
  autoencoder.groups = 32  # GroupNorm groups; they must divide ch * every multiplier.
  autoencoder.mid_attention = True  # Self-attention in the middle of encoder and decoder.
  autoencoder.use_quant_conv = True  # 1x1 convolutions between moments and latents (as SD).

  model.sd_unet = sd_unet = ml_collections.ConfigDict()  # models/sd_unet.py, Stable Diffusion's UNet; the defaults are SD 1.5's.
  sd_unet.block_out_channels = (320, 640, 1280, 1280)  # Channels of each resolution level (diffusers' block_out_channels).
  sd_unet.layers_per_block = 2  # ResNet (+ transformer) layers per down block; up blocks have one more.
  sd_unet.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # Per level: "CrossAttnDownBlock2D" (with cross-attention) or "DownBlock2D".
  sd_unet.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # Per level, lowest resolution first: "UpBlock2D" or "CrossAttnUpBlock2D".
  sd_unet.attention_head_dim = (8, 8, 8, 8)  # Attention HEADS per level, despite diffusers' name (SD 1.x 8; SD 2.x (5, 10, 20, 20): heads of 64 channels).
  sd_unet.cross_attention_dim = 768  # Width of the text context (SD 1.x 768, SD 2.x 1024).
  sd_unet.use_linear_projection = False  # Transformer proj_in/out as Dense layers (SD 2.x) instead of 1x1 convolutions (SD 1.x).
  sd_unet.upcast_attention = False  # Attention scores in float32 under a 16-bit dtype (SD 2.1).
  sd_unet.in_channels = 4  # Latent channels in, with cond["concat"] if given (SD-inpainting: 9).
  sd_unet.out_channels = 4  # Channels predicted.
  sd_unet.norm_num_groups = 32  # GroupNorm groups; they must divide every block_out_channels entry.
  sd_unet.dropout = 0.0  # Dropout in the ResNet blocks.

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.process = "vp"  # Forward process: "vp" (config.diffusion.schedule), "edm" (Karras et al. 2022, sigma_min..sigma_max) or "flow" (x_t = (1 - t) x0 + t eps); edm and flow need num_timesteps=0.
  diffusion.schedule = "linear"  # "vp" process: "linear" (DDPM betas), "scaled_linear" (Stable Diffusion: sqrt(beta) linear; discrete only) or "cosine" (Nichol & Dhariwal 2021).
  diffusion.num_timesteps = 1000  # Discrete DDPM steps T; 0 trains in continuous time.
  diffusion.beta_start = 1e-4  # Linear and scaled_linear schedules: first beta (SD: 0.00085).
  diffusion.beta_end = 0.02  # Linear and scaled_linear schedules: last beta (SD: 0.012).
  diffusion.zero_terminal_snr = False  # Rescale so that SNR(t=1) = 0 (Lin et al. 2023); use with v.
  diffusion.sigma_min = 0.002  # "edm" process: Karras's sigma = sigma_t / alpha_t at t_min (> 0, < sigma_max).
  diffusion.sigma_max = 80.0  # "edm" process: sigma at t = 1.
  diffusion.prediction = "eps"  # What the network predicts: "eps", "x0", "v", "edm" (Karras et al. 2022's preconditioned F) or "velocity" (flow matching's eps - x0).
  diffusion.sigma_data = 0.5  # Standard deviation of the data, for the "edm" prediction's preconditioning (> 0).
  diffusion.loss_weighting = "simple"  # "simple" (DDPM) or "min_snr" (Hang et al. 2023).
  diffusion.min_snr_gamma = 5.0  # gamma of min-SNR weighting.
  diffusion.time_sampling = "uniform"  # Training times: "uniform", "logit_normal" (Esser et al. 2024) or "lognormal_sigma" (EDM); the last two need num_timesteps=0.
  diffusion.p_mean = -1.2  # "lognormal_sigma": mean of ln(sigma) (EDM's P_mean).
  diffusion.p_std = 1.2  # "lognormal_sigma": standard deviation of ln(sigma) (EDM's P_std, > 0).
  diffusion.logit_mean = 0.0  # "logit_normal": mean m of logit(t).
  diffusion.logit_std = 1.0  # "logit_normal": standard deviation s of logit(t) (> 0).
  diffusion.p_uncond = 0.0  # Probability of dropping the label (classifier-free guidance training).
  diffusion.inpaint_training = False  # Train an inpainting model (SD-inpainting): random masks; the input adds the mask and the masked image's latents (or pixels), C + 1 channels.
  diffusion.model_time = "index"  # Network time input: "index" (1000 t, step i as i), "index_from_zero" (step i as i - 1: DDPM's code, diffusers; converted checkpoints) or "c_noise" (ln(sigma) / 4, EDM).

  # Distillation of a trained diffusion run into a few-step student.
  config.distill = distill = ml_collections.ConfigDict()
  distill.teacher = ml_collections.config_dict.placeholder(str)  # Workdir of the trained diffusion run to distil (training/teacher.py); None = no teacher.
  distill.method = ml_collections.config_dict.placeholder(str)  # "consistency": consistency distillation from distill.teacher, or consistency training if it is None; None = diffusion training.

  # distill.method="consistency" (Song et al. 2023; iCT: Song & Dhariwal 2023); needs diffusion.process="edm", diffusion.prediction="consistency".
  config.consistency = cm = ml_collections.ConfigDict()
  cm.loss = "pseudo_huber"  # Distance d: "pseudo_huber" (iCT) or "l2" (squared, CM).
  cm.huber_c = ml_collections.config_dict.placeholder(float)  # Pseudo-Huber c (> 0); None = 0.00054 sqrt(d), d the data's dimension (iCT).
  cm.weighting = "inverse_gap"  # lambda(sigma_n): "inverse_gap" 1 / (sigma_{n+1} - sigma_n) (iCT) or "uniform" 1 (CM).
  cm.noise_sampling = "lognormal"  # Level n of a pair: "lognormal" (iCT; p_mean, p_std) or "uniform" (CM).
  cm.p_mean = -1.1  # "lognormal": mean of ln(sigma) (iCT).
  cm.p_std = 2.0  # "lognormal": standard deviation of ln(sigma) (iCT, > 0).
  cm.s0 = 10  # Curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 Karras levels (iCT, Eq. 10): initial s0 (>= 1).
  cm.s1 = 1280  # Curriculum's final s1 (>= s0); s0 = s1 = N - 1 fixes N (CM's distillation: 17).
  cm.target_decay = 0.0  # mu, EMA decay of the target network in [0, 1); 0 = the online network under stop-gradient (iCT), CM's CD 0.95.
  cm.teacher_guidance_scale = 1.0  # Classifier-free guidance scale of the teacher's Heun step (distillation; 1 = unguided; LCM's w).

  # config.model.name="autoencoder" only: the loss of Rombach et al. 2022 (taming's LPIPSWithDiscriminator).
  config.autoencoder_loss = ae_loss = ml_collections.ConfigDict()
  ae_loss.reconstruction = "l1"  # Pixel loss, summed over pixels, averaged over images: "l1" or "l2".
  ae_loss.kl_weight = 1e-6  # Weight of KL(q(z|x) || N(0, I)), summed over latents (SD: 1e-6).
  ae_loss.sample_posterior = True  # Decode a posterior sample (SD) rather than its mean when training.
  ae_loss.disc_weight = 0.0  # PatchGAN hinge-loss weight; 0 = no discriminator (none in the state).
  ae_loss.disc_start = 0  # Step from which the discriminator trains and its loss reaches the generator.
  ae_loss.disc_ch = 64  # Channels of the discriminator's first convolution.
  ae_loss.disc_layers = 3  # Stride-2 convolutions of the discriminator (taming's n_layers).
  ae_loss.adaptive_weight = True  # Scale the GAN loss by ||grad L_rec|| / ||grad L_GAN|| at the decoder's last layer (Esser et al. 2021, Eq. 7).
  ae_loss.lpips_weight = 0.0  # Weight of the LPIPS perceptual distance in the reconstruction loss; 0 disables.
  ae_loss.lpips_path = "~/.cache/lpips/vgg16_lpips.npz"  # LPIPS-VGG weights converted by scripts/convert_lpips.py.

  # Latent diffusion (Rombach et al. 2022): the diffusion model runs on a frozen autoencoder's latents.
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder = ml_collections.config_dict.placeholder(str)  # Converted autoencoder directory (scripts/convert_diffusers_vae.py); None = pixel space.
  latent.scale_factor = ml_collections.config_dict.placeholder(float)  # Latents are multiplied by it (0.18215 for SD 1.x); None = 1/std of the first training latents, saved with the run.
  latent.scale_batches = 4  # Training batches whose latents estimate the scale factor when it is None.
  latent.cache = ml_collections.config_dict.placeholder(str)  # Directory of config.data.split's posteriors written by --mode=encode, read instead of encoding each batch; None = encode each batch.

  # Text conditioning (training/text.py): cond["context"] of a cross-attention model (config.model.name="sd_unet").
  config.text = text = ml_collections.ConfigDict()
  text.encoder = ml_collections.config_dict.placeholder(str)  # Converted CLIP text encoder directory (scripts/convert_clip.py), "new" (a config.text.clip transformer trained from scratch with a word-level tokenizer), or None = no text conditioning.
  text.tokenizer = ml_collections.config_dict.placeholder(str)  # Tokenizer folder (vocab.json + merges.txt, or tokenizer.json); None = the encoder's tokenizer/ subfolder, or for "new" workdir/tokenizer (built from the captions at the first start).
  text.max_length = ml_collections.config_dict.placeholder(int)  # Tokens per prompt; None = the tokenizer's model_max_length (77 for CLIP).
  text.clip_skip = ml_collections.config_dict.placeholder(int)  # Condition on layer L - clip_skip of L (diffusers' clip_skip); None = the last layer.
  text.trainable = False  # Train the text encoder with the model (its params and EMA in the train state); False = frozen (needs a converted encoder). "new" needs True.
  text.clip = clip = ml_collections.ConfigDict()  # config.text.encoder="new": the CLIPTextTransformer (models/clip.py) built and trained here.
  clip.vocab_size = 1000  # Words kept in the word-level vocabulary (most frequent in the captions), special tokens included.
  clip.hidden_size = 64  # Width of the context; config.model.sd_unet.cross_attention_dim must equal it.
  clip.num_hidden_layers = 2  # Transformer layers.
  clip.num_attention_heads = 4  # Attention heads; they must divide hidden_size.
  clip.intermediate_size = 256  # Width of the MLPs.

  # Distillation of a trained diffusion run (the teacher) into a student that samples in fewer steps.
  config.distill = distill = ml_collections.ConfigDict()
  distill.method = ml_collections.config_dict.placeholder(str)  # None (train a diffusion model) or "progressive" (Salimans & Ho 2022: one run per round, training/progressive.py).
  distill.teacher = ml_collections.config_dict.placeholder(str)  # Workdir of the teacher run; the student starts from its latest EMA params and must have its config.model, diffusion, latent (prediction may differ).
  distill.student_steps = ml_collections.config_dict.placeholder(int)  # "progressive": DDIM steps N of the student, a power of two; it learns two teacher steps per step (a progressive teacher must have 2N).
  distill.weighting = "truncated_snr"  # "progressive": weight of the x-space error, "truncated_snr" max(SNR, 1) or "snr_plus_one" 1 + SNR (Salimans & Ho 2022, Sec. 4).
  # Low-rank adapters (training/lora.py, Hu et al. 2021): W + (alpha / rank) A B on chosen kernels.
  config.lora = lora = ml_collections.ConfigDict()
  lora.rank = 0  # > 0: train only rank-r adapters on a frozen base (config.lora.base); 0 trains the whole model.
  lora.alpha = ml_collections.config_dict.placeholder(float)  # Adapter scale alpha / rank; None = rank (scale 1, as diffusers' LoRA scripts).
  lora.targets = (r"attn[12]/(to_q|to_k|to_v|to_out_0)$",)  # Regexes (re.search) over kernel paths 'a/b/c' that get adapters; default: the SD UNet's attention projections.
  lora.text_targets = ()  # Regexes over the frozen text encoder's kernel paths that get adapters too, e.g. (r"self_attn/(q_proj|k_proj|v_proj|out_proj)$",) (training/lora.py TEXT_TARGETS); () = the UNet alone.
  lora.base = ml_collections.config_dict.placeholder(str)  # rank > 0: the frozen base, a converted model directory (scripts/convert_diffusers_unet.py) or a trained workdir (its EMA params).
  lora.load = ml_collections.config_dict.placeholder(str)  # --mode=sample: a LoRA .safetensors (diffusers/PEFT or kohya) merged into the weights before sampling; None = none.
  lora.scale = 1.0  # Multiplies the loaded file's adapters (its own alpha / rank included); 0 = the base model.

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
  sample.ddpm_variance = "small"  # DDPM posterior variance: "small" (beta-tilde), "large" (beta) or "learned" (config.model.dit.learn_sigma).
  sample.preset = ml_collections.config_dict.placeholder(str)  # Named sampler settings (diffusion.samplers.PRESETS: "edm", "edm_stochastic"); replaces sampler, grid and s_*; None = those keys.
  sample.s_churn = 0.0  # Euler / Heun stochastic churn (Karras et al. 2022, Alg. 2).
  sample.s_tmin = 0.0  # Euler / Heun: churn only where sigma >= s_tmin.
  sample.s_tmax = ml_collections.config_dict.placeholder(float)  # Euler / Heun: churn only where sigma <= s_tmax; None = no bound.
  sample.s_noise = 1.0  # Euler / Heun: scale of the churn's fresh noise (S_noise).
  sample.guidance_scale = 1.0  # Classifier-free guidance scale w (1 = conditional, 0 = unconditional).
  sample.guidance_rescale = 0.0  # Guidance rescale phi (Lin et al. 2023); 0 disables.
  sample.clip_x0 = True  # Clip predicted x0 to [-1, 1] at every step (DDPM's clip_denoised).
  sample.dynamic_threshold = ml_collections.config_dict.placeholder(float)  # Percentile p of x0 thresholding (Saharia et al. 2022); None disables.
  sample.checkpoint_step = ml_collections.config_dict.placeholder(int)  # --mode=sample: checkpoint to use; None = latest.
  sample.num = 64  # Images drawn (grid during training; total in --mode=sample).
  sample.seed = 0  # Seed of the starting noise.
  sample.batch_size = 64  # Global batch of one sampling call.
  sample.steps_offset = 0  # Added to the "leading" grid's step indices (a diffusers scheduler's steps_offset; SD: 1).
  sample.set_alpha_to_one = True  # False: the last step ends at alphas_cumprod[0] (t = 1/T), as diffusers' DDIM with set_alpha_to_one=False (SD); True: at the data.
  sample.prompt = ml_collections.config_dict.placeholder(str)  # --mode=sample of a text-conditional model (config.text.encoder): every image from this prompt.
  sample.prompts_file = ml_collections.config_dict.placeholder(str)  # Text file, one prompt per line; image i gets line i % lines. Replaces prompt.
  sample.negative_prompt = ""  # The unconditional half of classifier-free guidance for text models ("" = the empty prompt).
  sample.image = ml_collections.config_dict.placeholder(str)  # --mode=sample: inpaint this PNG (config.data.image_size square, the data's channels); needs sample.mask.
  sample.mask = ml_collections.config_dict.placeholder(str)  # PNG of the same size, values 0/255: white (255) = keep, black (0) = fill.

  config.eval = eval_ = ml_collections.ConfigDict()
  eval_.inception_path = "~/.cache/fid/pt_inception-2015-12-05.npz"  # FID Inception weights, converted by scripts/convert_inception.py.
  eval_.num_samples = 50_000  # Images sampled per checkpoint for FID and IS; papers use 50k.
  eval_.fid_stats_path = ml_collections.config_dict.placeholder(str)  # Reference mu/sigma .npz (--mode=fid_stats); None = workdir/eval/fid_stats_<data>.npz.
  eval_.batch_size = 256  # Global batch of sampling, the Inception network and NLL.
  eval_.nll = False  # Also report NLL in bits/dim: PF-ODE, and the variational bound for discrete-time models.
  eval_.nll_num = 1000  # Images of config.data.split whose NLL is averaged.
  eval_.nll_hutchinson = True  # Hutchinson-Skilling trace estimate in the PF-ODE; False = exact trace (D JVPs).
  eval_.step = ml_collections.config_dict.placeholder(int)  # Checkpoint to evaluate; None = every one not yet evaluated.

  # Devices as a 2-D mesh (training/sharding.py): the batch is split over all of them; the large
  # weights, their EMA and Adam's moments along "fsdp". data x fsdp = all devices; one may be -1.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel size (replicas of each shard); -1 = the devices fsdp leaves.
  mesh.fsdp = 1  # Devices a large weight is split over; 1 = pure data parallelism, -1 = the rest.
  mesh.fsdp_min_size = 2**16  # Arrays with fewer elements (biases, norms) stay replicated.

  # JAX's CPU backend only (training/xla_cpu.py); XLA_FLAGS or JAX_NUM_CPU_DEVICES set by the user win.
  config.cpu = cpu = ml_collections.ConfigDict()
  cpu.devices = 1  # CPU devices per host (data parallel over the cores); 0 = one per core, at most 8, as the batch sizes allow.
  cpu.ynn_convolutions = False  # Convolutions through YNNPACK (XLA:CPU's default) instead of Eigen, which trains faster.

  return config
