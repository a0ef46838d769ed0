"""The training loop end to end on the tiny config: steps, sharding, resume, preemption, bad input."""

import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import input_pipeline
import models
from configs import tiny
from models import pretrained
from scripts import convert_stable_diffusion
from training import checkpoints
from training import config_check
from training import progressive
from training import train as train_lib
from training import train_step as train_step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)  # Keys like "model.unet.ch".
  return config


def latest_params(workdir, config):
  manager = checkpoints.create_manager(workdir, read_only=True)
  mesh = train_lib.create_mesh()
  shape = (config.data.image_size, config.data.image_size, 1)
  state, step = checkpoints.restore(manager, train_lib.abstract_state(config, image_shape=shape, mesh=mesh))
  return state, step


def test_one_step_on_mock_cifar10(tmp_path):
  config = tiny_config(**{"data.name": "cifar10", "training.num_steps": 1, "training.checkpoint_every": 1})
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    state = train_lib.train(config, str(tmp_path))
  assert int(state.step) == 1
  assert np.all(np.isfinite(jax.tree.leaves(jax.device_get(state.params))[0]))
  # A real step moved the parameters away from the EMA's starting point.
  moved = jax.tree.map(lambda p, e: float(jnp.max(jnp.abs(p - e))), state.params, state.ema_params)
  assert max(jax.tree.leaves(moved)) > 0
  assert checkpoints.create_manager(str(tmp_path), read_only=True).all_steps() == [1]
  assert os.path.exists(tmp_path / "config.json")
  assert glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))


def test_a_run_starts_from_config_model_pretrained(tmp_path):
  config = tiny_config(**{"training.num_steps": 1, "training.checkpoint_every": 1})
  shapes = train_lib.abstract_state(config, image_shape=(8, 8, 1), mesh=train_lib.create_mesh()).params
  rng = np.random.default_rng(0)
  weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  pretrained.save(str(tmp_path / "converted"), kind="unet", kwargs={}, params=weights)
  with pytest.raises(ValueError, match=r"config\.model\.pretrained=.*does not fit config\.model: 1 parameters"):
    pretrained.load_params_like(str(tmp_path / "converted"), {**shapes, "extra": shapes["conv_in"]["bias"]})
  config.model.pretrained = str(tmp_path / "converted")
  state = train_lib.train(config, str(tmp_path / "run"))
  # One Adam step of at most lr = 1e-4 per weight from the converted weights; the EMA (0.9) a tenth of it.
  ema = jax.tree.map(lambda e, w: float(np.max(np.abs(np.asarray(e) - w))), jax.device_get(state.ema_params), weights)
  assert 0 < max(jax.tree.leaves(ema)) <= 2e-5


def test_digits_run_writes_checkpoints_events_and_sample_grids(tmp_path):
  config = tiny_config(**{"training.num_steps": 4, "training.sample_every": 2})
  train_lib.train(config, str(tmp_path))
  assert sorted(checkpoints.create_manager(str(tmp_path), read_only=True).all_steps()) == [2, 4]
  pngs = sorted(os.listdir(tmp_path / "samples"))
  assert pngs == ["train_step_00000002.png", "train_step_00000004.png"]
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "samples" / pngs[0]))
  assert grid.ndim == 2 and grid.shape[0] > 8 * 2  # A grayscale grid of several 8x8 digits.
  events = glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def _step_on_mesh(devices, config, state, batch):
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  model = models.create_model(config.model)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  step = jax.jit(train_step_lib.make_train_step(
      model=model, schedule=train_lib.create_schedule(config.diffusion), tx=tx, lr_fn=lr_fn,
      hparams=train_step_lib.DiffusionHParams.from_config(config.diffusion), num_classes=0,
      ema_decay=config.optim.ema_decay, rng=jax.random.key(1)),
      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  return jax.device_get(step(state, batch))


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  config = tiny_config(**{"model.unet.dropout": 0.1})
  model = models.create_model(config.model)
  tx, _ = train_step_lib.create_optimizer(config.optim)
  state = jax.jit(lambda rng: train_step_lib.init_state(rng, model=model, tx=tx, image_shape=(8, 8, 1),
                                                        num_classes=0))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  state8, metrics8 = _step_on_mesh(jax.devices(), config, state, batch)
  state1, metrics1 = _step_on_mesh(jax.devices()[:1], config, state, batch)
  assert abs(float(metrics8["loss"]) - float(metrics1["loss"])) < 1e-5
  assert float(metrics8["loss"]) > 0.1
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state8.params, state1.params)
  assert max(jax.tree.leaves(diffs)) < 1e-5


