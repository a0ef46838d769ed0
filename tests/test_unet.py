"""Shapes, parameter counts and conditioning of the UNet."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from configs import default
from models import layers
from models.unet import UNet

# ch=8, two levels (16px and 8px), attention at 8px: small enough to run on CPU in seconds.
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _init_fn(model, x):
  t = jnp.zeros((x.shape[0],))
  # The "rbg" generator compiles several times faster than threefry on CPU.
  key = jax.random.key(0, impl="rbg")
  return lambda: model.init({"params": key}, x, t, train=False)["params"]


def _init(model, x):
  return jax.jit(_init_fn(model, x))()


def _param_shapes(model, x):
  return jax.eval_shape(_init_fn(model, x))


def _random_params(model, x, seed=0):
  """Parameters drawn N(0, 0.2^2), so zero-initialised output layers do not hide the rest."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), _param_shapes(model, x))


def _images(channels, batch=2, size=16):
  return jax.random.normal(jax.random.key(42), (batch, size, size, channels))


def test_timestep_embedding_values():
  emb = layers.timestep_embedding(jnp.array([0.0, 1.0, 2.5]), 4)
  # dim 4: frequencies 1 and 1/10000 (DDPM divides log(10000) by half - 1 = 1); sin half first.
  freqs = np.array([1.0, 1e-4])
  expected = np.stack([np.concatenate([np.sin(t * freqs), np.cos(t * freqs)]) for t in (0, 1, 2.5)])
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
  assert layers.timestep_embedding(jnp.array([3.0]), 7).shape == (1, 7)


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_matches_input(channels):
  model = UNet(**TINY)
  x = _images(channels)
  params = _init(model, x)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.array([1.0, 500.0]), train=False))(
      params, x)
  assert out.shape == x.shape
  assert out.dtype == x.dtype
  np.testing.assert_array_equal(out, 0.0)  # The output convolution starts at zero (DDPM).


def test_class_conditional():
  model = UNet(**TINY, num_classes=10)
  x = _images(3)
  params = _random_params(model, x)
  assert params["label_embed"]["embedding"].shape == (11, 32)  # num_classes + 1 ("null"), 4 ch.
  apply = jax.jit(lambda p, y: model.apply({"params": p}, x, jnp.array([3.0, 3.0]), {"label": y},
                                           train=False))
  out_a = apply(params, jnp.array([0, 1]))
  out_null = apply(params, jnp.array([10, 10]))
  out_none = jax.jit(lambda p: model.apply({"params": p}, x, jnp.array([3.0, 3.0]), train=False))(
      params)
  assert out_a.shape == x.shape
  assert not np.allclose(out_a, out_null)
  np.testing.assert_allclose(out_none, out_null, rtol=1e-5, atol=1e-6)  # No label is the null class.


def test_tiny_param_count():
  # Hand count for TINY, 3 input channels; temb width 4 * 8 = 32.
  # ResBlock(i, o) = norm 2i + conv 9io+o + emb 32o+o + norm 2o + conv 9oo+o [+ skip io+o].
  # Attn(c) = norm 2c + qkv 3cc+3c + proj cc+c. Skips: conv_in 8, res 8, downsample 8, res 16.
  temb = (8 * 32 + 32) + (32 * 32 + 32)  # 1344
  conv_in = 9 * 3 * 8 + 8  # 224
  down = 1464 + 584 + 4208 + 1120  # res(8,8), downsample conv, res(8,16), attn(16)
  mid = 5232 + 1120 + 5232  # res(16,16), attn(16), res(16,16)
  up = 8096 + 1120 + 6800 + 1120  # res(16+16,16), attn, res(16+8,16), attn
  up += 2320 + 2848 + 2192  # upsample conv, res(16+8,8), res(8+8,8)
  out = 2 * 8 + 9 * 8 * 3 + 3  # 235
  assert models.count_params(_param_shapes(UNet(**TINY), _images(3))) == (
      temb + conv_in + down + mid + up + out) == 45259


def test_scale_shift_extra_params():
  x = _images(3)
  plain = models.count_params(_param_shapes(UNet(**TINY), x))
  film = models.count_params(_param_shapes(UNet(**TINY, scale_shift=True), x))
  # The embedding projection of each ResBlock doubles: + (32 + 1) * out_ch.
  out_chs = [8, 16] + [16, 16] + [16, 16, 8, 8]  # down, mid, up
  assert film - plain == 33 * sum(out_chs) == 3432
  model = UNet(**TINY, scale_shift=True)
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.ones((2,)), train=False),
                       _param_shapes(model, x))
  assert out.shape == x.shape


