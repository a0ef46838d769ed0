"""Optional: the converted SD UNet against diffusers' PyTorch UNet2DConditionModel with the same weights.

Runs where torch and diffusers import (requirements-reference.txt). Small randomly initialised
UNet2DConditionModels with SD 1.x's options (attention_head_dim as heads, 1x1-convolution projections)
and SD 2.x's (heads of a fixed width, linear projections, upcast attention) are saved with
save_pretrained, converted by scripts/convert_diffusers_unet.py (numpy only), and both predict for the
same latents, times and context.
"""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_env  # pylint: disable=g-bad-import-order

torch = reference_env.import_torch()
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_unet  # pylint: disable=g-import-not-at-top,wrong-import-position

ATOL = 1e-4
COMMON = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
CASES = {
    # SD 1.x: attention_head_dim is the number of heads (4 at every width); 1x1-convolution projections.
    "sd1": dict(COMMON, attention_head_dim=4, cross_attention_dim=24, in_channels=4),
    # SD 2.x: heads of 16 channels (2, 4, 4), linear projections, float32 scores; SD-inpainting's 9 inputs.
    "sd2": dict(COMMON, attention_head_dim=(2, 4, 4), cross_attention_dim=40, use_linear_projection=True,
                upcast_attention=True, in_channels=9),
}


def _save_random_unet(directory, spec):
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**spec)
  with torch.no_grad():  # Non-trivial norms and biases, so that a transposed or swapped weight shows.
    for name, p in unet.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  unet.eval()
  unet.save_pretrained(directory, safe_serialization=True)
  return unet


@pytest.mark.parametrize("name", list(CASES))
def test_converted_unet_matches_diffusers(tmp_path, name):
  spec = CASES[name]
  unet = _save_random_unet(tmp_path / "unet", spec)
  description = convert_diffusers_unet.convert(str(tmp_path / "unet"), str(tmp_path / "converted"))
  assert description["kwargs"]["use_linear_projection"] == spec.get("use_linear_projection", False)
  model, params, _ = pretrained.load_sd_unet(str(tmp_path / "converted"))
  assert model.upcast_attention == spec.get("upcast_attention", False)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, spec["in_channels"])).astype(np.float32)
  t = np.array([3.0, 901.0], np.float32)
  context = rng.normal(size=(2, 7, spec["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    ref = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
               encoder_hidden_states=torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
  ours = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), {"context": jnp.asarray(context)})
  assert ours.shape == (2, 16, 16, 4)
  assert np.abs(ref).mean() > 0.1  # A real output, not a near-zero one that any model would match.
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)

  if name == "sd2":  # SD-inpainting's layout: 4 latent channels, the other 5 through cond["concat"].
    joined = model.apply({"params": params}, jnp.asarray(x[..., :4]), jnp.asarray(t),
                         {"context": jnp.asarray(context), "concat": jnp.asarray(x[..., 4:])})
    np.testing.assert_allclose(joined, ref, atol=ATOL, rtol=ATOL)


def test_bad_folders_are_refused_with_the_reason(tmp_path):
  _save_random_unet(tmp_path / "unet", CASES["sd1"])
  path = tmp_path / "unet" / convert_diffusers_unet.WEIGHTS
  weights = safetensors_numpy.load_file(str(path))
  del weights["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  safetensors_numpy.save_file(weights, str(path))
  with pytest.raises(KeyError, match=r"up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"):
    convert_diffusers_unet.convert(str(tmp_path / "unet"), str(tmp_path / "converted"))
  assert not (tmp_path / "converted").exists()

  os.rename(path, tmp_path / "unet" / "diffusion_pytorch_model.bin")
  with pytest.raises(ValueError, match=r"pickled.*safetensors"):
    convert_diffusers_unet.convert(str(tmp_path / "unet"), str(tmp_path / "converted"))

  config_path = tmp_path / "unet" / "config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
  with pytest.raises(ValueError, match=r"addition_embed_type='text_time'"):
    convert_diffusers_unet.convert(str(tmp_path / "unet"), str(tmp_path / "converted"))
