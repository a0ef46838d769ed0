"""Time grids optimised on the model itself: few-step sampling where the steps matter most.

At 5-10 model calls a solver's error is set mostly by where its steps are. Following Sabour et al. 2024
("Align Your Steps") and Xue et al. 2024 ("Accelerating diffusion sampling with optimized time steps"),
the N - 1 interior times of an N-step grid are chosen to minimise the root-mean-square distance of the
sampler's final x to a high-accuracy solution from the same starting noise (here: the sampler itself, or
any other, at many steps), by Adam on the gradient through the whole sampling run.

The grid is parametrised so every iterate is a valid grid: N logits whose softmax are the increments of
logSNR from logSNR(t_max) to logSNR(t_min); the cumulative sums give the N - 1 interior times, strictly
decreasing in t. The grid starts at t_max and ends at t = 0, like every grid of grids.py.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import grids
from diffusion import samplers
from diffusion import schedules

Array = jnp.ndarray

# Samplers whose result is a function of x_T alone: a grid can be fitted to their ODE solution.
DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc3", "euler", "heun")


def _logsnr_bounds(schedule: schedules.Schedule, t_max: float) -> tuple[Array, Array]:
  return jnp.maximum(schedule.logsnr(t_max), grids.LOGSNR_MIN), schedule.logsnr(schedule.t_min)


def grid_from_logits(logits: Array, *, schedule: schedules.Schedule, t_max: float = 1.0) -> Array:
  """The N + 1 times t_max > t_1 > ... > t_{N-1} > 0 = t_N, logSNR(t_k) = lo + (hi - lo) cumsum(softmax)_k."""
  lo, hi = _logsnr_bounds(schedule, t_max)
  frac = jnp.cumsum(jax.nn.softmax(logits))[:-1]
  interior = schedule.t_from_logsnr(lo + (hi - lo) * frac)
  return jnp.concatenate([jnp.full((1,), t_max, interior.dtype), interior, jnp.zeros((1,), interior.dtype)])


def logits_from_grid(timesteps: Array, *, schedule: schedules.Schedule, min_fraction: float = 1e-2) -> Array:
  """The logits of a grid (grid_from_logits' inverse); increments below min_fraction of the range are raised."""
  timesteps = jnp.asarray(timesteps)
  lo, hi = _logsnr_bounds(schedule, float(timesteps[0]))
  logsnr = jnp.clip(schedule.logsnr(timesteps[1:-1]), lo, hi)
  increments = jnp.diff(jnp.concatenate([lo[None], logsnr, hi[None]])) / (hi - lo)
  return jnp.log(jnp.maximum(increments, min_fraction))


def rmse(x: Array, reference: Array) -> Array:
  """Root-mean-square over the points of |x - reference| (each point's error over all its dimensions)."""
  sq = jnp.sum(jnp.reshape(x - reference, (x.shape[0], -1)) ** 2, axis=-1)
  return jnp.sqrt(jnp.mean(sq))


def optimize_grid(denoise_fn: samplers.DenoiseFn, *, sampler: str, schedule: schedules.Schedule,
                  steps: int, x_T: Array, reference: Array, init_grid: Array | None = None,
                  num_iters: int = 300, learning_rate: float = 0.05,
                  options: dict[str, Any] | None = None,
                  callback: Callable[[int, float], None] | None = None) -> tuple[Array, dict[str, float]]:
  """Minimises rmse(sampler(x_T; grid), reference) over the N - 1 interior times of an N-step grid.

  init_grid defaults to the sampler's default grid. Returns the best grid seen (the initial one
  included, so the result is never worse on x_T) and {"initial": rmse, "optimized": rmse}.
  """
  if sampler not in DETERMINISTIC:
    raise ValueError(f"sampler={sampler!r} is not one of {', '.join(DETERMINISTIC)} (a grid is fitted to "
                     "a deterministic sampler's solution).")
  if steps < 2:
    raise ValueError(f"steps={steps} must be at least 2 (one step has no interior time to move).")
  fn = samplers.get_sampler(sampler)
  options = options or {}
  if init_grid is None:
    init_grid = grids.make_grid(samplers.default_grid(sampler, schedule), schedule, steps)
  t_max = float(init_grid[0])

  def loss_fn(logits):
    timesteps = grid_from_logits(logits, schedule=schedule, t_max=t_max)
    x = fn(denoise_fn, x_T, timesteps, jax.random.key(0), schedule=schedule, **options)
    return rmse(x, reference)

  optimizer = optax.adam(learning_rate)

  @jax.jit
  def update(logits, opt_state):
    loss, grad = jax.value_and_grad(loss_fn)(logits)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    updates, opt_state = optimizer.update(grad, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state, loss

  initial = float(jax.jit(lambda: rmse(
      fn(denoise_fn, x_T, init_grid, jax.random.key(0), schedule=schedule, **options), reference))())
  logits = logits_from_grid(init_grid, schedule=schedule)
  opt_state = optimizer.init(logits)
  best_loss, best_grid = initial, jnp.asarray(init_grid)
  for i in range(num_iters + 1):
    new_logits, opt_state, loss = update(logits, opt_state)
    loss = float(loss)  # The loss of `logits`, before this update.
    if np.isfinite(loss) and loss < best_loss:
      best_loss, best_grid = loss, grid_from_logits(logits, schedule=schedule, t_max=t_max)
    if callback is not None:
      callback(i, loss)
    logits = new_logits
  return best_grid, {"initial": initial, "optimized": best_loss}
