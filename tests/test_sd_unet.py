"""Stable Diffusion's conditional UNet (models/sd_unet.py): parameter counts, shapes, use of the context."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import default as default_config
from models import dit
from models import sd_unet
from training import config_check

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _count(model, *, cross_attention_dim):
  # 8x8 latents: the parameters do not depend on the size, and tracing a small one is quicker.
  cond = {"context": jnp.zeros((1, 1, cross_attention_dim))}
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, model.in_channels)),
                          jnp.zeros((1,)), cond)
  return models.count_params(shapes["params"])


def test_parameter_counts_equal_diffusers_for_sd15_and_sd21():
  # diffusers 0.42.1's UNet2DConditionModel from the SD 1.5 and 2.1 unet/config.json, counted with
  # sum(p.numel() for p in unet.parameters()).
  config = default_config.get_config()
  config.model.name = "sd_unet"
  model = models.create_model(config.model)  # The defaults are SD 1.5's.
  assert isinstance(model, sd_unet.SDUNet)
  assert _count(model, cross_attention_dim=768) == 859_520_964
  sd21 = sd_unet.SDUNet(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                        use_linear_projection=True, upcast_attention=True)
  assert _count(sd21, cross_attention_dim=1024) == 865_910_724


def _random_params(shapes, *, seed):
  """Random parameters of these shapes: kernels N(0, 1 / fan_in), norm scales near 1, small biases.

  (Compiling flax's initialisers for a whole UNet costs XLA:CPU far more than the forward pass.)
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
    return jnp.asarray((name == "scale") + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
  """{in_channels: (model, params, jitted apply)} of a two-level UNet; the 9 come as 4 + cond["concat"]."""
  out = {}
  for channels in (4, 9):
    model = sd_unet.SDUNet(in_channels=channels, **TINY)
    cond = {"context": jnp.zeros((1, 5, 16))}
    if channels == 9:
      cond["concat"] = jnp.zeros((1, 16, 16, 5))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)),
                            cond)["params"]
    params = _random_params(shapes, seed=channels)
    out[channels] = (model, params, jax.jit(lambda p, x, t, c, m=model: m.apply({"params": p}, x, t, c)))
  return out


def test_output_shapes_with_4_and_9_input_channels(tiny):
  rng = np.random.default_rng(0)
  context = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  t = jnp.array([10.0, 900.0])
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
  _, params4, apply4 = tiny[4]
  assert params4["conv_in"]["kernel"].shape == (3, 3, 4, 32)
  assert apply4(params4, x, t, {"context": context}).shape == (2, 16, 16, 4)
  model9, params9, apply9 = tiny[9]
  assert params9["conv_in"]["kernel"].shape == (3, 3, 9, 32)
  # SD-inpainting: the latents and 5 channels of mask and masked-image latents in cond["concat"].
  concat = jnp.asarray(rng.normal(size=(2, 16, 16, 5)), jnp.float32)
  out = apply9(params9, x, t, {"context": context, "concat": concat})
  assert out.shape == (2, 16, 16, 4) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match=r"in_channels=9"):
    model9.apply({"params": params9}, x, t, {"context": context})


def test_cross_attention_reads_the_context_of_its_own_example(tiny):
  _, params, apply = tiny[4]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
  t = jnp.array([500.0, 500.0])
  context = rng.normal(size=(2, 5, 16)).astype(np.float32)
  base = np.asarray(apply(params, x, t, {"context": jnp.asarray(context)}))
  changed = context.copy()
  changed[1] = rng.normal(size=(5, 16))
  out = np.asarray(apply(params, x, t, {"context": jnp.asarray(changed)}))
  np.testing.assert_allclose(out[0], base[0], atol=1e-5)  # Example 0's context is unchanged.
  assert np.abs(out[1] - base[1]).mean() > 1e-3 * np.abs(base[1]).mean()
  # Permuting the context tokens changes nothing: attention has no order without position embeddings.
  permuted = np.asarray(apply(params, x, t, {"context": jnp.asarray(context[:, ::-1])}))
  np.testing.assert_allclose(permuted, base, atol=1e-4)
  later = np.asarray(apply(params, x, jnp.array([500.0, 900.0]), {"context": jnp.asarray(context)}))
  np.testing.assert_allclose(later[0], base[0], atol=1e-5)
  assert np.abs(later[1] - base[1]).mean() > 1e-3 * np.abs(base[1]).mean()