def test_resampling_without_conv():
  x = _images(3)
  with_conv = models.count_params(_param_shapes(UNet(**TINY), x))
  model = UNet(**TINY, resamp_with_conv=False)
  shapes = _param_shapes(model, x)
  assert with_conv - models.count_params(shapes) == (9 * 8 * 8 + 8) + (9 * 16 * 16 + 16)
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.ones((2,)), train=False), shapes)
  assert out.shape == x.shape


def test_cifar10_ddpm_param_count():
  model = models.create_model(default.get_config().model)
  n = models.count_params(_param_shapes(model, jnp.zeros((1, 32, 32, 3))))
  print(f"DDPM cifar10 UNet parameters: {n:,}")
  assert math.isclose(n, 35.7e6, rel_tol=0.01)
  assert n == 35_746_307  # diffusers UNet2DModel, google/ddpm-cifar10-32.


def test_dropout_train_vs_eval():
  x = _images(3)
  t = jnp.array([10.0, 700.0])
  model = UNet(**TINY, dropout=0.5)
  params = _random_params(model, x)

  @functools.partial(jax.jit, static_argnums=2)
  def apply(params, rng, train):
    return model.apply({"params": params}, x, t, train=train, rngs={"dropout": rng})

  no_dropout = jax.jit(lambda p: UNet(**TINY).apply({"params": p}, x, t, train=False))(params)
  eval_1 = apply(params, jax.random.key(1), False)
  eval_2 = apply(params, jax.random.key(2), False)
  train_1 = apply(params, jax.random.key(1), True)
  train_2 = apply(params, jax.random.key(2), True)
  np.testing.assert_array_equal(eval_1, eval_2)
  np.testing.assert_allclose(eval_1, no_dropout, rtol=1e-5, atol=1e-5)
  assert not np.allclose(train_1, train_2)
  assert not np.allclose(train_1, eval_1)


def test_output_depends_on_t():
  # Fails if GroupNorm had one channel per group: it would remove the embedding added per channel.
  x = jnp.concatenate([_images(3, batch=1)] * 2)
  model = UNet(**TINY)
  params = _random_params(model, x)
  out = jax.jit(lambda p, t: model.apply({"params": p}, x, t, train=False))(
      params, jnp.array([10.0, 900.0]))
  assert not np.allclose(out[0], out[1], atol=1e-4)


def test_bfloat16_compute_keeps_float32_params():
  model = UNet(**TINY, dtype=jnp.bfloat16)
  x = _images(3)
  shapes = _param_shapes(model, x)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.ones((2,)), train=False), shapes)
  assert out.shape == x.shape and out.dtype == jnp.float32


def test_bad_image_size_raises():
  model = UNet(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
  with pytest.raises(ValueError, match=r"config\.data\.image_size.* 4 .*config\.model\.unet\.ch_mult"):
    _param_shapes(model, _images(3, size=18))


def test_create_model_errors():
  config = default.get_config().model
  config.name = "transformer"
  with pytest.raises(ValueError, match=r"config\.model\.name='transformer' is not one of unet, dit"):
    models.create_model(config)
  with pytest.raises(ValueError, match=r"config\.model\.unet\.width is not a field of UNet"):
    models.create_model(ml_collections.ConfigDict(dict(name="unet", unet=dict(width=3, **TINY))))
  with pytest.raises(ValueError, match=r"config\.model\.unet is missing"):
    models.create_model(ml_collections.ConfigDict(dict(name="unet", **TINY)))


def _grads(model, params, x, t):
  def loss(p):
    out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(7)})
    return jnp.mean(jnp.square(out - x))
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_same_params_and_gradients():
  x, t = _images(3), jnp.array([10.0, 700.0])
  plain, remat = UNet(**TINY, dropout=0.3), UNet(**TINY, dropout=0.3, remat=True)
  params = _random_params(plain, x)
  assert jax.tree.structure(_param_shapes(remat, x)) == jax.tree.structure(params)
  (loss_a, grads_a), (loss_b, grads_b) = _grads(plain, params, x, t), _grads(remat, params, x, t)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)  # Same dropout masks: the same function.
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_output_and_gradients_close_to_float32():
  x, t = _images(3), jnp.array([10.0, 700.0])
  fp32, bf16 = UNet(**TINY), UNet(**TINY, dtype=jnp.bfloat16)
  params = _random_params(fp32, x)
  out_32 = jax.jit(lambda p: fp32.apply({"params": p}, x, t, train=False))(params)
  out_16 = jax.jit(lambda p: bf16.apply({"params": p}, x, t, train=False))(params)
  assert out_16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(out_32)))
  assert float(jnp.max(jnp.abs(out_16 - out_32))) < 0.05 * scale  # bf16 has 8 bits of mantissa.
  assert float(jnp.max(jnp.abs(out_16 - out_32))) > 0  # It did compute in bfloat16.
  (_, g32), (_, g16) = _grads(fp32, params, x, t), _grads(bf16, params, x, t)
  assert {leaf.dtype for leaf in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16))) / (
      math.sqrt(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(g32)))
      * math.sqrt(sum(float(jnp.vdot(b, b)) for b in jax.tree.leaves(g16))))
  assert cos > 0.99


