"""Micro A/B (alternating rounds, median): see bench/README.md, "Fused GroupNorm + SiLU and fused AdamW + EMA"."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time, functools, jax, jax.numpy as jnp, numpy as np, optax
import models
from bench import train as bt
from training import train_step as ts
base = bt.load_config("configs/cifar10.py")
model = models.create_model(base.model)
tx, lr_fn = ts.create_optimizer(base.optim)
o = base.optim
def init():
  s = ts.init_state(jax.random.key(0), model=model, tx=tx, image_shape=(32, 32, 3), num_classes=0)
  return s
grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), init().params)
def optax_way(state, grads):
  finite = jnp.isfinite(optax.global_norm(grads))
  return ts.apply_if_finite(finite, state, grads, tx=tx, ema_decay=o.ema_decay)
def fused_way(state, grads):
  norm = optax.global_norm(grads)
  finite = jnp.isfinite(norm)
  def update(state):
    adam, wd, sched = state.opt_state[1]
    t = adam.count + 1
    lr = lr_fn(sched.count)
    clip = jnp.minimum(1.0, o.grad_clip / norm)
    c1 = 1 - o.b1 ** t; c2 = 1 - o.b2 ** t
    def leaf(p, g, m, v, e):
      g = g * clip
      m = o.b1 * m + (1 - o.b1) * g
      v = o.b2 * v + (1 - o.b2) * g * g
      u = (m / c1) / (jnp.sqrt(v / c2) + o.eps)
      p = p - lr * u
      return p, m, v, o.ema_decay * e + (1 - o.ema_decay) * p
    out = jax.tree.map(leaf, state.params, grads, adam.mu, adam.nu, state.ema_params)
    tdef = jax.tree.structure(state.params)
    p, m, v, e = (jax.tree.unflatten(tdef, [x[i] for x in tdef.flatten_up_to(out)]) for i in range(4))
    opt_state = (state.opt_state[0], (adam._replace(count=t, mu=m, nu=v), wd, sched._replace(count=sched.count + 1)))
    return ts.TrainState(step=state.step + 1, params=p, ema_params=e, opt_state=opt_state)
  return jax.lax.cond(finite, update, lambda s: s, state)
fns = {"optax": jax.jit(optax_way, donate_argnums=0), "fused": jax.jit(fused_way, donate_argnums=0)}
states = {k: jax.jit(init)() for k in fns}
# correctness over 3 steps
for _ in range(3):
  for k in fns: states[k] = fns[k](states[k], grads)
print("max diff params", max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), states["optax"].params, states["fused"].params))))
times = {k: [] for k in fns}
for r in range(7):
  for k, f in fns.items():
    t0 = time.perf_counter()
    for _ in range(3): states[k] = f(states[k], grads)
    jax.block_until_ready(states[k]); times[k].append((time.perf_counter() - t0) / 3)
print({k: f"{np.median(v)*1e3:.1f} ms" for k, v in times.items()}, "ratio optax/fused", np.median(np.array(times["optax"]) / np.array(times["fused"])))
