"""Training the KL autoencoder: its losses against hand computations, and runs through train().

Shapes for factors 4 and 8 and the KL's closed form are in tests/test_autoencoder.py.
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from evaluation import evaluate as evaluate_lib
from evaluation import fid
from evaluation import inception
from evaluation import run as run_lib
from models import autoencoder
from models import discriminator as discriminator_lib
from models import lpips as lpips_lib
from models import pretrained
from training import autoencoder_step
from training import checkpoints
from training import config_check
from training import tasks
from training import train as train_lib
from training import writers

from tests.test_eval import PixelFeatures


def ae_config(**overrides):
  """A tiny autoencoder run: 16x16 digits, factor 2, a discriminator from step 2."""
  config = tiny.get_config()
  config.data.image_size = 16
  config.data.random_flip = False
  config.data.split = "train[:1000]"
  config.data.holdout_split = "train[1000:]"
  config.model.name = "autoencoder"
  config.model.autoencoder.update(dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2,
                                       groups=4))
  config.autoencoder_loss.update(dict(disc_weight=0.5, disc_start=2, disc_ch=8, disc_layers=2))
  config.optim.learning_rate = 1e-3
  config.optim.grad_clip = 0.0
  config.training.update(dict(num_steps=6, log_every=1, sample_every=3, checkpoint_every=3))
  config.update_from_flattened_dict(overrides)
  return config


def test_hinge_losses_and_adaptive_weight_by_hand():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-3.0, 0.2])
  # 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-3, .2]))) = 0.5 * (0.25 + 0.6).
  assert float(autoencoder_step.hinge_d_loss(real, fake)) == pytest.approx(0.425)
  assert float(autoencoder_step.hinge_g_loss(fake)) == pytest.approx(1.4)
  weight = autoencoder_step.adaptive_weight(rec_grad=jnp.array([3.0, 4.0]), gan_grad=jnp.array([0.0, 2.0]))
  assert float(weight) == pytest.approx(5.0 / (2.0 + 1e-4), rel=1e-6)
  clipped = autoencoder_step.adaptive_weight(rec_grad=jnp.array([3.0, 4.0]), gan_grad=jnp.zeros(2))
  assert float(clipped) == 1e4  # 5 / 1e-4 = 5e4, clipped.
  x = jnp.zeros((1, 2, 2, 1))
  # MSE 0.01 on a peak-to-peak range of 2: 10 log10(4 / 0.01) = 26.02 dB.
  assert float(autoencoder_step.psnr(x + 0.1, x)[0]) == pytest.approx(10 * np.log10(400.0), rel=1e-5)
  assert float(autoencoder_step.reconstruction_loss(x + 0.1, x, kind="l1")[0]) == pytest.approx(0.4)
  assert float(autoencoder_step.reconstruction_loss(x + 0.1, x, kind="l2")[0]) == pytest.approx(0.04)


def test_posterior_sample_statistics_match_its_mode_and_std():
  rng = np.random.default_rng(1)
  q = autoencoder.DiagonalGaussian(jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32),
                                   jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32))
  z = jax.vmap(q.sample)(jax.random.split(jax.random.key(0), 20000))
  std = np.asarray(q.std)
  assert np.all(np.abs(np.mean(z, axis=0) - q.mode()) < 4 * std / np.sqrt(20000))
  np.testing.assert_allclose(np.std(z, axis=0), std, rtol=0.05)


def test_discriminator_is_a_patchgan():
  disc = discriminator_lib.NLayerDiscriminator(ch=8, n_layers=3)
  shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))["params"]
  # taming: 4x4 convolutions, channels ch, 2ch, 4ch, 8ch, 1; no bias where a norm follows.
  assert [shapes[f"conv_{n}"]["kernel"].shape[-1] for n in range(4)] == [8, 16, 32, 64]
  assert "bias" not in shapes["conv_1"] and shapes["conv_out"]["kernel"].shape == (4, 4, 64, 1)
  out = jax.eval_shape(lambda: disc.apply(disc.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))),
                                          jnp.zeros((2, 32, 32, 3))))
  assert out.shape == (2, 2, 2, 1)  # 32 / 2^3 - 2 patches a side.


def test_step_weights_the_gan_loss_by_eq7_and_switches_it_on_at_disc_start():
  model = autoencoder.AutoencoderKL(ch=4, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2,
                                    out_channels=1, groups=2, mid_attention=False)
  disc = discriminator_lib.NLayerDiscriminator(ch=4, n_layers=1)
  tx = optax.adam(1e-3)
  state = jax.jit(lambda rng: autoencoder_step.init_state(rng, model=model, discriminator=disc, tx=tx,
                                                          image_shape=(8, 8, 1)))(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), minval=-1, maxval=1)
  # One compiled step; GAN terms on from step 1, so the state's step switches them.
  loss = autoencoder_step.AutoencoderLoss(kl_weight=1e-3, sample_posterior=False, disc_weight=0.5,
                                          disc_start=1)
  step = jax.jit(lambda state: autoencoder_step.train_step(
      state, {"image": x}, None, model=model, discriminator=disc, lpips_fn=None, tx=tx,
      lr_fn=lambda s: 1e-3, loss=loss, ema_decay=0.9, rng=jax.random.key(2)))

  def nll(params):
    x_hat, posterior = model.apply({"params": params}, x)
    return jnp.mean(jnp.sum(jnp.abs(x_hat - x), axis=(1, 2, 3))) + 1e-3 * jnp.mean(posterior.kl())

  def gan(params):
    return -jnp.mean(disc.apply({"params": state.disc_params}, model.apply({"params": params}, x)[0]))

  @jax.jit
  def reference(params):
    last = lambda g: g["decoder"]["conv_out"]["kernel"]
    weight = (jnp.linalg.norm(last(jax.grad(nll)(params))) /
              (jnp.linalg.norm(last(jax.grad(gan)(params))) + 1e-4))
    return weight, nll(params), gan(params)

  expected, nll_value, gan_value = reference(state.params)
  new, metrics = step(state.replace(step=jnp.ones((), jnp.int32)))
  assert float(metrics["adaptive_weight"]) == pytest.approx(float(expected), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(float(nll_value + 0.5 * expected * gan_value), rel=1e-5)
  kernels = lambda p: [p[k]["kernel"] for k in sorted(p) if "conv" in k]
  assert all(bool(jnp.any(a != b)) for a, b in zip(kernels(new.disc_params), kernels(state.disc_params)))
  before, metrics = step(state)  # Step 0 < disc_start: no GAN term, the discriminator untouched.
  assert float(metrics["loss"]) == pytest.approx(float(nll_value), rel=1e-6)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before.disc_params, state.disc_params)
  assert all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 6-step run, and one of 3 steps resumed to 6 (the same compiled step)."""
  root = tmp_path_factory.mktemp("ae")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  final = train_lib.train(ae_config(), straight)
  train_lib.train(ae_config(**{"training.num_steps": 3}), resumed)
  train_lib.train(ae_config(), resumed)
  return straight, resumed, final


