"""--mode=sample on a trained tiny run: files, no overwriting, and device-count independence."""

import json
import os

import jax
import numpy as np
import pytest

import models
from configs import tiny
from training import checkpoints
from training import generate
from training import sample as sample_lib
from training import train as train_lib


def sample_config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    config.sample[key] = value
  return config


def test_sample_writes_npz_and_png_without_overwriting(trained_workdir):
  config = sample_config(sampler="dpmpp_2m", steps=3, num=12, guidance_scale=2.0)
  first = sample_lib.sample(config, trained_workdir)
  second = sample_lib.sample(config, trained_workdir)
  assert first != second and second.endswith("_1")
  a, b = np.load(first + ".npz"), np.load(second + ".npz")
  assert a["images"].shape == (12, 8, 8, 1) and a["images"].dtype == np.uint8
  np.testing.assert_array_equal(a["labels"], np.arange(12) % 10)
  np.testing.assert_array_equal(a["images"], b["images"])  # Same seed, same images.
  settings = json.loads(str(a["settings"]))
  assert settings["sampler"] == "dpmpp_2m" and settings["steps"] == 3 and settings["guidance_scale"] == 2.0
  assert settings["checkpoint_step"] == 2 and settings["num"] == 12
  assert os.path.exists(first + ".png") and os.path.exists(second + ".png")
  other = sample_lib.sample(sample_config(sampler="dpmpp_2m", steps=3, num=12, guidance_scale=2.0, seed=1),
                            trained_workdir)
  assert not np.array_equal(np.load(other + ".npz")["images"], a["images"])


def test_sample_names_a_missing_step(trained_workdir):
  with pytest.raises(ValueError, match=r"config\.sample\.checkpoint_step=7 is not a checkpoint"):
    sample_lib.sample(sample_config(checkpoint_step=7), trained_workdir)


def test_sample_without_checkpoint_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    sample_lib.sample(sample_config(), str(tmp_path))


def _images_on_1_and_8_devices(workdir, config, *, seed, num):
  manager = checkpoints.create_manager(workdir, read_only=True)
  images = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    state, _ = checkpoints.restore(manager, train_lib.abstract_state(config, image_shape=(8, 8, 1), mesh=mesh))
    sampler = generate.Sampler.from_config(config, model=models.create_model(config.model),
                                           schedule=train_lib.create_schedule(config.diffusion), mesh=mesh,
                                           image_shape=(8, 8, 1))
    images.append(sampler.sample(state.ema_params, seed=seed, num=num)[0])
  return images


def test_same_seed_same_images_whatever_the_device_count(trained_workdir):
  config = checkpoints.restore_config(trained_workdir)
  config.sample.sampler, config.sample.steps = "euler_a", 3
  images = _images_on_1_and_8_devices(trained_workdir, config, seed=3, num=16)
  np.testing.assert_array_equal(images[0], images[1])
  assert images[0].std() > 0


def test_any_batch_size_on_any_devices_gives_the_same_images(trained_workdir):
  # 100 rows on 8 devices: each batch is padded to 104 and cut back, with the draws of 100 rows.
  config = checkpoints.restore_config(trained_workdir)
  config.sample.sampler, config.sample.steps, config.sample.batch_size = "ddpm", 3, 100
  images = _images_on_1_and_8_devices(trained_workdir, config, seed=5, num=130)
  assert images[0].shape == (130, 8, 8, 1)
  np.testing.assert_array_equal(images[0], images[1])
  assert images[0].std() > 0 and not np.array_equal(images[0][:30], images[0][100:])


def test_lora_run_on_a_trained_base_resumes_samples_and_exports(trained_workdir, tmp_path):
  """config.lora.rank > 0 on the trained run as base: only adapters are checkpointed; a resumed run
  continues; --mode=sample merges them; the exported file, loaded with config.lora.load, samples the same."""
  from training import lora  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.num_classes, config.diffusion.p_uncond = 10, 0.2
  config.lora.rank, config.lora.alpha, config.lora.base = 2, 4.0, trained_workdir
  config.lora.targets = (r"qkv$", r"proj_out$")  # The pixel UNet's attention.
  config.training.num_steps, config.optim.learning_rate = 2, 0.05
  workdir = str(tmp_path / "lora")
  state = train_lib.train(config, workdir)
  assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]} == {"lora_A", "lora_B"}
  config.training.num_steps = 4
  assert int(train_lib.train(config, workdir).step) == 4  # Resumed from step 2.
  changed = config.copy_and_resolve_references()
  changed.lora.rank = 3
  with pytest.raises(checkpoints.CheckpointError, match=r"lora\.rank: saved 2, now 3"):
    train_lib.train(changed, workdir)

  sample = sample_config(sampler="dpmpp_2m", steps=3, num=12, guidance_scale=2.0)  # The first test's program.
  adapted = np.load(sample_lib.sample(sample, workdir) + ".npz")["images"]
  base = np.load(sample_lib.sample(sample, trained_workdir) + ".npz")["images"]
  assert not np.array_equal(adapted, base)
  manager = checkpoints.create_manager(workdir, read_only=True)
  restored, _ = checkpoints.restore(manager, train_lib.abstract_state(
      checkpoints.restore_config(workdir), image_shape=(8, 8, 1), mesh=train_lib.create_mesh()))
  path = str(tmp_path / "adapters.safetensors")
  lora.save_file(path, {"unet": restored.ema_params}, rank=2, alpha=4.0)
  sample.lora.load = path
  loaded = np.load(sample_lib.sample(sample, trained_workdir) + ".npz")["images"]
  np.testing.assert_array_equal(loaded, adapted)
