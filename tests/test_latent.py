"""Latent diffusion: a tiny random autoencoder (factor 4) around the tiny UNet; masks; inpainting models."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import models
from configs import tiny
from diffusion import inpaint
from evaluation import evaluate as evaluate_lib
from evaluation import fid
from evaluation import inception
from evaluation import run as run_lib
from models import autoencoder
from models import pretrained
from training import checkpoints
from training import config_check
from training import generate
from training import latent_cache
from training import sample as sample_lib
from training import spaces
from training import train as train_lib
from training import train_step as train_step_lib

AE_KWARGS = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "latent_channels": 4, "out_channels": 1,
             "groups": 4}


def save_autoencoder(directory, *, seed=0, **overrides):
  kwargs = {**AE_KWARGS, **overrides}
  model = autoencoder.AutoencoderKL(**kwargs)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 16, 16, kwargs["out_channels"])))["params"]
  pretrained.save(directory, kind="autoencoder_kl", kwargs=kwargs, params=params, scaling_factor=1.0)
  return directory


def latent_config(ae_dir, **overrides):
  config = tiny.get_config()
  config.data.image_size = 16  # 16x16 pixels -> 4x4x4 latents.
  config.data.random_flip = False
  config.latent.autoencoder = ae_dir
  config.latent.scale_batches = 2
  config.model.unet.attn_resolutions = (2,)
  config.training.num_steps = 2
  config.sample.num = 8
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
  return save_autoencoder(str(tmp_path_factory.mktemp("ae") / "vae"))


@pytest.fixture(scope="module")
def latent_run(ae_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("latent_run"))
  config = latent_config(ae_dir)
  train_lib.train(config, workdir)
  return workdir, config


def test_reduce_mask_marks_a_cell_unknown_if_any_pixel_is():
  mask = np.ones((1, 8, 8, 1), np.float32)
  mask[0, 3, 5] = 0.0  # One pixel of cell (0, 1) of the 4x4 cells.
  mask[0, 4:8, 0:4] = 0.0  # All of cell (1, 0).
  reduced = np.asarray(inpaint.reduce_mask(jnp.asarray(mask), factor=4))
  np.testing.assert_array_equal(reduced[0, ..., 0], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(inpaint.reduce_mask(jnp.asarray(mask), factor=1), mask)
  masks = np.asarray(inpaint.random_masks(jax.random.key(0), batch_size=64, height=16, width=16))
  assert set(np.unique(masks)) == {0.0, 1.0}
  filled = 1 - masks.mean(axis=(1, 2, 3))
  assert filled.min() > 0.02 and filled.max() < 0.8  # Every mask fills something and keeps something.


def test_scale_factor_is_estimated_saved_and_restored(latent_run, ae_dir):
  workdir, config = latent_run
  # 1 / std of the posterior samples of the first scale_batches training batches, recomputed here.
  data = train_lib.input_pipeline.create_numpy_iterator(config.data, global_batch_size=16, seed=0)
  space = spaces.create_space(config, channels=1, scale_factor=1.0)
  z = np.concatenate([np.asarray(space.encode(space.params, jnp.asarray(next(data)["image"]),
                                              jax.random.key(i))).ravel() for i in range(2)])
  expected = 1.0 / z.std()
  assert abs(expected - 1.0) > 0.05  # An estimate that differs from the autoencoder's own 1.0.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["latent"]["scale_factor"] == pytest.approx(expected, rel=1e-5)
  assert checkpoints.restore_config(workdir, 2).latent.scale_factor == pytest.approx(expected, rel=1e-5)
  # Resuming does not estimate again (other batches would give another number): it reads the saved one.
  train_lib.train(latent_config(ae_dir, **{"training.num_steps": 4, "latent.scale_batches": 1}), workdir)
  saved = checkpoints.restore_config(workdir, 4).latent.scale_factor
  assert saved == pytest.approx(expected, rel=1e-5)
  trained, _, _, _ = run_lib.load_run(workdir)
  assert spaces.space_for_run(trained, run_lib.image_shape(workdir)).scale_factor == saved
  assert run_lib.image_shape(workdir) == (4, 4, 4)  # The model's shape is the latents'.
  # A different given scale factor is another model: refused before anything is written.
  with pytest.raises(checkpoints.CheckpointError, match=r"latent\.scale_factor"):
    train_lib.train(latent_config(ae_dir, **{"training.num_steps": 6, "latent.scale_factor": 0.5}), workdir)


def test_sampling_and_inpainting_write_decoded_pixels(latent_run, tmp_path):
  workdir, _ = latent_run
  config = latent_config(None)
  path = sample_lib.sample(config, workdir)
  with np.load(path + ".npz") as f:
    assert f["images"].shape == (8, 16, 16, 1) and f["images"].dtype == np.uint8
    assert "latents of" in json.loads(str(f["settings"]))["space"]

  # Inpainting from files: white keeps, black fills; the left half is kept.
  trained = checkpoints.restore_config(workdir)
  space = spaces.space_for_run(trained, (4, 4, 4))
  original = (np.asarray(jax.random.uniform(jax.random.key(3), (16, 16, 1))) * 255).astype(np.uint8)
  mask = np.zeros((16, 16), np.uint8)
  mask[:, :8] = 255
  Image.fromarray(original[..., 0]).save(tmp_path / "in.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  config.sample.image, config.sample.mask = str(tmp_path / "in.png"), str(tmp_path / "mask.png")
  path = sample_lib.sample(config, workdir)
  assert path.endswith("_inpaint")
  with np.load(path + ".npz") as f:
    inpainted = f["images"].astype(np.float32)
  # The known latent cells are the encoded original's, so the known pixels are as close to the original
  # as the autoencoder's reconstruction D(E(x)) (the decoder's attention also reads the filled cells).
  x = jnp.asarray(original[None] / 127.5 - 1.0, jnp.float32)
  recon = np.asarray(space.decode(space.params, space.encode(space.params, x)))
  recon = np.round((np.clip(recon, -1, 1) + 1) * 127.5)
  known_error = np.abs(inpainted[:, :, :8] - original[None, :, :8]).mean()
  recon_error = np.abs(recon[:, :, :8] - original[None, :, :8]).mean()
  assert known_error <= 1.1 * recon_error  # The autoencoder's reconstruction error, no more.
  assert np.abs(inpainted[:, :, 8:] - recon[:, :, 8:]).mean() > 1.0  # The filled half is new.


def test_pixel_inpainting_keeps_the_known_region_exactly():
  config = tiny.get_config()
  model = models.create_model(config.model)
  tx, _ = train_step_lib.create_optimizer(config.optim)
  state = jax.jit(lambda rng: train_step_lib.init_state(rng, model=model, tx=tx, image_shape=(8, 8, 1),
                                                        num_classes=0))(jax.random.key(0))
  sampler = generate.Sampler.from_config(config, model=model, mesh=train_lib.create_mesh(),
                                         schedule=train_lib.create_schedule(config.diffusion),
                                         image_shape=(8, 8, 1))
  image = np.asarray(jax.random.uniform(jax.random.key(1), (8, 8, 1), minval=-1, maxval=1))
  mask = np.ones((8, 8, 1), np.float32)
  mask[2:6, 2:6] = 0
  images, _ = sampler.sample(state.params, seed=0, num=8, image=image, mask=mask)
  expected = np.round((image + 1) * 127.5)
  known = np.broadcast_to(mask, images.shape) == 1
  assert np.abs(images.astype(np.float32) - expected)[known].max() <= 1.0  # 8-bit rounding only.
  assert np.abs(images.astype(np.float32) - expected)[~known].mean() > 10


def test_latent_train_step_on_mock_data(ae_dir, tmp_path):
  """One training step of mnist (tfds mock data) in the latent space of a given scale factor."""
  config = latent_config(ae_dir, **{"data.name": "mnist", "latent.scale_factor": 0.7,
                                    "training.num_steps": 1, "training.checkpoint_every": 1})
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    state = train_lib.train(config, str(tmp_path))
  assert int(state.step) == 1
  assert checkpoints.restore_config(str(tmp_path)).latent.scale_factor == 0.7
  assert state.params["conv_in"]["kernel"].shape[2] == 4  # The UNet sees the 4 latent channels.


def test_inpainting_model_has_nine_input_channels_and_trains(ae_dir):
  config = latent_config(ae_dir, **{"diffusion.inpaint_training": True, "latent.scale_factor": 1.0})
  space = spaces.create_space(config, channels=1)
  extra = spaces.concat_channels(config, space.shape)
  assert extra == 5  # SD-inpainting: the mask and the masked image's 4 latent channels.
  model = models.create_model(config.model)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  state = jax.jit(lambda rng: train_step_lib.init_state(rng, model=model, tx=tx, image_shape=space.shape,
                                                        num_classes=0, concat_channels=extra))(jax.random.key(0))
  assert state.params["conv_in"]["kernel"].shape == (3, 3, 9, 8)  # 4 latents + 1 mask + 4 masked.
  assert state.params["conv_out"]["kernel"].shape == (3, 3, 8, 4)
  step = jax.jit(train_step_lib.make_train_step(
      model=model, schedule=train_lib.create_schedule(config.diffusion), tx=tx, lr_fn=lr_fn,
      hparams=train_step_lib.DiffusionHParams.from_config(config.diffusion), num_classes=0,
      ema_decay=0.9, rng=jax.random.key(1), encode=space.encode,
      condition=spaces.make_condition(config, space)))
  batch = {"image": jax.random.uniform(jax.random.key(2), (16, 16, 16, 1), minval=-1, maxval=1),
           "label": jnp.zeros((16,), jnp.int32)}
  new_state, metrics = step(state, batch, space.params)
  assert bool(metrics["finite"]) and float(metrics["loss"]) > 0.1
  new_state, metrics = step(new_state, batch, space.params)  # conv_out starts at zero: a second step.
  assert bool(metrics["finite"])
  moved = np.abs(np.asarray(new_state.params["conv_in"]["kernel"] - state.params["conv_in"]["kernel"]))
  assert moved[:, :, 4:].max() > 0  # The mask and masked-latent input channels are trained.
  # The concatenated input: 1 where to fill, on the latent grid, then the masked image's latents.
  mask = jnp.ones((1, 16, 16, 1)).at[:, :, 8:].set(0.0)
  concat = spaces.inpaint_concat(space, space.params, images=batch["image"][:1], mask=mask)
  np.testing.assert_array_equal(concat[0, :, :, 0], np.tile([0, 0, 1, 1], (4, 1)))
  np.testing.assert_allclose(concat[..., 1:], space.encode(space.params, batch["image"][:1] * mask),
                             atol=1e-6)


def test_eval_of_a_latent_run(latent_run, monkeypatch, tmp_path):
  workdir, _ = latent_run

  class PixelFeatures:
    def __init__(self, variables, *, mesh, batch_size):
      del variables, mesh, batch_size

    def __call__(self, images):
      pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
      logits = np.tile(pixels, (1, inception.NUM_LOGITS // pixels.shape[1] + 1))[:, :inception.NUM_LOGITS]
      return {"pool3": pixels, "logits_unbiased": logits}

  monkeypatch.setattr(inception, "FeatureExtractor", PixelFeatures)
  monkeypatch.setattr(inception, "load_variables", lambda path: None)
  config = latent_config(None)
  config.eval.num_samples, config.eval.batch_size = 16, 8
  config.eval.fid_stats_path = str(tmp_path / "stats.npz")
  rng = np.random.default_rng(0)
  features = rng.uniform(size=(64, 256))
  np.savez(config.eval.fid_stats_path, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
  config.eval.step = 2
  records = evaluate_lib.evaluate(config, workdir)
  assert len(records) == 1 and np.isfinite(records[0]["fid"]) and records[0]["fid"] > 0
  assert records[0]["latent_autoencoder"].endswith("vae") and records[0]["latent_scale_factor"] > 0
  config.eval.nll, config.eval.step = True, 4
  with pytest.raises(ValueError, match=r"config\.eval\.nll=True"):
    evaluate_lib.evaluate(config, workdir)
  assert fid.load_stats(config.eval.fid_stats_path)[0].shape == (256,)


def test_bad_latent_inputs_name_the_key_or_file(ae_dir, tmp_path):
  with pytest.raises(ValueError, match=r"config\.latent\.autoencoder='/nonexistent'.*model\.json"):
    spaces.create_space(latent_config("/nonexistent"), channels=1)
  other = str(tmp_path / "clip")
  os.makedirs(other)
  with open(os.path.join(other, "model.json"), "w") as f:
    json.dump({"kind": "clip_text", "kwargs": {}}, f)
  with pytest.raises(ValueError, match=r"config\.latent\.autoencoder=.*not a 'autoencoder_kl'"):
    spaces.create_space(latent_config(other), channels=1)
  with pytest.raises(ValueError, match=r"config\.data\.image_size=18 is not divisible by 4"):
    spaces.create_space(latent_config(ae_dir, **{"data.image_size": 18}), channels=1)
  with pytest.raises(ValueError, match=r"config\.data\.image_size=18 is not divisible by 4"):
    config_check.validate_config(latent_config(ae_dir, **{"data.image_size": 18}), device_count=8,
                                 process_count=1, latent_factor=4)
  trained = latent_config(ae_dir, **{"latent.scale_factor": 1.0})
  with pytest.raises(ValueError, match=r"built for 3 latent channels but config\.latent\.autoencoder="):
    spaces.space_for_run(trained, (4, 4, 3))
  with pytest.raises(ValueError, match=r"has 3-channel images but config\.latent\.autoencoder"):
    spaces.create_space(trained, channels=3)
  with pytest.raises(ValueError, match=r"config\.latent\.scale_factor=-1\.0 must be > 0"):
    config_check.validate_latent(latent_config(ae_dir, **{"latent.scale_factor": -1.0}))

  sample = ml_collections.ConfigDict({"image": str(tmp_path / "in.png"), "mask": str(tmp_path / "m.png")})
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "in.png")
  with pytest.raises(FileNotFoundError, match=r"config\.sample\.mask=.*m\.png' does not exist"):
    config_check.read_inpaint_files(sample, data_shape=(16, 16, 1))
  Image.fromarray(np.full((8, 16), 255, np.uint8)).save(tmp_path / "m.png")
  with pytest.raises(ValueError, match=r"config\.sample\.mask=.* is 8x16 but config\.sample\.image is 16x16"):
    config_check.read_inpaint_files(sample, data_shape=(16, 16, 1))
  Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "m.png")
  with pytest.raises(ValueError, match=r"config\.sample\.mask=.* is not binary: it holds the values \[128\]"):
    config_check.read_inpaint_files(sample, data_shape=(16, 16, 1))
  with pytest.raises(ValueError, match=r"config\.sample\.image=.* is 16x16x1 but the model's images are 32x32x1"):
    config_check.read_inpaint_files(sample, data_shape=(32, 32, 1))
  mask = np.full((16, 16), 255, np.uint8)
  mask[4:8] = 0
  Image.fromarray(mask).save(tmp_path / "m.png")
  image, keep = config_check.read_inpaint_files(sample, data_shape=(16, 16, 1))
  assert image.shape == (16, 16, 1) and float(image.min()) == -1.0
  assert keep.shape == (16, 16, 1) and keep[:4].min() == 1 and keep[4:8].max() == 0  # White keeps.


# ----------------------------------------------------------------------------------------------------
# The latent cache (--mode=encode) and the autoencoder of a run replaced at sampling.


@pytest.fixture(scope="module")
def cache(ae_dir, tmp_path_factory):
  """train[:40] encoded with mirrored images' posteriors too; an encode killed after a batch before."""
  directory = str(tmp_path_factory.mktemp("cache") / "latents")
  config = latent_config(ae_dir, **{"data.split": "train[:40]", "data.random_flip": True,
                                    "latent.cache": directory, "eval.batch_size": 16})
  read = run_lib.DatasetImages.read
  def read_then_die(self, begin, end):
    if begin > 0:
      raise KeyboardInterrupt("killed")
    return read(self, begin, end)
  patch = pytest.MonkeyPatch()
  patch.setattr(run_lib.DatasetImages, "read", read_then_die)
  with pytest.raises(KeyboardInterrupt):
    latent_cache.encode_split(config, "unused")
  patch.undo()
  interrupted = os.path.exists(directory + ".partial") and not os.path.exists(directory)
  with pytest.raises(FileNotFoundError, match=r"config\.latent\.cache=.* is not a complete latent cache"):
    latent_cache.read_manifest(directory)
  assert latent_cache.encode_split(config, "unused") == directory
  return directory, config, interrupted


