"""Stable Diffusion from a diffusers folder, without torch: scheduler mapping, conversion, prompts.

A tiny random diffusers-format folder (UNet, autoencoder, CLIP text encoder and tokenizer, DDIM
scheduler with SD's config) is written here with safetensors' numpy API, converted by
scripts/convert_stable_diffusion.py and sampled from prompts through --mode=sample's function. Parity
with diffusers' own StableDiffusionPipeline is tests/test_reference_sd_pipeline.py.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from configs import default as default_config
from configs import stable_diffusion
from diffusion import grids
from diffusion import schedules
from models import autoencoder
from tests import test_autoencoder
from tests import test_clip
from tests import test_sd_unet
from training import config_check
from training import generate
from training import sample as sample_lib
from training import spaces
from training import text as text_lib
from training import train as train_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import convert_clip  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_unet  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_vae  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_stable_diffusion  # pylint: disable=g-import-not-at-top,wrong-import-position

# The scheduler_config.json of SD 1.5 (a PNDMScheduler's, read by DDIM alike) and of SD 2.1.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_SCHEDULER = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")
UNET = dict(test_sd_unet.TINY, norm_num_groups=8)
VAE = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4, groups=4)  # Factor 2: 16 px.
TEXT = dict(test_clip.TINY, vocab_size=len(test_clip.VOCAB), max_position_embeddings=77)


def _schedule(scheduler):
  d = convert_stable_diffusion.scheduler_config(scheduler)["diffusion"]
  return schedules.create_schedule(schedule=d["schedule"], num_timesteps=d["num_timesteps"],
                                   beta_start=d["beta_start"], beta_end=d["beta_end"],
                                   model_time=d["model_time"])


@pytest.mark.parametrize("scheduler", [SD15_SCHEDULER, SD21_SCHEDULER], ids=["sd15", "sd21"])
def test_ddim_grid_equals_diffusers_set_timesteps(scheduler):
  mapped = convert_stable_diffusion.scheduler_config(scheduler)
  s = mapped["sample"]
  assert (s["grid"], s["steps_offset"], s["set_alpha_to_one"]) == ("leading", 1, False)
  assert mapped["diffusion"]["prediction"] == ("v" if scheduler is SD21_SCHEDULER else "eps")
  schedule = _schedule(scheduler)
  # diffusers: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2; DDIMScheduler.set_timesteps(50)
  # with "leading" spacing and steps_offset 1 gives 981, 961, ..., 1; its last step ends at
  # alphas_cumprod[0] (set_alpha_to_one=False).
  alphas_cumprod = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
  expected = np.arange(49, -1, -1) * 20 + 1
  t = np.asarray(grids.scheduler_grid("leading", schedule, 50, steps_offset=1, set_alpha_to_one=False))
  np.testing.assert_array_equal(np.round(np.asarray(schedule.model_time(t[:-1]))).astype(int), expected)
  alpha, _ = schedule.alpha_sigma(t)
  np.testing.assert_allclose(np.asarray(alpha) ** 2, alphas_cumprod[list(expected) + [0]], rtol=1e-5)
  # The other spacings of diffusers 0.42's DDIMScheduler (no offset): trailing and linspace.
  for spacing, indices in (("trailing", np.arange(999, 0, -20)),
                           ("linspace", np.round(np.linspace(0, 999, 50))[::-1].astype(int))):
    t = np.asarray(grids.scheduler_grid(spacing, schedule, 50))
    np.testing.assert_array_equal(np.round(np.asarray(schedule.model_time(t[:-1]))).astype(int), indices)
    assert t[-1] == 0.0


def test_scheduler_values_it_cannot_map_are_refused_by_name():
  for field, value in (("beta_schedule", "squaredcos_cap_v2"), ("prediction_type", "flow"),
                       ("timestep_spacing", "karras"), ("clip_sample", True)):
    with pytest.raises(ValueError, match=f"scheduler_config.json: {field}={value!r} is not one of"):
      convert_stable_diffusion.scheduler_config(dict(SD15_SCHEDULER, **{field: value}))
  with pytest.raises(ValueError, match="trained_betas"):
    convert_stable_diffusion.scheduler_config(dict(SD15_SCHEDULER, trained_betas=[0.1] * 1000))
  with pytest.raises(ValueError, match="config.sample.steps_offset=1 shifts the 'leading' grid only"):
    grids.scheduler_grid("trailing", _schedule(SD15_SCHEDULER), 10, steps_offset=1)


def _torch_layout(value, kind):
  """Our kernel as torch holds it: conv [kh, kw, in, out] -> [out, in, kh, kw], dense [in, out] -> [out, in]."""
  if kind == "conv" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  return value.T if kind == "dense" and value.ndim == 2 else value


def _random_leaf(rng, path, shape):
  """Kernels N(0, 1 / fan_in), norm scales near 1, small biases and embeddings."""
  scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if path.endswith("kernel") else 0.1
  return rng.normal(size=shape) * scale + path.endswith("scale")


def _save_component(directory, weights, config, weights_name):
  os.makedirs(directory)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
            os.path.join(directory, weights_name))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


def _flat_shapes(module, *args):
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  return {"/".join(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def write_sd_folder(folder, *, scheduler=SD15_SCHEDULER, hub_prefix=True, seed=0, channels=3, unet=UNET,
                    text=TEXT):
  """A diffusers-format SD folder of tiny random components (16 px images of the given channels, 8x8x4
  latents), torch's layout and names written with numpy (the converters' name tables read backwards)."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, f)
  # unet/: the table lists every parameter with diffusers' full key.
  unet_config = dict(unet, _class_name="UNet2DConditionModel", sample_size=8)
  kwargs = convert_diffusers_unet.module_kwargs(unet_config)
  shapes = convert_diffusers_unet.parameter_shapes(kwargs)
  weights = {theirs: _torch_layout(_random_leaf(rng, ours, shapes[ours]), kind)
             for ours, theirs, kind in convert_diffusers_unet.name_table(kwargs, shapes)}
  _save_component(os.path.join(folder, "unet"), weights, unet_config, convert_diffusers_unet.WEIGHTS)
  # vae/ and text_encoder/: the tables list modules; their leaves are kernel/embedding/scale and bias.
  leaf_names = {"conv": ("kernel", "bias"), "dense": ("kernel", "bias"), "norm": ("scale", "bias"),
                "embed": ("embedding",)}
  torch_names = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

  def module_weights(table, shapes):
    return {f"{theirs}.{torch_names[leaf]}": _torch_layout(
        _random_leaf(rng, f"{ours}/{leaf}", shapes[f"{ours}/{leaf}"]), kind)
            for ours, theirs, kind in table for leaf in leaf_names[kind]}

  vae_config = dict(test_autoencoder._diffusers_config(VAE), in_channels=channels, out_channels=channels)  # pylint: disable=protected-access
  vae_kwargs = convert_diffusers_vae.module_kwargs(vae_config)
  vae_shapes = _flat_shapes(autoencoder.AutoencoderKL(**vae_kwargs),
                            jax.ShapeDtypeStruct((1, 16, 16, channels), np.float32))
  _save_component(os.path.join(folder, "vae"), module_weights(convert_diffusers_vae.name_table(vae_kwargs), vae_shapes),
                  vae_config, convert_diffusers_vae.WEIGHTS)
  text_config = dict(text, model_type="clip_text_model", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     bos_token_id=0, eos_token_id=2, pad_token_id=1)
  text_kwargs = convert_clip.module_kwargs(text_config)
  weights = module_weights(convert_clip.name_table(text_kwargs), convert_clip.expected_shapes(text_kwargs))
  if hub_prefix:  # The hub's layout; transformers 5's save_pretrained writes the keys without it.
    weights = {"text_model." + k: v for k, v in weights.items()}
  _save_component(os.path.join(folder, "text_encoder"), weights, text_config, "model.safetensors")
  test_clip._tokenizer_folder(os.path.join(folder, "tokenizer"), pad="<|endoftext|>")  # pylint: disable=protected-access
  os.makedirs(os.path.join(folder, "scheduler"))
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler, f)
  return str(folder)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd")
  folder = write_sd_folder(str(root / "diffusers"))
  convert_stable_diffusion.convert(folder, str(root / "run"))
  return str(root / "run")