def test_resume_repeats_the_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config(**{"training.num_steps": 6, "training.checkpoint_every": 3})
  train_lib.train(config, straight)
  train_lib.train(tiny_config(**{"training.num_steps": 3, "training.checkpoint_every": 3}), resumed)
  assert checkpoints.create_manager(resumed, read_only=True).latest_step() == 3
  train_lib.train(config, resumed)  # The same command again: resumes at step 3 (params and data).
  a, step_a = latest_params(straight, config)
  b, step_b = latest_params(resumed, config)
  assert step_a == step_b == 6
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  assert max(jax.tree.leaves(diffs)) == 0.0


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
  config = tiny_config(**{"training.num_steps": 2, "training.checkpoint_every": 2})
  train_lib.train(config, str(tmp_path))
  # What a kill in the middle of an Orbax save leaves behind: a temporary directory, never renamed.
  partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("half written")
  state, step = latest_params(str(tmp_path), config)
  assert step == 2 and int(state.step) == 2
  train_lib.train(tiny_config(**{"training.num_steps": 4, "training.checkpoint_every": 2}), str(tmp_path))
  assert checkpoints.create_manager(str(tmp_path), read_only=True).latest_step() == 4


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
  real = input_pipeline.create_dataset

  class Poisoned:
    """The real iterator, with NaN images from the 3rd batch on."""

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count >= 3:
        batch = dict(batch, image=batch["image"] * jnp.nan)
      return batch

  monkeypatch.setattr(input_pipeline, "create_dataset", lambda *a, **k: Poisoned(real(*a, **k)))
  config = tiny_config(**{"training.num_steps": 6, "training.checkpoint_every": 2})
  with pytest.raises(FloatingPointError, match=r"at step 3\b"):
    train_lib.train(config, str(tmp_path))
  manager = checkpoints.create_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2]
  state, _ = latest_params(str(tmp_path), config)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))


BAD_VALUES = [
    ("data.name", "imagenet_typo", r"config\.data\.name"),
    ("data.image_size", 0, r"config\.data\.image_size"),
    ("data.image_size", 9, r"config\.data\.image_size=9 is not divisible by 2"),
    ("data.resize", "stretch", r"config\.data\.resize"),
    ("model.name", "transformer", r"config\.model\.name='transformer' is not one of unet, dit"),
    ("model.unet.ch_mult", (), r"config\.model\.unet\.ch_mult"),
    ("model.unet.ch_mult", (1, 2, 2, 2, 2), r"config\.data\.image_size=8 is not divisible by 16"),
    ("model.unet.attn_resolutions", (3,), r"config\.model\.unet\.attn_resolutions"),
    ("model.unet.num_heads", 3, r"config\.model\.unet\.num_heads=3"),
    ("model.unet.dropout", 1.5, r"config\.model\.unet\.dropout"),
    ("model.num_classes", -1, r"config\.model\.num_classes"),
    ("diffusion.schedule", "sqrt", r"config\.diffusion\.schedule='sqrt' is not one of linear, scaled_linear, cosine"),
    ("diffusion.num_timesteps", -5, r"config\.diffusion\.num_timesteps"),
    ("diffusion.prediction", "score", r"config\.diffusion\.prediction='score' is not one of eps, x0, v"),
    ("diffusion.loss_weighting", "p2", r"config\.diffusion\.loss_weighting"),
    ("diffusion.beta_end", 2.0, r"config\.diffusion\.beta_start=.* beta_end=2\.0"),
    ("diffusion.p_uncond", 0.1, r"config\.diffusion\.p_uncond=0\.1 needs a class-conditional model"),
    ("diffusion.zero_terminal_snr", True, r"config\.diffusion\.zero_terminal_snr=True needs"),
    ("optim.learning_rate", -1.0, r"config\.optim\.learning_rate"),
    ("optim.warmup_steps", -1, r"config\.optim\.warmup_steps"),
    ("optim.grad_clip", -1.0, r"config\.optim\.grad_clip"),
    ("optim.ema_decay", 1.5, r"config\.optim\.ema_decay"),
    ("training.batch_size", 12, r"config\.training\.batch_size=12 is not divisible by the 8 devices"),
    ("training.batch_size", 0, r"config\.training\.batch_size"),
    ("training.num_steps", -10, r"config\.training\.num_steps=-10"),
    ("training.log_every", 0, r"config\.training\.log_every"),
    ("training.checkpoint_every", 0, r"config\.training\.checkpoint_every"),
    ("training.keep_every", 3, r"config\.training\.keep_every=3 is not a multiple of "
     r"config\.training\.checkpoint_every=2"),
    ("sample.sampler", "dpm++", r"config\.sample\.sampler='dpm\+\+' is not one of"),
    ("sample.steps", 0, r"config\.sample\.steps"),
    ("sample.batch_size", 0, r"config\.sample\.batch_size=0"),
    ("cpu.devices", -1, r"config\.cpu\.devices=-1"),
]


@pytest.mark.parametrize("key,value,match", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_config_value_is_named_before_anything_runs(tmp_path, monkeypatch, key, value, match):
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  config = tiny_config(**{key: value})
  if key.startswith("sample."):
    config.training.sample_every = 2  # Sample settings are checked when training samples.
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    train_lib.train(config, str(workdir))
  assert not compiled and not workdir.exists()  # Nothing compiled, nothing written.


SHIPPED_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                         if not p.endswith("__init__.py"))