def test_cache_holds_the_encoders_posteriors_and_draws_match_its_statistics(cache):
  directory, config, interrupted = cache
  assert interrupted  # Only the .partial directory was left, and it was not read as a cache.
  assert not os.path.exists(directory + ".partial")
  manifest = latent_cache.read_manifest(directory)
  assert manifest["count"] == 40 and manifest["flipped"] and manifest["latent_shape"] == [4, 4, 4]
  source = latent_cache.CacheSource(directory, manifest)
  assert len(source) == 40
  module, params, _ = pretrained.load_autoencoder(config.latent.autoencoder)
  images, labels = run_lib.DatasetImages(config.data).read(0, 40)
  x = jnp.asarray(images / 127.5 - 1.0, jnp.float32)
  for key, view in (("moments", x), ("flipped", x[:, :, ::-1])):
    q = module.apply({"params": params}, view, method=module.encode)
    cached = np.stack([source[i][key] for i in range(40)])
    np.testing.assert_allclose(cached, np.concatenate([q.mean, q.logvar], -1), atol=1e-5)
  assert [source[i]["label"] for i in range(40)] == labels.tolist()

  # Draws from the cache have the encoder's posterior mean and std (4 images, 4000 draws each).
  space = spaces.create_space(config, channels=1, scale_factor=1.0)
  assert space.cached
  moments = jnp.asarray(np.stack([source[i]["moments"] for i in range(4)]))
  z = jax.vmap(lambda k: space.encode_batch(space.params, moments, k))(
      jax.random.split(jax.random.key(0), 4000))
  q = module.apply({"params": params}, x[:4], method=module.encode)
  std = np.asarray(q.std)
  assert np.all(np.abs(np.mean(z, axis=0) - q.mean) < 5 * std / np.sqrt(4000))
  np.testing.assert_allclose(np.std(z, axis=0), std, rtol=0.1)
  # The same key draws the same latents from the cache as from the images.
  np.testing.assert_allclose(space.encode_batch(space.params, moments, jax.random.key(1)),
                             space.encode(space.params, x[:4], jax.random.key(1)), atol=1e-5)


