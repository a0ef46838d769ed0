"""Error against model calls (NFE) of every sampler on analytic problems; prints tables, writes JSON.

Two Gaussian mixtures, whose exact denoiser E[x0 | x_t] is known in closed form:
- mixture2d: 3 components in 2-D (weights 0.5, 0.3, 0.2; standard deviations 0.2-0.5);
- mixture16d: 8 components in 16-D, narrow (standard deviation 0.05) and well separated (means on a
  sphere of radius 2.5, at least ~2.5 apart), with unequal weights: a few-step path can end in the
  wrong mode, 50 standard deviations from where it should.
Deterministic samplers are scored by their distance to the probability-flow ODE's solution from the
same noise (SciPy DOP853, rtol = atol = 1e-10, float64): the median over the points of |x - x_ODE|,
and the root-mean-square over all points, where a path that ends in the wrong mode counts in full.
"NFE to DDIM@100" is the NFE at which a sampler's RMS error falls to DDIM's at 100 steps (log-log
interpolation). A column n holds each sampler's run at the most steps within n model calls (Heun: 2
steps - 1 calls). "+opt" rows sample on a grid optimised for that sampler and step count
(diffusion/optimize_grid.py) against the ODE solutions of other starting points than the scored ones,
started from the sampler's default grid and from the trailing grid, keeping the better fit. "@trailing"
rows run our solver on diffusers' default grid. On mixture2d, stochastic samplers are scored by the
largest error in the mixture's weights, means and spreads recovered from their samples (sampling noise
alone gives ~0.01-0.02).

--peer runs diffusers' schedulers (DDIM, DPM-Solver++ 2M and UniPC bh2 of order 2 and 3 on the
"trailing" spacing, which starts at t = 1 as ours; DPM-Solver++ 2M on Lu et al.'s logSNR-uniform grid,
ours; Euler and Heun on Karras sigmas between the schedule's ends) in the reference environment
(requirements-reference.txt) on the same mixtures, noise and ODE solutions, in a worker process. The
model sees the noise level the solver assumes (diffusers would round some timesteps for a network).

  python bench/samplers.py [--quick] [--problems mixture16d] [--num_points 512]
      [--schedule discrete|continuous] [--peer --peer_python .venv-ref/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from diffusion import grids
from diffusion import optimize_grid
from diffusion import samplers
from diffusion import schedules

STOCHASTIC = {"ddpm": {}, "ddim_eta1": {"eta": 1.0}, "euler_a": {}, "dpmpp_2m_sde": {}}
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc3")
OPTIMIZED = ("dpmpp_2m", "unipc", "unipc3")  # Samplers also run on optimised grids ...
OPTIMIZED_STEPS = (5, 8, 10)  # ... at these step counts.
ON_TRAILING = ("dpmpp_2m", "unipc", "unipc3")  # Also run on diffusers' default grid, "trailing".
# diffusers' schedulers: (our sampler, grid). "dpmpp_2m_lu" is DPM-Solver++ 2M on Lu et al.'s
# logSNR-uniform grid (use_lu_lambdas), our default grid for it; Euler and Heun take Karras sigmas
# between the schedule's own ends ("linspace" spacing: with "trailing", diffusers puts sigma_min at the
# last trailing timestep, sigma(t = 200 / T) at 5 steps).
PEER = {"ddim": ("ddim", "trailing"), "dpmpp_2m": ("dpmpp_2m", "trailing"),
        "dpmpp_2m_lu": ("dpmpp_2m", "logsnr"), "unipc": ("unipc", "trailing"),
        "unipc3": ("unipc3", "trailing"), "euler": ("euler", "karras"), "heun": ("heun", "karras")}
T = 1000


def mixtures() -> dict[str, dict[str, np.ndarray]]:
  """The problems: weights W [K], means MU [K, D], standard deviations S [K] of isotropic components."""
  rng = np.random.RandomState(0)
  mu = rng.normal(size=(8, 16))
  mu *= 2.5 / np.linalg.norm(mu, axis=-1, keepdims=True)
  return {
      "mixture2d": dict(W=np.array([0.5, 0.3, 0.2]), MU=np.array([[-1.5, -1.0], [1.5, 1.0], [0.5, -1.5]]),
                        S=np.array([0.3, 0.5, 0.2])),
      "mixture16d": dict(W=rng.dirichlet(np.full(8, 2.0)), MU=mu, S=np.full(8, 0.05)),
  }


def posterior(x, alpha, sigma, mix, xp=jnp):
  """(E[x0 | x_t], E[eps | x_t]) of the mixture at x_t = alpha x0 + sigma eps."""
  w, mu, s = mix["W"], mix["MU"], mix["S"]
  v = alpha**2 * s**2 + sigma**2
  diff = x[..., None, :] - alpha * mu
  logr = xp.log(w) - 0.5 * mu.shape[-1] * xp.log(v) - 0.5 * xp.sum(diff**2, -1) / v
  r = xp.exp(logr - logr.max(-1, keepdims=True))
  r = r / r.sum(-1, keepdims=True)
  return (xp.sum(r[..., None] * (mu + (alpha * s**2 / v)[:, None] * diff), -2),
          xp.sum(r[..., None] * ((sigma / v)[:, None] * diff), -2))


def ode_solution(x_T: np.ndarray, logsnr_start: float, mix) -> np.ndarray:
  """The data the probability-flow ODE reaches from x_T, in u = log(sigma / alpha) and y = x / alpha."""
  alpha_of = lambda u: 1.0 / np.sqrt(1.0 + np.exp(2 * u))

  def f(u, y):
    a = alpha_of(u)
    return (np.exp(u) * posterior(a * y.reshape(x_T.shape), a, a * np.exp(u), mix, xp=np)[1]).ravel()

  u0, u1 = -0.5 * logsnr_start, np.log(1e-6)
  sol = solve_ivp(f, (u0, u1), (x_T / alpha_of(u0)).ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
  a = alpha_of(u1)
  return posterior(a * sol.y[:, -1].reshape(x_T.shape), a, a * 1e-6, mix, xp=np)[0]


def mixture_error(x: np.ndarray, mix) -> float:
  """Largest error of the recovered weights, means and spreads (points assigned by likelihood)."""
  w, mu, s = mix["W"], mix["MU"], mix["S"]
  loglik = np.log(w) - 2 * np.log(s) - 0.5 * ((x[:, None, :] - mu) ** 2).sum(-1) / s**2
  k = loglik.argmax(-1)
  errs = [np.abs(np.bincount(k, minlength=len(w)) / len(x) - w).max()]
  for j in range(len(w)):
    pts = x[k == j]
    if len(pts) < 2:
      return float("inf")
    errs += [np.abs(pts.mean(0) - mu[j]).max(), abs(np.sqrt(((pts - pts.mean(0)) ** 2).mean()) - s[j])]
  return float(max(errs))


def errors(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  dist = np.linalg.norm(np.asarray(x, np.float64) - reference, axis=-1)
  return {"median": float(np.median(dist)), "rms": float(np.sqrt(np.mean(dist**2)))}


def nfe_to_reach(nfes: list[int], errs: list[float], target: float) -> float | None:
  """NFE at which the error falls to target, interpolated log-log between measured points.

  An error within 1e-4 (relative) of the target reaches it: float32 round-off of the same algorithm.
  """
  target *= 1.0 + 1e-4
  for (n0, e0), (n1, e1) in zip(zip(nfes, errs), zip(nfes[1:], errs[1:])):
    if e0 <= target:
      return float(n0)
    if e1 <= target:
      frac = np.log(e0 / target) / np.log(e0 / e1)
      return float(np.exp(np.log(n0) + frac * np.log(n1 / n0)))
  return None


# ----------------------------------------------------------------------------------------------------
# The peer: diffusers' schedulers, run by the reference environment's Python in a worker process.


def peer_worker(in_path: str, out_path: str) -> None:
  """Runs PEER's diffusers schedulers on the inputs of in_path (.npz), writes their results to out_path."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)
  data = np.load(in_path)
  mix = {k: data[k] for k in ("W", "MU", "S")}
  x_T, nfe_list = data["x_T"], [int(s) for s in data["steps"]]
  alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # Our 1000-step linear schedule.
  common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
  trailing = dict(common, timestep_spacing="trailing")
  make = {
      "ddim": lambda: diffusers.DDIMScheduler(**trailing, clip_sample=False, set_alpha_to_one=True),
      "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**trailing, solver_order=2,
                                                                algorithm_type="dpmsolver++"),
      "dpmpp_2m_lu": lambda: diffusers.DPMSolverMultistepScheduler(
          **common, timestep_spacing="linspace", solver_order=2, algorithm_type="dpmsolver++",
          use_lu_lambdas=True),
      "unipc": lambda: diffusers.UniPCMultistepScheduler(**trailing, solver_order=2, solver_type="bh2"),
      "unipc3": lambda: diffusers.UniPCMultistepScheduler(**trailing, solver_order=3, solver_type="bh2"),
      "euler": lambda: diffusers.EulerDiscreteScheduler(**common, timestep_spacing="linspace",
                                                        use_karras_sigmas=True),
      "heun": lambda: diffusers.HeunDiscreteScheduler(**common, timestep_spacing="linspace",
                                                      use_karras_sigmas=True),
  }
  out = {}
  for name, (ours, _) in PEER.items():
    for nfe in nfe_list:
      scheduler = make[name]()
      scheduler.set_timesteps(samplers.max_steps(ours, nfe))
      sample = torch.from_numpy(x_T.astype(np.float32)) * scheduler.init_noise_sigma
      calls = 0
      for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        if hasattr(scheduler, "sigmas"):
          # The noise level the solver assumes at step i (sigma = sigma_t / alpha_t); its timestep
          # may be rounded (use_lu_lambdas) or fractional (Karras sigmas).
          sigma = float(scheduler.sigmas[i])
          ab = 1.0 / (1.0 + sigma**2)
        else:
          ab = alpha_bar[int(t)]
        eps = posterior(model_input.numpy().astype(np.float64), np.sqrt(ab), np.sqrt(1 - ab), mix, xp=np)[1]
        sample = scheduler.step(torch.from_numpy(eps.astype(np.float32)), t, sample).prev_sample
        calls += 1
      out[f"{name}/{nfe}"] = sample.numpy()
      out[f"{name}/{nfe}/nfe"] = np.array(calls)
  np.savez(out_path, **out)