# The downsampling factor of the autoencoder each latent config is written for (its docstring).
LATENT_FACTORS = {"celeba64_latent": 8, "digits_latent": 4, "imagenet256_dit": 8, "stable_diffusion": 8}

# Stable Diffusion 1.5's own JSON files (runwayml/stable-diffusion-v1-5), as the converter reads them.
SD15_JSON = {
    "model_index.json": {"_class_name": "StableDiffusionPipeline"},
    "unet/config.json": {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "vae/config.json": {
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4},
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
}


# What the command line adds to a config that names its data or teacher there (its docstring, README).
COMMAND_LINES = {
    "digits_distill": {"distill.teacher": "TMP", "distill.student_steps": 32},
    "stable_diffusion": {"data.caption_feature": "caption", "training.batch_size": 8},  # Fine-tuning.
}


def _shipped_config(name, tmp_path):
  """configs/NAME.py's config as training sees it; the paths it names (a teacher, an SD workdir) in tmp_path."""
  if name == "stable_diffusion":
    folder, workdir = tmp_path / "sd15", tmp_path / "converted"
    for path, content in SD15_JSON.items():
      (folder / path).parent.mkdir(parents=True, exist_ok=True)
      (folder / path).write_text(json.dumps(content))
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(convert_stable_diffusion.run_config(str(folder), str(workdir))))
    config = importlib.import_module(f"configs.{name}").get_config(str(workdir))
  else:
    config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in COMMAND_LINES.get(name, {}).items():
    section, field = key.split(".")
    config[section][field] = str(tmp_path) if value == "TMP" else value
  return progressive.with_student_sampler(config)  # As training does first.


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_run_on_1_2_4_and_8_devices(name, tmp_path):
  config = _shipped_config(name, tmp_path)
  assert (config.latent.autoencoder is not None) == (name in LATENT_FACTORS)
  for devices in (1, 2, 4, 8):
    config_check.validate_config(config, device_count=devices, process_count=1,
                                 latent_factor=LATENT_FACTORS.get(name, 1))
    config_check.validate_sample(config.sample, device_count=devices)  # --mode=sample's check.


def test_settings_of_a_disabled_feature_do_not_block_training():
  config = tiny_config(**{"training.sample_every": 0, "sample.sampler": "not_a_sampler"})
  config_check.validate_config(config, device_count=8, process_count=1)
  config.training.sample_every = 2
  with pytest.raises(ValueError, match=r"config\.sample\.sampler='not_a_sampler'"):
    config_check.validate_config(config, device_count=8, process_count=1)


def test_mesh_is_jax_make_mesh_over_every_device(monkeypatch):
  calls = []
  real = jax.make_mesh
  monkeypatch.setattr(jax, "make_mesh", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
  mesh = train_lib.create_mesh()
  assert calls and mesh.shape == {"data": 8, "fsdp": 1} and list(mesh.devices.flat) == jax.devices()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2  # jax.make_mesh's default is Explicit.


def test_locked_config_rejects_a_misspelt_key():
  config = tiny.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.training.batchsize = 3


def test_a_config_saved_before_model_sections_restores_as_a_unet(tmp_path):
  saved = tiny.get_config().to_dict()
  unet = saved["model"].pop("unet")
  del saved["model"]["dit"]
  saved["model"].update(unet)  # The layout of runs saved when the UNet's knobs sat in config.model.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = checkpoints.restore_config(str(tmp_path))
  assert config.model.unet.to_dict() == unet and "ch" not in config.model
  assert isinstance(models.create_model(config.model), models.UNet)


def test_learning_rate_warms_up_linearly():
  lr = train_step_lib.learning_rate_schedule(learning_rate=2e-4, warmup_steps=5000)
  assert float(lr(0)) == pytest.approx(2e-4 / 5000) and float(lr(2499)) == pytest.approx(1e-4)
  assert float(lr(4999)) == pytest.approx(2e-4) and float(lr(10**6)) == pytest.approx(2e-4)
  assert float(train_step_lib.learning_rate_schedule(learning_rate=1e-3, warmup_steps=0)(0)) == pytest.approx(1e-3)


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.training.num_steps=100000", "--config.training.checkpoint_every=100000",
       "--config.training.log_every=1"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 180
  seen = ""
  while time.time() < deadline:  # Wait until training steps are being logged.
    line = proc.stdout.readline()
    seen += line
    if "step 3:" in line:
      break
  else:
    proc.kill()
    pytest.fail(f"training did not start:\n{seen[-3000:]}")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, (seen + out)[-3000:]
  step = checkpoints.create_manager(str(workdir), read_only=True).latest_step()
  assert step is not None and step >= 3
  assert "Preempted at step" in out