def _restore(workdir):
  config = ae_config()
  target = train_lib.abstract_state(config, image_shape=(16, 16, 1), mesh=train_lib.create_mesh())
  return checkpoints.restore(checkpoints.create_manager(workdir, read_only=True), target)


def test_training_logs_reconstructs_and_lowers_the_loss(runs):
  straight, _, final = runs
  assert int(final.step) == 6 and final.disc_params is not None
  steps, rec = run_lib.read_scalars(os.path.join(straight, "train"), "reconstruction")
  assert list(steps) == [1, 2, 3, 4, 5, 6] and rec[-1] < 0.8 * rec[0]
  for tag in ("kl", "g_loss", "d_loss", "adaptive_weight", "holdout_psnr"):
    values = run_lib.read_scalars(os.path.join(straight, "train"), tag)[1]
    assert np.all(np.isfinite(values)), tag
  d_loss = run_lib.read_scalars(os.path.join(straight, "train"), "d_loss")[1]
  assert np.all(d_loss > 0)
  psnr = run_lib.read_scalars(os.path.join(straight, "train"), "holdout_psnr")[1]
  assert len(psnr) == 2 and psnr[1] > psnr[0]
  pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(straight, "samples", "*.png")))
  assert pngs == ["reconstructions_step_00000003.png", "reconstructions_step_00000006.png"]


def test_resume_is_bit_identical(runs):
  straight, resumed, _ = runs
  (a, step_a), (b, step_b) = _restore(straight), _restore(resumed)
  assert step_a == step_b == 6
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  assert max(jax.tree.leaves(diffs)) == 0.0
  assert jax.tree.structure(a.disc_opt_state) == jax.tree.structure(b.disc_opt_state)


def test_a_different_discriminator_does_not_resume(runs):
  _, resumed, _ = runs
  with pytest.raises(checkpoints.CheckpointError, match=r"autoencoder_loss\.disc_ch: saved 8, now 16"):
    train_lib.train(ae_config(**{"autoencoder_loss.disc_ch": 16, "training.num_steps": 7}), resumed)


