"""Optional: the converted autoencoder against diffusers' PyTorch AutoencoderKL with the same weights.

Runs where torch and diffusers import (requirements-reference.txt). A small randomly initialised
diffusers AutoencoderKL of SD's architecture is saved with save_pretrained, converted by
scripts/convert_diffusers_vae.py (numpy only), and both encode and decode the same images.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_env  # pylint: disable=g-bad-import-order

torch = reference_env.import_torch()
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_vae  # pylint: disable=g-import-not-at-top,wrong-import-position

# Downsampling 4 (three levels, SD's layout at a smaller width) and 8 (four levels, as SD 1.x-XL).
CONFIGS = {
    "f4": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=3),
    "f8": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
               latent_channels=4, scaling_factor=0.13025),
}


def _save_random_vae(directory, spec):
  torch.manual_seed(0)
  levels = len(spec["block_out_channels"])
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                                up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32, **spec)
  with torch.no_grad():  # Non-trivial norms and biases, so that a transposed or swapped weight shows.
    for name, p in vae.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  vae.eval()
  vae.save_pretrained(directory, safe_serialization=True)
  return vae


def _rename_to_old_attention_names(directory):
  path = os.path.join(directory, convert_diffusers_vae.WEIGHTS)
  weights = safetensors_numpy.load_file(path)
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  out = {}
  for key, value in weights.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    out[key] = value
  assert any(".query." in k for k in out)
  safetensors_numpy.save_file(out, path)


@pytest.mark.parametrize("attention_names", ["current", "old"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_vae_matches_diffusers(tmp_path, name, attention_names):
  vae = _save_random_vae(tmp_path / "vae", CONFIGS[name])
  if attention_names == "old":
    _rename_to_old_attention_names(tmp_path / "vae")
  description = convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "converted"))
  assert description["scaling_factor"] == CONFIGS[name].get("scaling_factor", 0.18215)
  model, params, _ = pretrained.load_autoencoder(str(tmp_path / "converted"))
  factor = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
  assert model.downsampling_factor == factor

  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    mean_ref = dist.mean.permute(0, 2, 3, 1).numpy()
    logvar_ref = dist.logvar.permute(0, 2, 3, 1).numpy()
    z = torch.from_numpy(np.random.default_rng(1).normal(size=mean_ref.shape).astype(np.float32))
    decoded_ref = vae.decode(z.permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

  posterior = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
  assert posterior.mean.shape == (2, 32 // factor, 32 // factor, CONFIGS[name]["latent_channels"])
  np.testing.assert_allclose(posterior.mean, mean_ref, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(posterior.logvar, logvar_ref, atol=1e-5, rtol=1e-4)
  decoded = model.apply({"params": params}, jnp.asarray(z.numpy()), method=model.decode)
  np.testing.assert_allclose(decoded, decoded_ref, atol=1e-5, rtol=1e-4)


def test_a_weight_missing_from_the_file_is_named(tmp_path):
  _save_random_vae(tmp_path / "vae", CONFIGS["f4"])
  path = tmp_path / "vae" / convert_diffusers_vae.WEIGHTS
  weights = safetensors_numpy.load_file(str(path))
  del weights["decoder.mid_block.attentions.0.to_k.weight"]
  safetensors_numpy.save_file(weights, str(path))
  with pytest.raises(KeyError, match=r"decoder\.mid_block\.attentions\.0\.to_k\.weight"):
    convert_diffusers_vae.convert(str(tmp_path / "vae"), str(tmp_path / "converted"))
  assert not (tmp_path / "converted").exists()
