"""Optional: LoRA files against diffusers + PEFT (requirements-reference.txt; skipped without them).

A small random SD 1.x UNet2DConditionModel gets a PEFT LoRA (`unet.add_adapter(LoraConfig(...))`, B
random) saved with `save_lora_weights`; its base converted by scripts/convert_diffusers_unet.py, with
the file merged by training/lora.py, predicts what diffusers' adapted UNet predicts. Our saved file
loaded by diffusers gives diffusers the same adapted model.
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_env  # pylint: disable=g-bad-import-order

torch = reference_env.import_torch()
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from training import lora  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_unet  # pylint: disable=g-import-not-at-top,wrong-import-position

SPEC = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=24)


def _predict(unet, x, t, context):
  with torch.no_grad():
    return unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()


def test_diffusers_peft_lora_file_and_ours_agree_both_ways(tmp_path):
  from peft.utils import get_peft_model_state_dict  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**SPEC).eval()
  unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
  model, params, _ = pretrained.load_sd_unet(
      convert_diffusers_unet.convert(str(tmp_path / "unet"), str(tmp_path / "converted")) and
      str(tmp_path / "converted"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([3.0, 901.0], np.float32)
  context = rng.normal(size=(2, 5, 24)).astype(np.float32)
  base = _predict(unet, x, t, context)

  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
  unet.add_adapter(config)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  ref = _predict(unet, x, t, context)
  assert np.abs(ref - base).mean() > 0.01  # The adapter does something.
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / "theirs"), unet_lora_layers=get_peft_model_state_dict(unet),
      unet_lora_adapter_metadata=config.to_dict())
  merged = lora.merge_file(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"), {"unet": params})
  ours = model.apply({"params": merged["unet"]}, jnp.asarray(x), jnp.asarray(t), {"context": jnp.asarray(context)})
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

  # Ours -> diffusers: the adapters read back, saved in our writer's layout, loaded by diffusers.
  adapters = lora.read_file(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"), {"unet": params})
  path = str(tmp_path / "ours.safetensors")
  lora.save_file(path, adapters, rank=4, alpha=4.0)  # Scale 2 is folded into B: alpha = rank.
  fresh = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
  state_dict, alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(
      path, return_lora_metadata=True)
  diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, fresh, metadata=metadata)
  np.testing.assert_allclose(_predict(fresh, x, t, context), ref, atol=1e-4, rtol=1e-4)
