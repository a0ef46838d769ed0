"""training.adamw: the fused AdamW + EMA update equals optax's chain, apply_updates and the EMA map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training import adamw
from training import train_step as train_step_lib


@pytest.mark.parametrize("grad_clip, weight_decay", [(1.0, 0.01), (0.0, 0.0)])
def test_fused_update_equals_optax_adamw_and_ema(grad_clip, weight_decay):
  lr_fn = train_step_lib.learning_rate_schedule(learning_rate=1e-2, warmup_steps=3)
  tx = adamw.AdamW(lr_fn, b1=0.9, b2=0.99, eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip)
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  decay = 0.9

  @jax.jit
  def reference(params, opt_state, ema, grads):
    updates, opt_state = tx.optax().update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, train_step_lib.ema_update(ema, params, decay)

  fused = jax.jit(lambda p, s, e, g: tx.update_with_ema(p, g, s, e, ema_decay=decay))
  ref = got = (params, tx.init(params), params)
  norms = []
  for step in range(4):
    # Global norms about 2.5 and 0.25: clipped (grad_clip 1) on odd steps only.
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (0.6 if step % 2 else 0.06),
                                               jnp.float32), params)
    norms.append(float(optax.global_norm(grads)))
    ref, got = reference(*ref, grads), fused(*got, grads)
  assert min(norms) < 1.0 < max(norms)
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))), got, ref)
  assert max(jax.tree.leaves(diffs)) < 1e-6
  # The parameters moved: a comparison of unchanged trees would pass trivially.
  assert float(np.max(np.abs(got[0]["a"] - params["a"]))) > 1e-3
