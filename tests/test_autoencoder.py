"""The KL autoencoder: shapes for downsampling 4 and 8, the posterior's maths, and the diffusers converter.

The converter's parity with diffusers' own AutoencoderKL is tests/test_reference_vae.py (optional env);
here it is tested without torch, on a diffusers-named state dict written with safetensors' numpy API.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from models import autoencoder
from models import pretrained

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import convert_diffusers_vae  # pylint: disable=g-import-not-at-top,wrong-import-position

F4 = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=3, groups=4)
F8 = dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=4, groups=4)


@pytest.mark.parametrize("kwargs,factor", [(F4, 4), (F8, 8)])
def test_encode_decode_shapes(kwargs, factor):
  model = autoencoder.AutoencoderKL(**kwargs)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # Shapes only: nothing compiles.
  encode = lambda p, x: model.apply({"params": p}, x, method=model.encode)
  mean, logvar = jax.eval_shape(lambda p, x: (encode(p, x).mean, encode(p, x).logvar), params, x)
  latent_shape = (2, 16 // factor, 16 // factor, kwargs["latent_channels"])
  assert model.downsampling_factor == factor
  assert mean.shape == logvar.shape == latent_shape
  recon = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, jax.random.key(1))[0], params, x)
  assert recon.shape == x.shape and recon.dtype == jnp.float32


def test_kl_matches_the_closed_form_and_a_monte_carlo_estimate():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  logvar = rng.normal(scale=0.5, size=mean.shape).astype(np.float32)
  q = autoencoder.DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  var = np.exp(logvar.astype(np.float64))
  closed = 0.5 * np.sum(mean.astype(np.float64) ** 2 + var - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(q.kl(), closed, rtol=1e-6)
  # KL = E_q[log q(z) - log N(z; 0, I)], estimated from reparameterised samples.
  z = jax.vmap(q.sample)(jax.random.split(jax.random.key(0), 20000))
  log_q = -0.5 * (jnp.square(z - q.mean) / jnp.exp(q.logvar) + q.logvar + np.log(2 * np.pi))
  log_p = -0.5 * (jnp.square(z) + np.log(2 * np.pi))
  estimate = jnp.mean(jnp.sum(log_q - log_p, axis=(2, 3, 4)), axis=0)
  np.testing.assert_allclose(estimate, closed, rtol=0.03)
  assert float(autoencoder.DiagonalGaussian(jnp.zeros(3)[None], jnp.zeros(3)[None]).kl()[0]) == 0.0


def test_moments_split_into_mean_and_clipped_logvar():
  moments = jnp.concatenate([jnp.full((1, 2, 2, 4), 0.5), jnp.full((1, 2, 2, 4), 40.0)], axis=-1)
  q = autoencoder.DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(q.mode(), 0.5)
  np.testing.assert_array_equal(q.logvar, 20.0)  # Stable Diffusion clips the log-variance to [-30, 20].


def _diffusers_files(directory, kwargs, seed=0):
  """A diffusers-layout vae/ folder whose weights are our random params under diffusers' names."""
  model = autoencoder.AutoencoderKL(**kwargs)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))["params"]
  params = jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(seed).normal(size=p.shape), params)
  weights = {}
  for ours, theirs, kind in convert_diffusers_vae.name_table(convert_diffusers_vae.module_kwargs(
      _diffusers_config(kwargs))):
    leaf = params
    for part in ours.split("/"):
      leaf = leaf[part]
    if kind == "conv":
      weights[theirs + ".weight"] = np.transpose(np.asarray(leaf["kernel"]), (3, 2, 0, 1))
    elif kind == "dense":
      weights[theirs + ".weight"] = np.asarray(leaf["kernel"]).T
    else:
      weights[theirs + ".weight"] = np.asarray(leaf["scale"])
    weights[theirs + ".bias"] = np.asarray(leaf["bias"])
  os.makedirs(directory)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
            os.path.join(directory, convert_diffusers_vae.WEIGHTS))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(_diffusers_config(kwargs), f)
  return model, params


def _diffusers_config(kwargs):
  levels = len(kwargs["ch_mult"])
  return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
          "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
          "block_out_channels": [kwargs["ch"] * m for m in kwargs["ch_mult"]],
          "layers_per_block": kwargs["num_res_blocks"], "latent_channels": kwargs["latent_channels"],
          "norm_num_groups": kwargs["groups"], "act_fn": "silu", "scaling_factor": 0.13025}


@pytest.mark.parametrize("kwargs", [F4, F8])
def test_converter_reads_every_weight_into_the_same_tree(tmp_path, kwargs):
  model, params = _diffusers_files(str(tmp_path / "vae"), kwargs)
  description = convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "out"))
  assert description["scaling_factor"] == 0.13025 and description["kwargs"]["ch_mult"] == list(kwargs["ch_mult"])
  loaded_model, loaded, _ = pretrained.load_autoencoder(str(tmp_path / "out"))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loaded, params)
  assert loaded_model == model  # The same module, so one compiled forward serves both parameter trees.
  x = jax.random.uniform(jax.random.key(3), (1, 16, 16, 3), minval=-1, maxval=1)
  forward = jax.jit(lambda p: model.apply({"params": p}, x)[0])
  np.testing.assert_allclose(forward(loaded), forward(params), rtol=1e-5, atol=1e-5)


def test_converter_errors_name_the_file_and_write_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
    convert_diffusers_vae.convert(str(tmp_path), str(tmp_path / "out"))
  _diffusers_files(str(tmp_path / "vae"), F4)
  path = tmp_path / "vae" / "config.json"
  config = json.loads(path.read_text())
  path.write_text(json.dumps({**config, "layers_per_block": 2}))  # More blocks than the file holds.
  with pytest.raises(KeyError, match=r"resnets\.1\.norm1\.weight"):
    convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "out"))
  path.write_text(json.dumps({**config, "mid_block_add_attention": False}))  # Attention weights left over.
  with pytest.raises(ValueError, match=r"have no place in the converted model"):
    convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  path.write_text(json.dumps(config))
  convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "out"))
  with pytest.raises(FileExistsError, match="exists already"):  # Never overwritten.
    convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="not a 'unet'"):
    pretrained.load(str(tmp_path / "out"), kind="unet")
