"""models.layers: dropout (keep rate, unbiasedness, rng stream) and the fused GroupNorm + SiLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.13])
def test_dropout_keeps_the_configured_share_and_is_unbiased(rate):
  x = jnp.full((1001, 999), 2.0)  # An odd element count: the last word's second half is dropped.
  y = np.asarray(jax.jit(layers.dropout, static_argnums=2)(jax.random.key(1), x, rate))
  kept = y != 0
  n, keep = kept.size, 1.0 - rate
  # Binomial standard error of the kept share, 5 of them.
  assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * rate / n)
  assert np.allclose(y[kept], 2.0 * 65536 / round(keep * 65536), rtol=1e-6)
  assert abs(y.mean() - 2.0) < 5 * 2.0 * np.sqrt(rate / keep / n)


def test_dropout_module_uses_the_dropout_stream_and_is_identity_when_deterministic():
  module = layers.Dropout(0.3)
  x = jnp.ones((4, 8, 8, 16))
  assert np.array_equal(module.apply({}, x, deterministic=True), x)
  a = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  b = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  c = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert np.array_equal(layers.dropout(jax.random.key(0), x, 0.0), x)
  assert not np.any(layers.dropout(jax.random.key(0), x, 1.0))


def _group_norm_float64(x, scale, bias, groups, eps=1e-6):
  """Two-pass GroupNorm (Wu & He 2018, Eq. 1-3) in float64 numpy."""
  b, c = x.shape[0], x.shape[-1]
  xg = np.asarray(x, np.float64).reshape(b, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = np.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_fused_group_norm_matches_two_pass_float64_and_its_gradient(offset):
  # Activation-like input: per-channel scales and means, plus a large common offset. E[x^2] - E[x]^2
  # without a shift (flax's nn.GroupNorm) is off by 0.015 at offset 100 and by 1.4 at 1000.
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  shape, groups = (2, 8, 8, 64), 32
  x = (offset + jax.random.normal(k1, shape[-1:]) +
       jnp.exp(0.5 * jax.random.normal(k2, shape[-1:])) * jax.random.normal(k3, shape))
  scale = 1.0 + 0.1 * jax.random.normal(k4, shape[-1:])
  bias = 0.1 * jax.random.normal(k5, shape[-1:])
  w = jax.random.normal(k1, shape)
  ref = _group_norm_float64(x, np.float64(scale), np.float64(bias), groups)
  fused = jax.jit(layers.group_norm_act, static_argnums=(3, 4, 5))
  assert np.max(np.abs(fused(x, scale, bias, groups, 1e-6, False) - ref)) < 1e-5
  silu_ref = ref / (1.0 + np.exp(-ref))
  assert np.max(np.abs(fused(x, scale, bias, groups, 1e-6, True) - silu_ref)) < 1e-5

  # The gradient against the closed-form one in float64 (any offset) and against autodiff of a
  # two-pass float32 GroupNorm (no offset: with one, the float32 two-pass is the less accurate).
  xg = np.asarray(x, np.float64).reshape(2, -1, groups, 2)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  rstd = 1.0 / np.sqrt(np.square(xg - mean).mean(axis=(1, 3), keepdims=True) + 1e-6)
  x_hat = ((xg - mean) * rstd).reshape(shape)
  s = 1.0 / (1.0 + np.exp(-ref))
  gy = np.asarray(w, np.float64) * s * (1.0 + ref * (1.0 - s))
  dx_hat = (gy * np.float64(scale)).reshape(xg.shape)
  dx = rstd * (dx_hat - dx_hat.mean(axis=(1, 3), keepdims=True) -
               x_hat.reshape(xg.shape) * (dx_hat * x_hat.reshape(xg.shape)).mean(axis=(1, 3), keepdims=True))
  want = (dx.reshape(shape), np.sum(gy * x_hat, axis=(0, 1, 2)), np.sum(gy, axis=(0, 1, 2)))
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))
  got = loss(lambda *a: layers.group_norm_act(*a, groups, 1e-6, True))(x, scale, bias)
  for g, r in zip(got, want):
    assert np.max(np.abs(g - r)) < 1e-6 * np.max(np.abs(r)) + 1e-7, np.max(np.abs(g - r))

  # Forward mode too (the likelihood's ODE takes jvps of the network): <w, J v> = <J^T w, v>.
  v = jax.random.normal(jax.random.key(7), shape)
  _, jv = jax.jvp(lambda x: layers.group_norm_act(x, scale, bias, groups, 1e-6, True), (x,), (v,))
  np.testing.assert_allclose(np.sum(np.float64(w) * np.float64(jv)), np.sum(np.float64(got[0]) * np.float64(v)),
                             rtol=1e-4)

  def two_pass(x, scale, bias):
    xg = x.reshape(2, -1, groups, 2)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    return jax.nn.silu(((xg - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(shape) * scale + bias)
  if offset == 0.0:
    for g, r in zip(got, loss(two_pass)(x, scale, bias)):
      assert np.max(np.abs(g - r)) < 1e-6 * np.max(np.abs(r)) + 1e-7, np.max(np.abs(g - r))


def test_group_norm_module_has_nn_group_norm_parameters():
  x = jnp.ones((1, 4, 4, 16))
  ours = layers.group_norm(16, jnp.float32, silu=True).init(jax.random.key(0), x)
  flax_norm = nn.GroupNorm(num_groups=layers.num_groups(16), epsilon=1e-6).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_norm)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype and
                                   bool(jnp.all(a == b)), ours, flax_norm))
  with pytest.raises(ValueError, match="groups do not divide"):
    layers.GroupNorm(num_groups=3).init(jax.random.key(0), x)
