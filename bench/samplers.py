"""Error against model calls (NFE) of every sampler on an analytic problem; prints a table, writes JSON.

The data is a 3-component Gaussian mixture in 2-D, whose exact denoiser E[x0 | x_t] is known in closed
form. Deterministic samplers are scored by their distance to the probability-flow ODE's solution from
the same noise (SciPy DOP853, rtol = atol = 1e-10, float64): the median over the points of |x - x_ODE|.
Stochastic samplers have no such target; they are scored by the largest error in the mixture's
weights, means and spreads recovered from their samples (sampling noise alone gives ~0.01-0.02).
Each sampler runs on its default grid for the schedule (samplers.DEFAULT_GRIDS).

  python bench/samplers.py [--quick] [--schedule discrete|continuous]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from diffusion import samplers
from diffusion import schedules

W = np.array([0.5, 0.3, 0.2])
MU = np.array([[-1.5, -1.0], [1.5, 1.0], [0.5, -1.5]])
S = np.array([0.3, 0.5, 0.2])
STOCHASTIC = {"ddpm": {}, "ddim_eta1": {"eta": 1.0}, "euler_a": {}, "dpmpp_2m_sde": {}}
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")


def posterior(x, alpha, sigma, xp=jnp):
  v = alpha**2 * S**2 + sigma**2
  diff = x[..., None, :] - alpha * MU
  logr = xp.log(W) - xp.log(v) - 0.5 * xp.sum(diff**2, -1) / v
  r = xp.exp(logr - logr.max(-1, keepdims=True))
  r = r / r.sum(-1, keepdims=True)
  return (xp.sum(r[..., None] * (MU + (alpha * S**2 / v)[:, None] * diff), -2),
          xp.sum(r[..., None] * ((sigma / v)[:, None] * diff), -2))


def ode_solution(x_T: np.ndarray, logsnr_start: float) -> np.ndarray:
  """The data the probability-flow ODE reaches from x_T, in u = log(sigma / alpha) and y = x / alpha."""
  alpha_of = lambda u: 1.0 / np.sqrt(1.0 + np.exp(2 * u))

  def f(u, y):
    a = alpha_of(u)
    return (np.exp(u) * posterior(a * y.reshape(x_T.shape), a, a * np.exp(u), xp=np)[1]).ravel()

  u0, u1 = -0.5 * logsnr_start, np.log(1e-6)
  sol = solve_ivp(f, (u0, u1), (x_T / alpha_of(u0)).ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
  a = alpha_of(u1)
  return posterior(a * sol.y[:, -1].reshape(x_T.shape), a, a * 1e-6, xp=np)[0]


def mixture_error(x: np.ndarray) -> float:
  """Largest error of the recovered weights, means and spreads (points assigned by likelihood)."""
  loglik = np.log(W) - 2 * np.log(S) - 0.5 * ((x[:, None, :] - MU) ** 2).sum(-1) / S**2
  k = loglik.argmax(-1)
  errs = [np.abs(np.bincount(k, minlength=len(W)) / len(x) - W).max()]
  for j in range(len(W)):
    pts = x[k == j]
    if len(pts) < 2:
      return float("inf")
    errs += [np.abs(pts.mean(0) - MU[j]).max(), abs(np.sqrt(((pts - pts.mean(0)) ** 2).mean()) - S[j])]
  return float(max(errs))


def nfe_to_reach(nfes: list[int], errors: list[float], target: float) -> float | None:
  """NFE at which the error falls to target, interpolated log-log between measured points."""
  for (n0, e0), (n1, e1) in zip(zip(nfes, errors), zip(nfes[1:], errors[1:])):
    if e0 <= target:
      return float(n0)
    if e1 <= target:
      frac = np.log(e0 / target) / np.log(e0 / e1)
      return float(np.exp(np.log(n0) + frac * np.log(n1 / n0)))
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer step counts and points")
  parser.add_argument("--schedule", choices=("discrete", "continuous"), default="discrete",
                      help="1000-step linear DDPM schedule, or its continuous-time limit")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "samplers.json"))
  args = parser.parse_args()

  num_timesteps = 1000 if args.schedule == "discrete" else 0
  schedule = schedules.create_schedule(schedule="linear", num_timesteps=num_timesteps)
  steps_list = [10, 20, 50, 100] if args.quick else [5, 8, 10, 15, 20, 30, 50, 75, 100, 150, 200]
  n_det, n_sto = (256, 2000) if args.quick else (1024, 8000)

  def denoise_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    return posterior(x, alpha, sigma)

  x_T = jax.random.normal(jax.random.key(0), (n_det, 2))
  t0 = time.time()
  reference = ode_solution(np.asarray(x_T, np.float64), float(schedule.logsnr(1.0)))
  print(f"# {args.schedule} linear schedule; ODE reference for {n_det} points in {time.time() - t0:.1f}s")
  x_T_sto = jax.random.normal(jax.random.key(1), (n_sto, 2))

  results = {"schedule": args.schedule, "steps": steps_list, "samplers": {}}
  for name in DETERMINISTIC + tuple(STOCHASTIC):
    sampler = "ddim" if name == "ddim_eta1" else name
    options = STOCHASTIC.get(name, {})
    stochastic = name in STOCHASTIC
    rows = []
    for steps in steps_list:
      fn = jax.jit(lambda x, rng, s=steps: samplers.sample(sampler, denoise_fn, x, rng, schedule=schedule,
                                                           steps=s, **options))
      x = np.asarray(fn(x_T_sto if stochastic else x_T, jax.random.key(2)), np.float64)
      error = (mixture_error(x) if stochastic
               else float(np.median(np.linalg.norm(x - reference, axis=-1))))
      rows.append({"steps": steps, "nfe": samplers.num_evaluations(sampler, steps), "error": error})
    results["samplers"][name] = {
        "metric": "mixture_stats" if stochastic else "median_ode_distance",
        "grid": samplers.default_grid(sampler, schedule), "rows": rows}

  target = next(r["error"] for r in results["samplers"]["ddim"]["rows"] if r["steps"] == 100)
  results["ddim_error_at_100_steps"] = target
  print(f"\n{'sampler':14s} {'grid':9s}" + "".join(f"{s:>9d}" for s in steps_list) + "   NFE to DDIM@100")
  for name, res in results["samplers"].items():
    nfes, errors = [r["nfe"] for r in res["rows"]], [r["error"] for r in res["rows"]]
    need = None if name in STOCHASTIC else nfe_to_reach(nfes, errors, target)
    res["nfe_to_match_ddim_100"] = need
    label = f"{name}{'*' if name in STOCHASTIC else ''}"
    print(f"{label:14s} {res['grid']:9s}" + "".join(f"{e:9.2e}" for e in errors)
          + ("" if name in STOCHASTIC else f"   {need:.0f}" if need else "   >" + str(nfes[-1])))
  print(f"\ncolumns: steps (NFE = steps; heun 2 steps - 1). Error: median |x - x_ODE| at t = 0; "
        f"* stochastic: largest error in the mixture's weights/means/spreads ({n_sto} points).")
  print(f"DDIM at 100 steps: {target:.2e}.")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
