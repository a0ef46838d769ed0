"""Optional: a whole converted pipeline (prompt -> text encoder -> DDIM in latents -> image) against
diffusers' StableDiffusionPipeline with the same weights, prompts and initial latents.

Runs where torch, diffusers and transformers import (requirements-reference.txt). A small random
StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer of a
vocabulary built in the test, DDIMScheduler with SD 1.5's or 2.1's scheduler config) is saved with
save_pretrained, converted by scripts/convert_stable_diffusion.py and sampled by both with guidance 7.5
and a negative prompt. Both text-encoder layouts are converted: transformers 5's save_pretrained (keys
without `text_model.`, tokenizer.json only) and the hub's (`text_model.*`, vocab.json + merges.txt).
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
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
# pylint: disable=g-import-not-at-top,wrong-import-position
import convert_stable_diffusion
from configs import stable_diffusion
from tests import test_clip
from tests import test_reference_clip
from diffusion import schedules
from models import pretrained
from training import generate
from training import sharding
from training import spaces
from training import text as text_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

ATOL = 1e-3
STEPS = 10
PROMPTS = ["hello world", "world, hello!"]
NEGATIVE = "hello"
# SD 1.5's scheduler_config.json (2.1's adds prediction_type="v_prediction").
SD_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
                "clip_sample": False}


def _save_pipeline(folder, *, prediction_type, layout):
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
      cross_attention_dim=32, attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(test_clip.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=test_clip.BOS,
      eos_token_id=test_clip.EOS, pad_token_id=test_clip.EOS))
  with torch.no_grad():  # Non-trivial norms and biases, so that a transposed or swapped weight shows.
    for module in (unet, vae, text_encoder):
      for name, p in module.named_parameters():
        if name.endswith("bias") or "norm" in name:
          p.add_(0.1 * torch.randn_like(p))
  tokenizer_dir = test_reference_clip._sd_tokenizer_folder(  # pylint: disable=protected-access
      os.path.join(folder + "_tokenizer"), test_clip.VOCAB, test_clip.MERGES, 1)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  scheduler = diffusers.DDIMScheduler.from_config(
      dict(SD_SCHEDULER, prediction_type=prediction_type))
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.save_pretrained(folder, safe_serialization=True)
  text_dir = os.path.join(folder, "text_encoder")
  weights = safetensors_numpy.load_file(os.path.join(text_dir, "model.safetensors"))
  prefixed = all(k.startswith("text_model.") for k in weights)
  if layout == "hub":  # text_model.* keys, vocab.json + merges.txt.
    if not prefixed:
      weights = {"text_model." + k: v for k, v in weights.items()}
    tokenizer_out = os.path.join(folder, "tokenizer")
    for name in os.listdir(tokenizer_out):
      os.remove(os.path.join(tokenizer_out, name))
    for name in os.listdir(tokenizer_dir):
      with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(tokenizer_out, name), "wb") as dst:
        dst.write(src.read())
  elif prefixed:  # transformers 5's layout: no prefix.
    weights = {k[len("text_model."):]: v for k, v in weights.items()}
  safetensors_numpy.save_file(weights, os.path.join(text_dir, "model.safetensors"))
  return pipe.to(torch.float32)


@pytest.mark.parametrize("prediction_type,layout", [("epsilon", "transformers5"), ("v_prediction", "hub")],
                         ids=["sd15_eps_transformers5", "sd21_v_hub"])
def test_converted_pipeline_matches_diffusers(tmp_path, prediction_type, layout):
  folder = str(tmp_path / "diffusers")
  pipe = _save_pipeline(folder, prediction_type=prediction_type, layout=layout)
  tokenizer_files = set(os.listdir(os.path.join(folder, "tokenizer")))
  assert ("vocab.json" in tokenizer_files) == (layout == "hub")
  workdir = str(tmp_path / "run")
  convert_stable_diffusion.convert(folder, workdir)

  latents = np.random.default_rng(0).normal(size=(len(PROMPTS), 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    expected = pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS,
                    guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np").images

  # Sampling's parts built directly (training/sample.py's imports need the data readers, absent here).
  config = stable_diffusion.get_config(workdir)
  config.sample.update(steps=STEPS, guidance_scale=7.5, batch_size=len(PROMPTS))
  model, params, _ = pretrained.load_sd_unet(config.model.pretrained)
  d = config.diffusion
  schedule = schedules.create_schedule(schedule=d.schedule, num_timesteps=d.num_timesteps,
                                       beta_start=d.beta_start, beta_end=d.beta_end, model_time=d.model_time)
  image_shape = (8, 8, 4)
  encoder = text_lib.create_text_encoder(config)
  sampler = generate.Sampler.from_config(config, model=model, schedule=schedule, mesh=sharding.create_mesh(),
                                         image_shape=image_shape, space=spaces.space_for_run(config, image_shape))
  x_T = jnp.asarray(np.transpose(latents, (0, 2, 3, 1)))
  pad = sampler._padded_batch - len(PROMPTS)  # pylint: disable=protected-access
  x_T = jnp.concatenate([x_T, jnp.zeros((pad, *x_T.shape[1:]))])
  sampler._x_T = lambda labels, rng: x_T  # The same initial latents as diffusers'.  # pylint: disable=protected-access
  cond, null = encoder.prompt_cond(PROMPTS, negative_prompt=NEGATIVE, num=len(PROMPTS))
  extra = {"context": jnp.concatenate([cond["context"], jnp.zeros((pad, *cond["context"].shape[1:]))])}
  images = sampler._sample_batch(params, sampler._frozen, jnp.zeros((len(x_T),), jnp.int32),  # pylint: disable=protected-access
                                 jax.random.key(0), extra, null, jnp.float32(7.5), guided=True)
  ours = (np.asarray(images)[:len(PROMPTS)] + 1.0) / 2.0  # diffusers' (image / 2 + 0.5) in [0, 1].
  assert ours.shape == expected.shape == (len(PROMPTS), 16, 16, 3)
  assert np.abs(expected[0] - expected[1]).max() > 0.01  # The prompts steer the images.
  np.testing.assert_allclose(ours, expected, atol=ATOL)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["diffusion"]["prediction"] == {"epsilon": "eps", "v_prediction": "v"}[prediction_type]