@pytest.mark.parametrize("attention", [None, "xla"])
def test_attention_block_matches_softmax_attention(attention):
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  block = layers.AttnBlock(num_heads=2, attention=attention)
  params = jax.tree.map(lambda p: p + 0.1,  # proj_out starts at zero: move it so it counts.
                        block.init(jax.random.key(4), x)["params"])
  out = block.apply({"params": params}, x)
  # By hand: GroupNorm, qkv, per-head softmax(q k^T / sqrt(8)) v, projection, residual.
  h = np.asarray(nn.GroupNorm(num_groups=layers.num_groups(16), epsilon=1e-6).apply(
      {"params": params["norm"]}, x)).reshape(2, 16, 16)
  qkv = h @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
  q, k, v = (qkv[..., i * 16:(i + 1) * 16].reshape(2, 16, 2, 8) for i in range(3))
  logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attn = np.einsum("bnqk,bknh->bqnh", weights, v).reshape(2, 16, 16)
  expected = np.asarray(x).reshape(2, 16, 16) + attn @ np.asarray(params["proj_out"]["kernel"]) + \
      np.asarray(params["proj_out"]["bias"])
  np.testing.assert_allclose(out.reshape(2, 16, 16), expected, rtol=1e-4, atol=1e-4)


def test_create_model_switches_from_config():
  config = default.get_config().model
  config.update(dtype="bfloat16", attention="cudnn", remat=True)
  config.unet.update(**TINY)
  model = models.create_model(config)
  assert (model.dtype, model.attention, model.remat) == (jnp.bfloat16, "cudnn", True)
  assert models.create_model(default.get_config().model).dtype == jnp.float32
  config.dtype = "float16"
  with pytest.raises(ValueError, match=r"config\.model\.dtype='float16' is not one of float32, bfloat16"):
    models.create_model(config)


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "float16", r"config\.model\.dtype='float16' is not one of float32, bfloat16\."),
    ("attention", "flash", r"config\.model\.attention='flash' is not one of None, xla, cudnn\."),
    ("attention", "cudnn", r"config\.model\.attention='cudnn' needs config\.model\.dtype='bfloat16'"),
])
def test_validate_model_switches(key, value, message):
  from training import config_check  # pylint: disable=g-import-not-at-top
  config = default.get_config().model
  config[key] = value
  with pytest.raises(ValueError, match=message):
    config_check.validate_model(config, image_size=32)
  config.update(dtype="bfloat16", attention="cudnn", remat=True)
  config_check.validate_model(config, image_size=32)  # A valid combination passes.
  bad = ml_collections.ConfigDict({**default.get_config().model.to_dict(), "remat": "yes"})
  with pytest.raises(ValueError, match=r"config\.model\.remat='yes' is not one of False, True\."):
    config_check.validate_model(bad, image_size=32)


def test_fused_qkv_starts_as_ddpm_three_layers():
  """DDPM's q, k, v are three C x C layers, variance_scaling(1, fan_avg, uniform): std 1/sqrt(C) each.

  One Dense(3C) with the fused layer's fan_avg 2C would start 1/sqrt(2) smaller.
  """
  c = 64
  params = layers.AttnBlock().init(jax.random.key(0), jnp.zeros((1, 4, 4, c)))["params"]
  kernel = np.asarray(params["qkv"]["kernel"])
  assert kernel.shape == (c, 3 * c)
  for block in np.split(kernel, 3, axis=1):  # q, k, v, in the order AttnBlock splits them.
    assert block.std() == pytest.approx(1 / math.sqrt(c), rel=0.03)
    assert np.abs(block).max() <= math.sqrt(3 / c)  # Uniform on [-sqrt(3 / C), sqrt(3 / C)].
  assert not np.allclose(kernel[:, :c], kernel[:, c:2 * c])  # Independent draws.