def test_bad_conditioning_is_named(tiny):
  model, params, _ = tiny[4]
  x, t = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,))
  with pytest.raises(ValueError, match=r"cross_attention_dim=16"):
    model.apply({"params": params}, x, t, {"context": jnp.zeros((1, 5, 768))})
  with pytest.raises(ValueError, match=r"needs cond\['context'\]"):
    model.apply({"params": params}, x, t, None)
  with pytest.raises(TypeError, match=r"cond as a dict"):
    model.apply({"params": params}, x, t, jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r"not divisible by 2"):
    model.apply({"params": params}, jnp.zeros((1, 15, 15, 4)), t, {"context": jnp.zeros((1, 5, 16))})


def test_attention_is_multi_head_softmax_attention_to_the_context():
  """Attention(heads=2) against softmax(q k^T / sqrt(d)) v per head, written out in numpy."""
  layer = sd_unet.Attention(heads=2)
  rng = np.random.default_rng(2)
  x, context = rng.normal(size=(1, 6, 8)).astype(np.float32), rng.normal(size=(1, 3, 5)).astype(np.float32)
  params = layer.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(context))["params"]
  q, k, v = (a @ np.asarray(params[n]["kernel"]) for a, n in ((x[0], "to_q"), (context[0], "to_k"),
                                                             (context[0], "to_v")))
  heads = []
  for h in range(2):
    s = q[:, 4 * h:4 * h + 4] @ k[:, 4 * h:4 * h + 4].T / math.sqrt(4)
    p = np.exp(s - s.max(-1, keepdims=True))
    heads.append(p / p.sum(-1, keepdims=True) @ v[:, 4 * h:4 * h + 4])
  expected = np.concatenate(heads, -1) @ np.asarray(params["to_out_0"]["kernel"]) + params["to_out_0"]["bias"]
  out = layer.apply({"params": params}, jnp.asarray(x), jnp.asarray(context))
  np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_time_embedding_is_sds_flipped_sinusoids():
  """diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0: cos then sin."""
  t = np.array([0.0, 1.0, 999.0])
  freqs = np.exp(-math.log(10000.0) * np.arange(160) / 160)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(dit.timestep_embedding(jnp.asarray(t), 320), expected, atol=1e-4)


def test_heads_follow_diffusers_attention_head_dim():
  assert sd_unet.heads_per_block(8, 4) == (8, 8, 8, 8)  # SD 1.x: eight heads of 40 to 160 channels.
  assert sd_unet.heads_per_block([5, 10, 20, 20], 4) == (5, 10, 20, 20)  # SD 2.x: heads of 64 channels.
  with pytest.raises(ValueError, match=r"attention_head_dim"):
    sd_unet.heads_per_block((8, 8), 4)


@pytest.mark.parametrize("key,value,message", [
    ("attention_head_dim", (8, 8, 7, 8), r"7 heads do not divide the 1280"),
    ("down_block_types", ("CrossAttnDownBlock2D",) * 4 + ("DownBlock2D",), r"must have 4 entries"),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), r"CrossAttnUpBlock2D"),
    ("norm_num_groups", 24, r"norm_num_groups=24 does not divide"),
])
def test_config_check_names_the_sd_unet_key(key, value, message):
  config = default_config.get_config()
  config.model.name = "sd_unet"
  config_check.validate_model(config.model, image_size=32)  # The defaults pass.
  config.model.sd_unet[key] = value
  with pytest.raises(ValueError, match=rf"config\.model\.sd_unet\.{key}.*{message}|{message}"):
    config_check.validate_model(config.model, image_size=32)