def test_training_reads_the_cache_and_refuses_another_configs(cache, ae_dir, tmp_path):
  directory, config, _ = cache
  config = config.copy_and_resolve_references()
  config.data.random_flip = False  # The cache's mirrored posteriors are then not read.
  state = train_lib.train(config, str(tmp_path / "run"))
  assert int(state.step) == 2 and state.params["conv_in"]["kernel"].shape[2] == 4
  # The scale factor from the cached posteriors: the one from encoding the same batches' images.
  data = train_lib.input_pipeline.create_numpy_iterator(config.data, global_batch_size=16, seed=0)
  space = spaces.create_space(latent_config(ae_dir), channels=1, scale_factor=1.0)
  z = np.concatenate([np.asarray(space.encode(space.params, jnp.asarray(next(data)["image"]),
                                              jax.random.key(i))).ravel() for i in range(2)])
  saved = checkpoints.restore_config(str(tmp_path / "run")).latent.scale_factor
  assert saved == pytest.approx(1.0 / z.std(), rel=1e-4)

  manifest = latent_cache.read_manifest(directory)
  check = lambda **kv: latent_cache.check_manifest(
      manifest, latent_config(ae_dir, **{"data.split": "train[:40]", **kv}), autoencoder_step=None,
      cache=directory)
  check()
  for key, value in (("data.image_size", 32), ("data.split", "train[:41]"), ("data.resize", "resize")):
    with pytest.raises(ValueError, match=rf"was encoded with config\.{key}=.* but this run has"):
      check(**{key: value})
  other = save_autoencoder(str(tmp_path / "other_vae"), seed=1)
  with pytest.raises(ValueError, match=r"config\.latent\.autoencoder=.*vae', but this run has .*other_vae"):
    check(**{"latent.autoencoder": other})
  # encode never overwrites a cache made for another config.
  with pytest.raises(ValueError, match=r"config\.data\.image_size=16, but this run has 32"):
    latent_cache.encode_split(latent_config(ae_dir, **{"data.split": "train[:40]", "data.image_size": 32,
                                                       "latent.cache": directory}), "unused")
  assert latent_cache.read_manifest(directory) == manifest
  unflipped = {**manifest, "flipped": False}
  with pytest.raises(ValueError, match=r"config\.data\.random_flip=True but config\.latent\.cache="):
    latent_cache.check_manifest(unflipped, latent_config(ae_dir, **{
        "data.split": "train[:40]", "data.random_flip": True}), autoencoder_step=None, cache=directory)
  with pytest.raises(ValueError, match=r"config\.latent\.cache=.* needs config\.latent\.autoencoder"):
    config_check.validate_latent(latent_config(None, **{"latent.cache": directory}))