def test_load_autoencoder_reads_a_trained_workdir_and_sample_reconstructs(runs, tmp_path):
  straight, _, final = runs
  model, params, description = pretrained.load_autoencoder(straight)
  assert description["step"] == 6 and model.out_channels == 1 and model.downsampling_factor == 2
  same = jax.tree.map(lambda p, e: bool(np.array_equal(p, np.asarray(e))), params, final.ema_params)
  assert all(jax.tree.leaves(same))
  posterior = model.apply({"params": params}, jnp.zeros((1, 16, 16, 1)), method=model.encode)
  assert posterior.mean.shape == (1, 8, 8, 2)
  path = tasks.reconstruct(ae_config(), straight)
  with np.load(path + ".npz") as result:
    assert result["inputs"].shape == result["reconstructions"].shape == (8, 16, 16, 1)
    assert np.all(np.isfinite(result["psnr"])) and np.mean(result["psnr"]) > 5
  with pytest.raises(FileNotFoundError, match="is not a KL autoencoder"):
    pretrained.load_autoencoder(str(tmp_path))


def test_eval_records_psnr_rfid_and_lpips_of_held_out_reconstructions(runs, tmp_path, monkeypatch):
  straight, _, _ = runs
  monkeypatch.setattr(inception, "FeatureExtractor", PixelFeatures)
  monkeypatch.setattr(inception, "load_variables", lambda path: None)
  shapes = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1, 16, 16, 3)))["params"]
  rng = np.random.default_rng(0)
  lpips_params = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32) * 0.05, shapes)
  lpips_lib.save_params(str(tmp_path / "lpips.npz"), lpips_params)
  config = ae_config(**{"eval.num_samples": 12, "eval.batch_size": 8, "eval.step": 6,
                        "autoencoder_loss.lpips_path": str(tmp_path / "lpips.npz")})
  (record,) = tasks.AUTOENCODER_MODES["eval"](config, straight)
  assert record["step"] == 6 and record["num_images"] == 12 and record["holdout"] == "digits:train[1000:]"
  # The same figures from the reconstructions of the same 12 held-out images, computed here.
  model, params, _ = pretrained.load_autoencoder(straight)
  images = tasks.holdout_images(ae_config(**{"sample.num": 12}))
  x_hat, psnr = tasks.make_reconstruct(model, train_lib.create_mesh())(params, images)
  assert record["psnr"] == pytest.approx(float(np.mean(psnr)), rel=1e-5)
  features = lambda a: PixelFeatures(None, mesh=None, batch_size=8)(a)["pool3"].astype(np.float64)
  recon, orig = features(writers.to_uint8(x_hat)), features(writers.to_uint8(images))
  rfid = fid.frechet_distance(recon.mean(0), np.cov(recon, rowvar=False), orig.mean(0),
                              np.cov(orig, rowvar=False))
  assert record["rfid"] == pytest.approx(rfid, rel=1e-4) and record["rfid"] > 0
  lpips = lpips_lib.LPIPS().apply({"params": lpips_params}, jnp.clip(x_hat, -1, 1), images)
  assert record["lpips"] == pytest.approx(float(jnp.mean(lpips)), rel=1e-4) and record["lpips"] > 0
  assert evaluate_lib.read_metrics(os.path.join(straight, "eval", "metrics.jsonl")) == [record]
  steps, values = run_lib.read_scalars(os.path.join(straight, "eval"), "rfid/n12")
  assert list(steps) == [6] and values[0] == pytest.approx(record["rfid"], rel=1e-6)
  assert tasks.AUTOENCODER_MODES["eval"](config, straight) == []  # Already evaluated: skipped.


@pytest.mark.parametrize("key,value,message", [
    ("autoencoder_loss.lpips_weight", 0.1, r"config\.autoencoder_loss\.lpips_path='/nonexistent/l\.npz' does not exist"),
    ("autoencoder_loss.disc_start", -1, r"config\.autoencoder_loss\.disc_start=-1 must be"),
    ("autoencoder_loss.reconstruction", "l3", r"config\.autoencoder_loss\.reconstruction='l3' is not one of l1, l2"),
    ("model.autoencoder.groups", 3, r"config\.model\.autoencoder\.groups=3 does not divide"),
])
def test_bad_input_names_the_key_before_anything_is_written(tmp_path, key, value, message):
  config = ae_config(**{key: value, "autoencoder_loss.lpips_path": "/nonexistent/l.npz"})
  with pytest.raises(ValueError, match=message):
    config_check.validate_config(config, device_count=8, process_count=1)
  with pytest.raises(ValueError, match=message):
    train_lib.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