def run_peer(peer_python: str, x_T: np.ndarray, mix, steps_list: list[int]) -> dict[str, np.ndarray]:
  with tempfile.TemporaryDirectory() as tmp:
    in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(in_path, x_T=x_T, steps=np.array(steps_list), **mix)
    subprocess.run([peer_python, os.path.abspath(__file__), "--peer_worker", in_path, out_path], check=True)
    with np.load(out_path) as f:
      return dict(f)


# ----------------------------------------------------------------------------------------------------


def bench_problem(name: str, mix, *, schedule, steps_list, n_det, n_sto, peer_python) -> dict:
  """Every sampler's rows on one mixture; printed as a table."""
  dim = mix["MU"].shape[-1]

  def denoise_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    return posterior(x, alpha, sigma, mix)

  logsnr_start = float(schedule.logsnr(1.0))
  x_T = jax.random.normal(jax.random.key(0), (n_det, dim))
  x_fit = jax.random.normal(jax.random.key(3), (max(n_det // 4, 64), dim))
  t0 = time.time()
  reference = ode_solution(np.asarray(x_T, np.float64), logsnr_start, mix)
  fit_reference = ode_solution(np.asarray(x_fit, np.float64), logsnr_start, mix)
  print(f"\n## {name}: {len(mix['W'])} components in {dim}-D; ODE reference for {n_det} + {len(x_fit)} "
        f"points in {time.time() - t0:.1f}s")

  def run(sampler, steps, **kwargs):
    fn = jax.jit(lambda x: samplers.sample(sampler, denoise_fn, x, jax.random.key(2), schedule=schedule,
                                           steps=steps, **kwargs))
    return np.asarray(fn(x_T))

  result = {"samplers": {}}
  for sampler in DETERMINISTIC:
    rows = []
    for n in steps_list:
      steps = samplers.max_steps(sampler, n)
      rows.append({"steps": steps, "nfe": samplers.num_evaluations(sampler, steps),
                   **errors(run(sampler, steps), reference)})
    result["samplers"][sampler] = {"grid": samplers.default_grid(sampler, schedule), "rows": rows}
  for sampler in ON_TRAILING:
    rows = [{"steps": n, "nfe": n, **errors(run(sampler, n, grid="trailing"), reference)}
            for n in steps_list]
    result["samplers"][f"{sampler}@trailing"] = {"grid": "trailing", "rows": rows}
  fit_target = jnp.asarray(fit_reference, jnp.float32)
  for sampler in OPTIMIZED:
    rows = []
    for steps in OPTIMIZED_STEPS:
      # Gradients move paths within a mode, never across: start from the better of two grids on the fit set.
      inits = [grids.make_grid(g, schedule, steps)
               for g in (samplers.default_grid(sampler, schedule), "trailing")]
      fits = [optimize_grid.optimize_grid(denoise_fn, sampler=sampler, schedule=schedule, steps=steps,
                                          x_T=x_fit, reference=fit_target, init_grid=g, num_iters=200)
              for g in inits]
      grid, _ = min(fits, key=lambda fit: fit[1]["optimized"])
      rows.append({"steps": steps, "nfe": samplers.num_evaluations(sampler, steps),
                   "timesteps": [float(t) for t in grid], "fit_rmse": [f for _, f in fits],
                   **errors(run(sampler, steps, timesteps=grid), reference)})
    result["samplers"][f"{sampler}+opt"] = {"grid": "optimized", "rows": rows}
  if peer_python:
    t0 = time.time()
    peer = run_peer(peer_python, np.asarray(x_T), mix, steps_list)
    print(f"diffusers' schedulers in {time.time() - t0:.1f}s")
    for name, (ours, grid) in PEER.items():
      rows = [{"steps": samplers.max_steps(ours, n), "nfe": int(peer[f"{name}/{n}/nfe"]),
               **errors(peer[f"{name}/{n}"], reference)} for n in steps_list]
      result["samplers"][f"diffusers:{name}"] = {"grid": grid, "rows": rows}
  if n_sto:
    x_T_sto = jax.random.normal(jax.random.key(1), (n_sto, dim))
    for label, options in STOCHASTIC.items():
      sampler = "ddim" if label == "ddim_eta1" else label
      rows = []
      for steps in steps_list:
        fn = jax.jit(lambda x, rng, s=steps: samplers.sample(sampler, denoise_fn, x, rng, schedule=schedule,
                                                             steps=s, **options))
        rows.append({"steps": steps, "nfe": samplers.num_evaluations(sampler, steps),
                     "mixture_stats": mixture_error(np.asarray(fn(x_T_sto, jax.random.key(2)), np.float64), mix)})
      result["samplers"][label] = {"grid": samplers.default_grid(sampler, schedule), "rows": rows}

  ddim_100 = next(r for r in result["samplers"]["ddim"]["rows"] if r["steps"] == 100)
  result["ddim_at_100_steps"] = {"median": ddim_100["median"], "rms": ddim_100["rms"]}
  # Column n: a run of at most n model calls (Heun's 2 steps - 1 calls: 5, 7, 9, ... under 5, 8, 10, ...).
  column = lambda nfe: min(n for n in steps_list if n >= nfe)
  print(f"{'sampler':21s} {'grid':9s} {'err':6s}" + "".join(f"{n:>9d}" for n in steps_list)
        + "   NFE to DDIM@100")
  for label, res in result["samplers"].items():
    nfes = [r["nfe"] for r in res["rows"]]
    stochastic = "mixture_stats" in res["rows"][0]
    if not stochastic:
      need = nfe_to_reach(nfes, [r["rms"] for r in res["rows"]], ddim_100["rms"])
      res["nfe_to_match_ddim_100"] = need
    for metric in ("mixture_stats",) if stochastic else ("rms", "median"):
      by_col = {column(r["nfe"]): r[metric] for r in res["rows"]}
      cells = "".join(f"{by_col[n]:9.2e}" if n in by_col else f"{'':9s}" for n in steps_list)
      tail = ""
      if metric == "rms":
        tail = f"   {need:.0f}" if need else f"   >{nfes[-1]}"
      first = metric != "median"
      print(f"{label if first else '':21s} {res['grid'] if first else '':9s} {metric[:6]:6s}" + cells + tail)
  print(f"DDIM at 100 steps: RMS {ddim_100['rms']:.2e}, median {ddim_100['median']:.2e}. Columns: model calls "
        "(NFE); heun's runs take 2 steps - 1 calls, the largest odd number in the column.")
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer step counts and points")
  parser.add_argument("--schedule", choices=("discrete", "continuous"), default="discrete",
                      help="1000-step linear DDPM schedule, or its continuous-time limit")
  parser.add_argument("--problems", default="mixture2d,mixture16d")
  parser.add_argument("--num_points", type=int, help="starting points scored (default 1024, --quick 256); "
                      "a quarter as many, other ones, fit the optimised grids")
  parser.add_argument("--peer", action="store_true", help="diffusers' schedulers side by side")
  parser.add_argument("--peer_python", default=".venv-ref/bin/python",
                      help="the Python of the reference environment (torch, diffusers)")
  parser.add_argument("--peer_worker", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "samplers.json"))
  args = parser.parse_args()
  if args.peer_worker:
    peer_worker(*args.peer_worker)
    return
  if args.peer and args.schedule != "discrete":
    parser.error("--peer needs --schedule=discrete (diffusers' schedulers are discrete)")

  schedule = schedules.create_schedule(schedule="linear", num_timesteps=T if args.schedule == "discrete" else 0)
  steps_list = [5, 8, 10, 20, 50, 100] if args.quick else [5, 8, 10, 15, 20, 30, 50, 75, 100, 150, 200]
  n_det, n_sto = (256, 2000) if args.quick else (1024, 8000)
  n_det = args.num_points or n_det
  results = {"schedule": args.schedule, "steps": steps_list, "num_points": n_det, "problems": {}}
  all_mixtures = mixtures()
  for name in args.problems.split(","):
    results["problems"][name] = bench_problem(
        name, all_mixtures[name], schedule=schedule, steps_list=steps_list, n_det=n_det,
        n_sto=n_sto if name == "mixture2d" else 0, peer_python=args.peer_python if args.peer else None)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