def test_sampling_with_a_moved_or_replaced_autoencoder(latent_run, ae_dir, tmp_path):
  workdir, _ = latent_run
  moved = str(tmp_path / "moved_vae")
  os.rename(ae_dir, moved)
  try:  # --mode=sample's combination of the run's config with the command line's.
    for_run = lambda config: spaces.space_for_run(run_lib.with_command_line(
        checkpoints.restore_config(workdir), config, sections=("sample",)), (4, 4, 4))
    with pytest.raises(ValueError, match=r"config\.latent\.autoencoder=.*vae' is not an autoencoder"):
      for_run(latent_config(None))  # The run's own path, gone.
    space = for_run(latent_config(moved))
    assert space.path == moved  # The run's scale factor, not the autoencoder's own 1.0:
    assert space.scale_factor == checkpoints.restore_config(workdir).latent.scale_factor != 1.0
    assert space.decode(space.params, jnp.zeros((1, 4, 4, 4))).shape == (1, 16, 16, 1)
  finally:
    os.rename(moved, ae_dir)
  for name, kwargs, message in (
      ("three", {"latent_channels": 3}, r"built for 4 latent channels but config\.latent\.autoencoder="),
      ("factor2", {"ch_mult": [1, 2]}, r"built for 4x4 latents of config\.data\.image_size=16 but "
                                       r"config\.latent\.autoencoder=.*factor2' downsamples 2x")):
    other = save_autoencoder(str(tmp_path / name), **kwargs)
    with pytest.raises(ValueError, match=message):
      sample_lib.sample(latent_config(other), workdir)