def test_conversion_refuses_incomplete_and_pickled_folders_before_writing(tmp_path):
  folder = str(tmp_path / "folder")
  os.makedirs(os.path.join(folder, "unet"))
  with pytest.raises(FileNotFoundError, match=r"folder/model_index\.json does not exist"):
    convert_stable_diffusion.convert(folder, str(tmp_path / "out"))
  for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
               "vae/config.json", "text_encoder/config.json"):
    os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
      f.write("{}")
  open(os.path.join(folder, "unet", "diffusion_pytorch_model.bin"), "w").close()
  with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model\.bin is a pickled checkpoint.*hf download"):
    convert_stable_diffusion.convert(folder, str(tmp_path / "out"))
  open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "w").close()
  with pytest.raises(FileNotFoundError, match=r"vae/diffusion_pytorch_model\.safetensors does not exist"):
    convert_stable_diffusion.convert(folder, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def _sd_config(workdir, **sample):
  config = stable_diffusion.get_config(workdir)
  config.sample.update(dict(dict(steps=3, num=4, batch_size=4), **sample))
  return config


def test_converted_workdir_config_and_prompt_sampling_with_metadata(converted, tmp_path):
  config = stable_diffusion.get_config(converted)
  assert (config.model.name, config.data.image_size, config.diffusion.schedule) == ("sd_unet", 16, "scaled_linear")
  assert config.model.pretrained == os.path.join(converted, "unet")
  assert (config.sample.steps_offset, config.sample.set_alpha_to_one, config.latent.scale_factor) == (1, False, 0.13025)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("hello world\n\nwörld, hello!\n")
  path = sample_lib.sample(_sd_config(converted, prompts_file=str(prompts), negative_prompt="hello",
                                      guidance_scale=7.5, seed=3), converted)
  assert os.path.basename(path) == "pretrained_ddim_3steps_w7.5_seed3"
  npz = np.load(path + ".npz")
  assert npz["images"].shape == (4, 16, 16, 3)
  assert list(npz["prompts"]) == ["hello world", "wörld, hello!"] * 2
  # Same prompt, same seed per image column: images 0 and 2 differ only by their starting noise.
  assert not np.array_equal(npz["images"][0], npz["images"][2])
  text = Image.open(path + ".png").text
  assert text["prompt"] == "hello world\nwörld, hello!" and text["negative_prompt"] == "hello"
  assert (text["sampler"], text["steps"], text["guidance_scale"], text["seed"]) == ("ddim", "3", "7.5", "3")
  assert text["checkpoint"] == os.path.join(converted, "unet")
  assert json.loads(str(npz["settings"]))["negative_prompt"] == "hello"


def test_prompt_seed_and_scale_do_not_recompile_and_scale_0_is_the_negative_prompt(converted):
  config = _sd_config(converted, guidance_scale=7.5)
  mesh = train_lib.create_mesh()
  trained, params, model, schedule, image_shape = sample_lib._pretrained_run(config, mesh)  # pylint: disable=protected-access
  encoder = text_lib.create_text_encoder(trained)
  sampler = generate.Sampler.from_config(trained, model=model, schedule=schedule, mesh=mesh,
                                         image_shape=image_shape,
                                         space=spaces.space_for_run(trained, image_shape))

  def draw(prompt, *, negative="", scale, seed=0):
    cond, null = encoder.prompt_cond([prompt], negative_prompt=negative, num=2)
    return sampler.sample(params, seed=seed, num=2, cond=cond, null=null, guidance_scale=scale)[0]

  a = draw("hello", scale=7.5)
  b = draw("world", negative="hello world", scale=3.0, seed=1)
  assert sampler._sample_batch._cache_size() == 1  # pylint: disable=protected-access
  assert not np.array_equal(a, b)
  # w = 0 is the unconditional half alone, the negative prompt's; with the negative prompt equal to
  # the prompt, any w gives that prompt's conditional sample.
  negative = draw("hello", negative="world", scale=0.0)
  same = draw("world", negative="world", scale=7.5)
  assert sampler._sample_batch._cache_size() == 1  # pylint: disable=protected-access
  assert np.abs(negative.astype(int) - same.astype(int)).max() <= 1
  assert np.abs(negative.astype(int) - a.astype(int)).max() > 1


def test_prompt_errors_name_the_keys(tmp_path):
  config = default_config.get_config()
  config.sample.prompt = "a cat"
  with pytest.raises(ValueError, match=r"config\.sample\.prompt is given, but the model has no text conditioning"):
    config_check.validate_prompts(config, context_width=None)
  config.model.name = "sd_unet"
  config.text.encoder = "enc"
  with pytest.raises(ValueError, match=r"width 1024, but config\.model\.sd_unet\.cross_attention_dim=768"):
    config_check.validate_prompts(config, context_width=1024)
  config.sample.prompt = None
  config.sample.prompts_file = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match=r"config\.sample\.prompts_file=.*missing\.txt' does not exist"):
    config_check.read_prompts(config.sample)
