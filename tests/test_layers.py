"""models.layers.dropout: the keep rate, unbiasedness and the rng stream of the Dropout module."""

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
