"""Micro A/B (alternating rounds, median): see bench/README.md, "Fused GroupNorm + SiLU and fused AdamW + EMA"."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from models import layers
def ref(x, s, b, g, silu):
  y = nn.GroupNorm(num_groups=g, epsilon=1e-6).apply({"params": {"scale": s, "bias": b}}, x)
  return nn.silu(y) if silu else y
def new(x, s, b, g, silu):
  return layers.group_norm_act(x, s, b, g, 1e-6, silu)
key = jax.random.PRNGKey(0)
for shape, off in [((8, 32, 32, 128), 0.0), ((8, 16, 16, 256), 3.0), ((2, 8, 8, 64), 50.0)]:
  k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, shape[-1]), 4)
  x = off + 2.0 * jax.random.normal(k1, shape)
  s = 1 + 0.1 * jax.random.normal(k2, shape[-1:]); b = 0.1 * jax.random.normal(k3, shape[-1:])
  w = jax.random.normal(k4, shape)
  for silu in (False, True):
    outs = []
    for f in (ref, new):
      loss = lambda x, s, b: jnp.sum(f(x, s, b, 32, silu) * w)
      outs.append((f(x, s, b, 32, silu),) + jax.grad(loss, argnums=(0, 1, 2))(x, s, b))
    print(shape, off, silu, [float(jnp.max(jnp.abs(a - c)) / (jnp.max(jnp.abs(a)) + 1e-12)) for a, c in zip(*outs)])
# A/B timing fwd+bwd at cifar shape
x = jax.random.normal(key, (8, 32, 32, 128)); s = jnp.ones(128); b = jnp.zeros(128); w = jax.random.normal(key, x.shape)
fns = {}
for name, f in (("flax", ref), ("fused", new)):
  fns[name] = jax.jit(jax.grad(lambda x, s, b, f=f: jnp.sum(f(x, s, b, 32, True) * w), argnums=(0, 1, 2)))
  jax.block_until_ready(fns[name](x, s, b))
times = {k: [] for k in fns}
for r in range(7):
  for k, f in fns.items():
    t = time.perf_counter()
    for _ in range(20): out = f(x, s, b)
    jax.block_until_ready(out); times[k].append((time.perf_counter() - t) / 20)
print({k: f"{np.median(v)*1e3:.3f} ms" for k, v in times.items()}, "ratio flax/fused per round", np.median(np.array(times["flax"]) / np.array(times["fused"])))
