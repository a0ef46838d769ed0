"""EDM preconditioning and flow matching as processes of the one continuous-time currency.

Closed forms on the Gaussian mixture of test_samplers.py (exact denoiser, exact probability-flow ODE),
every sampler and the likelihood on both processes, tiny training runs that sample and resume, bad input.
"""

import glob
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion import grids
from diffusion import guidance
from diffusion import losses
from diffusion import parameterization as param
from diffusion import samplers
from diffusion import schedules
from evaluation import likelihood
from tests.test_likelihood import Gaussian
from tests.test_samplers import K, MU, NULL, S, W, ode_reference, posterior
from training import checkpoints
from training import config_check
from training import sample as sample_lib
from training import train as train_lib

EDM = schedules.create_schedule(schedule="linear", num_timesteps=0, process="edm", model_time="c_noise")
FLOW = schedules.create_schedule(schedule="linear", num_timesteps=0, process="flow")
PROCESSES = {"edm": EDM, "flow": FLOW}
# The mixture's sigma_data: the root mean square of x0 per coordinate, E|x0|^2 / 2.
SIGMA_DATA = math.sqrt(float(np.sum(W * (np.sum(MU**2, -1) + 2 * S**2))) / 2)


def karras_preconditioning(sigma, sigma_data):
  """Karras et al. 2022, Table 1 ("Ours"), in their variance-exploding sigma: c_skip, c_out, c_in, c_noise."""
  c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
  c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
  c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
  return c_skip, c_out, c_in, jnp.log(sigma) / 4


def vp_of(sigma):
  """(alpha, sigma_t) of Karras's sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha."""
  alpha = 1 / (1 + sigma**2) ** 0.5
  return alpha, sigma * alpha


def mixture_samples(n, seed):
  rng = np.random.default_rng(seed)
  k = rng.choice(K, size=n, p=W)
  return MU[k] + S[k, None] * rng.normal(size=(n, 2)), rng.normal(size=(n, 2))


def edm_apply_fn(x_in, model_time, cond):
  """The exact F of the (class) mixture from Table 1: sigma from c_noise, F = (D - c_skip x) / c_out."""
  labels = None if not cond else cond["label"]
  sigma = jnp.exp(4.0 * model_time[0])  # c_noise = ln(sigma) / 4.
  c_skip, c_out, c_in, _ = karras_preconditioning(sigma, EDM.sigma_data)
  x = x_in / c_in  # Karras's x = x0 + sigma n.
  alpha, sigma_t = vp_of(sigma)
  weights = W if labels is None else jnp.where((labels == NULL)[:, None], W, jax.nn.one_hot(labels, K))
  d, _ = posterior(alpha * x, alpha, sigma_t, weights=weights)
  return (d - c_skip * x) / c_out


def velocity_apply_fn(x_in, model_time, cond):
  """The exact flow velocity E[eps - x0 | x] of the (class) mixture, x = (1 - t) x0 + t eps."""
  labels = None if not cond else cond["label"]
  t = model_time[0] / 1000.0
  alpha, sigma = (a.astype(x_in.dtype) for a in FLOW.alpha_sigma(t))
  weights = W if labels is None else jnp.where((labels == NULL)[:, None], W, jax.nn.one_hot(labels, K))
  x0, eps = posterior(x_in * (alpha + sigma), alpha, sigma, weights=weights)
  return eps - x0


APPLY_FNS = {"edm": (edm_apply_fn, "edm"), "flow": (velocity_apply_fn, "velocity")}


# ----------------------------------------------------------------------------------------------------
# The processes in the currency.


def test_edm_process_is_karras_sigma_ramp_and_flow_is_linear_interpolation():
  with jax.enable_x64(True):
    sigma = lambda t: np.exp(-0.5 * np.asarray(EDM.logsnr(jnp.asarray(t, jnp.float64))))
    np.testing.assert_allclose(sigma([EDM.t_min, 1.0]), [0.002, 80.0], rtol=1e-12)
    assert float(EDM.logsnr(0.0)) == np.inf  # t = 0 is the data.
    # Karras's grid of Eq. 5 (the "edm" preset's) lands on the schedule's own sigma(t) ramp.
    t = grids.karras_grid(schedule=EDM, steps=18)
    np.testing.assert_allclose(sigma(t[:-1]), grids.karras_sigmas(
        sigma_max=jnp.float64(80.0), sigma_min=jnp.float64(0.002), steps=18), rtol=1e-10)
    np.testing.assert_allclose(np.diff(np.asarray(t[:-1])), -(1 - EDM.t_min) / 17, rtol=1e-8)
    # Flow: VP's x_t rescaled by 1 / (alpha + sigma) is (1 - t) x0 + t eps.
    t = jnp.linspace(0.01, 1.0, 100, dtype=jnp.float64)
    alpha, sigma_t = FLOW.alpha_sigma(t)
    np.testing.assert_allclose(alpha / (alpha + sigma_t), 1 - t, atol=1e-12)
    np.testing.assert_allclose(sigma_t / (alpha + sigma_t), t, atol=1e-12)
    np.testing.assert_allclose(FLOW.t_from_logsnr(FLOW.logsnr(t[:-1])), t[:-1], rtol=1e-10)
    np.testing.assert_allclose(EDM.t_from_logsnr(EDM.logsnr(t)), t, rtol=1e-10)
    x0, eps = jnp.ones(3), jnp.arange(3.0)
    x_t = param.diffuse(x0=x0, noise=eps, alpha=alpha[40], sigma=sigma_t[40])
    np.testing.assert_allclose(param.network_input("velocity", x_t=x_t, alpha=alpha[40], sigma=sigma_t[40]),
                               (1 - t[40]) * x0 + t[40] * eps, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# EDM preconditioning.

SIGMAS = (0.002, 0.05, 0.5, 2.0, 10.0, 80.0)


def test_edm_preconditioning_of_the_exact_denoiser_is_table_1():
  """Eq. 7: the network input is c_in x; the output F = (D - c_skip x) / c_out of the exact denoiser D

  converts back to D; Eq. 8: the regression target is (y - c_skip (y + sigma n)) / c_out, and its
  conditional mean given x is that F, so the exact denoiser minimises the loss. With sigma_data = 1 the
  target is -v.
  """
  y, n = mixture_samples(512, seed=0)
  with jax.enable_x64(True):
    for s in SIGMAS:
      c_skip, c_out, c_in, _ = karras_preconditioning(s, SIGMA_DATA)
      alpha, sigma = vp_of(s)
      x = y + s * n  # Karras's variable; the currency's x_t is alpha x.
      level = dict(alpha=alpha, sigma=sigma, sigma_data=SIGMA_DATA)
      np.testing.assert_allclose(param.network_input("edm", x_t=alpha * x, **level), c_in * x, rtol=1e-10)
      np.testing.assert_allclose(param.target("edm", x0=y, eps=n, **level), (y - c_skip * x) / c_out,
                                 rtol=1e-9, atol=1e-9)
      d, e = (np.asarray(a) for a in posterior(jnp.asarray(alpha * x), alpha, sigma))
      f = (d - c_skip * x) / c_out
      x0_hat, eps_hat = param.to_x0_eps("edm", jnp.asarray(f), x_t=alpha * x, **level)
      np.testing.assert_allclose(x0_hat, d, atol=1e-9)
      np.testing.assert_allclose(eps_hat, e, atol=1e-9)
      np.testing.assert_allclose(param.target("edm", x0=d, eps=e, **level), f, atol=1e-9)
      np.testing.assert_allclose(param.target("edm", x0=y, eps=n, alpha=alpha, sigma=sigma, sigma_data=1.0),
                                 -param.v_target(x0=y, eps=n, alpha=alpha, sigma=sigma), atol=1e-12)
  assert EDM.model_time(1.0) == pytest.approx(math.log(80.0) / 4, rel=1e-6)  # c_noise.


def test_edm_weighting_makes_the_loss_of_a_zero_network_one_at_every_sigma():
  """Sec. 5: lambda(sigma) = 1 / c_out^2 (Eq. 8) equalises the initial loss: with F = 0, D = c_skip x and

  E[lambda |D - y|^2] = 1 when sigma_data is the data's RMS. The unit-weight loss on F ("simple") is
  the same number per example; the mean is checked by Monte Carlo within 4 standard errors.
  """
  n_samples = 100_000
  y, n = mixture_samples(n_samples, seed=1)
  for s in SIGMAS:
    c_skip, _, _, _ = karras_preconditioning(s, SIGMA_DATA)
    weight = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2  # lambda(sigma), Table 1.
    paper = weight * np.mean((c_skip * (y + s * n) - y) ** 2, axis=-1)
    alpha, sigma = vp_of(s)
    ours = np.asarray(losses.denoising_loss(
        jnp.zeros(y.shape, jnp.float32), x0=jnp.asarray(y, jnp.float32), eps=jnp.asarray(n, jnp.float32),
        alpha=jnp.full((n_samples,), alpha), sigma=jnp.full((n_samples,), sigma),
        logsnr=jnp.full((n_samples,), -2 * math.log(s)), prediction="edm", weighting="simple",
        sigma_data=SIGMA_DATA), np.float64)
    np.testing.assert_allclose(ours, paper, rtol=2e-4, atol=1e-6)
    stderr = paper.std() / math.sqrt(n_samples)
    assert stderr < 0.01 and abs(paper.mean() - 1.0) < 4 * stderr, (s, paper.mean(), stderr)


@pytest.mark.parametrize("prediction", [p for p in param.PREDICTIONS if p != "consistency"])
def test_min_snr_weight_is_min_snr_gamma_in_x0_units(prediction):  # A consistency model has no such loss.
  """Hang et al. 2023: weight |d output|^2 = min(SNR, gamma) |d x0|^2 for every parameterisation."""
  rng = np.random.default_rng(2)
  logsnr = jnp.asarray([-6.0, -1.0, 0.0, 1.5, 4.0, 9.0])
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
  x_t, out, delta = (jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(3))
  b = lambda a: a[:, None]
  level = dict(x_t=x_t, alpha=b(alpha), sigma=b(sigma), sigma_data=0.7)
  x0_a, _ = param.to_x0_eps(prediction, out, **level)
  x0_b, _ = param.to_x0_eps(prediction, out + delta, **level)
  weight = losses.min_snr_weight(logsnr=logsnr, gamma=5.0, prediction=prediction, sigma_data=0.7)
  np.testing.assert_allclose(weight * jnp.mean(delta**2, -1),
                             jnp.minimum(jnp.exp(logsnr), 5.0) * jnp.mean((x0_b - x0_a) ** 2, -1), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Flow matching.


def test_euler_on_the_flow_is_first_order_and_ddim_and_karras_euler_are_that_euler():
  """x <- x + (t' - t) u(x, t), the flow's own sampler, with the exact velocity of the mixture: its error

  against the PF-ODE (SciPy DOP853) halves with twice the steps. DDIM on the flow is the same method
  (x_s = alpha_s x0 + sigma_s eps is x + (s - t) u in the flow's variable), and so is Karras's Euler:
  all three agree to float64 rounding. Time-uniform grids from t = 0.99 to the data, float64.
  """
  steps = (8, 16, 32, 64)
  with jax.enable_x64(True):
    x_T = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
    ref = ode_reference(np.asarray(x_T), logsnr_start=float(FLOW.logsnr(0.99)), logsnr_end=np.inf)
    denoise_fn = guidance.make_denoise_fn(velocity_apply_fn, schedule=FLOW, prediction="velocity")

    @jax.jit
    def run(t):
      def euler_step(x, ts):
        return x + (ts[1] - ts[0]) * velocity_apply_fn(x, jnp.full((64,), 1000.0 * ts[0]), None), None
      alpha, sigma = FLOW.alpha_sigma(t[0])
      x, _ = jax.lax.scan(euler_step, x_T / (alpha + sigma), (t[:-1], t[1:]))  # In the flow's variable.
      rng = jax.random.key(0)
      return (x, samplers.sample_ddim(denoise_fn, x_T, t, rng, schedule=FLOW),
              samplers.sample_euler(denoise_fn, x_T, t, rng, schedule=FLOW))

    errors = []
    for n in steps:
      # One compiled program for every n: the grid starts with max(steps) - n steps of size 0, which
      # leave x as it is in all three methods.
      t = np.concatenate([np.full(max(steps) - n, 0.99), np.linspace(0.99, 0.0, n + 1)])
      euler, ddim, karras = (np.asarray(a) for a in run(jnp.asarray(t)))
      np.testing.assert_allclose(ddim, euler, atol=1e-5)
      np.testing.assert_allclose(karras, euler, atol=1e-5)
      errors.append(np.median(np.linalg.norm(euler - ref, axis=-1)))
  order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(order - 1.0) < 0.15, (order, errors)
  assert errors[-1] < 0.02


def test_karras_samplers_keep_x0_hat_from_the_flows_first_step():
  """From t = 1, SNR 0 (where the samplers clip logSNR at LOGSNR_MIN, sigma ~ 1.6e5), one Euler, Heun or
  Euler-ancestral step to the data is the network's x0_hat, as one DDIM step is, and two Euler steps are
  two DDIM steps: the sigma-space samplers step with D = x0_hat, which is consistent with the clipped
  sigma, and not with eps_hat, which is x_t itself at SNR 0 and would drop x0_hat from the first step.
  """
  denoise_fn = guidance.make_denoise_fn(velocity_apply_fn, schedule=FLOW, prediction="velocity")
  x_T = jax.random.normal(jax.random.key(2), (64, 2))
  x0_hat = denoise_fn(x_T, jnp.float32(1.0))[0]
  rng = jax.random.key(3)
  run = jax.jit(lambda t: {name: samplers.sample(name, denoise_fn, x_T, rng, schedule=FLOW,
                                                 steps=len(t) - 1, timesteps=t)
                           for name in ("ddim", "euler", "heun", "euler_a")})
  for name, out in run(jnp.array([1.0, 0.0])).items():
    np.testing.assert_allclose(out, x0_hat, atol=1e-5, err_msg=name)
  two = run(jnp.array([1.0, 0.4, 0.0]))
  np.testing.assert_allclose(two["euler"], two["ddim"], atol=1e-4)
  assert float(jnp.max(jnp.abs(two["ddim"] - x0_hat))) > 0.1  # The second step did move the points.
  # Euler-ancestral's sigma_down = sqrt(sigma'^2 - sigma_up^2) is 0 where sigma_up = sigma' (a step from
  # sigma 119 to 1e-5), and must not round below 0 to NaN.
  few = jax.jit(lambda: [samplers.sample("euler_a", denoise_fn, x_T, rng, schedule=FLOW, steps=n)
                         for n in (3, 4, 5)])()
  assert all(bool(jnp.all(jnp.isfinite(out))) for out in few)


# ----------------------------------------------------------------------------------------------------
# Every sampler, guidance and the likelihood on both processes.

# One sampler of each family (DDIM's update, the logSNR multistep solvers, Karras's sigma-space ones), on
# its default grid: the median error at 50 steps against the ODE must be below these (measured: EDM 0.034,
# 0.003, 0.003; flow 0.016, 0.016, 0.06, where the logSNR and Karras grids start from logSNR -24).
SAMPLER_ERRORS = {"edm": {"ddim": 0.05, "dpmpp_2m": 0.01, "heun": 0.01},
                  "flow": {"ddim": 0.03, "dpmpp_2m": 0.03, "heun": 0.1}}


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_samplers_reach_the_ode_solution_on_the_process(process):
  """The exact network of each process through make_denoise_fn; the flow starts at SNR 0, where the

  samplers clip logSNR at schedules.LOGSNR_MIN.
  """
  schedule = PROCESSES[process]
  apply_fn, prediction = APPLY_FNS[process]
  denoise_fn = guidance.make_denoise_fn(apply_fn, schedule=schedule, prediction=prediction)
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  ref = ode_reference(x_T, logsnr_start=max(float(schedule.logsnr(1.0)), schedules.LOGSNR_MIN),
                      logsnr_end=np.inf)
  run = jax.jit(lambda x: {name: samplers.sample(name, denoise_fn, x, jax.random.key(1), schedule=schedule,
                                                 steps=50) for name in SAMPLER_ERRORS[process]})
  for name, out in run(x_T).items():
    error = np.median(np.linalg.norm(np.asarray(out) - ref, axis=-1))
    assert error < SAMPLER_ERRORS[process][name], (name, error)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_guidance_mixes_the_conditional_and_unconditional_denoisers(process):
  """w = 0 gives the whole mixture's denoiser, w = 1 the class's, w = 2 their extrapolation, in x0."""
  schedule = PROCESSES[process]
  apply_fn, prediction = APPLY_FNS[process]
  x = jax.random.normal(jax.random.key(3), (6, 2))
  labels = jnp.arange(6) % K
  t = jnp.float32(0.4)
  alpha, sigma = schedule.alpha_sigma(t)
  cond, _ = posterior(x, alpha, sigma, weights=jax.nn.one_hot(labels, K))
  uncond, _ = posterior(x, alpha, sigma)

  @jax.jit
  def guided_x0(w):
    return guidance.make_denoise_fn(
        apply_fn, schedule=schedule, prediction=prediction, cond={"label": labels},
        uncond=guidance.null_cond(num_classes=NULL, batch_size=labels.shape[0]), guidance_scale=w)(x, t)[0]
  for w, expected in ((0.0, uncond), (1.0, cond), (2.0, 2 * cond - uncond)):
    np.testing.assert_allclose(guided_x0(jnp.float32(w)), expected, atol=2e-5)


def test_pf_ode_likelihood_on_the_flow():
  """log p_{t0}(x) from the PF-ODE with the exact denoiser of a Gaussian equals the closed form; the flow

  reaches SNR 0 at t = 1, so the ODE ends where logSNR is schedules.LOGSNR_MIN.
  """
  schedule, gaussian = FLOW, Gaussian(0)
  x = gaussian.sample(4)
  fn = jax.jit(lambda x: likelihood.ode_log_likelihood(gaussian.denoiser(schedule), x, jax.random.key(0),
                                                       schedule=schedule, divergence="exact"))
  logp, _, _, success = fn(x)
  assert bool(success)
  alpha0, sigma0 = (float(a) for a in schedule.alpha_sigma(schedule.t_min))
  exact = gaussian.logpdf(x, alpha0, sigma0)
  np.testing.assert_allclose(likelihood.bits_per_dim(np.asarray(logp, np.float64), 12),
                             likelihood.bits_per_dim(exact, 12), atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# Tiny training runs: EDM and flow matching train, sample with two samplers, and EDM resumes exactly.

TINY = {
    "edm": {"diffusion.process": "edm", "diffusion.num_timesteps": 0, "diffusion.prediction": "edm",
            "diffusion.model_time": "c_noise", "diffusion.time_sampling": "lognormal_sigma"},
    "flow": {"diffusion.process": "flow", "diffusion.num_timesteps": 0, "diffusion.prediction": "velocity",
             "diffusion.time_sampling": "logit_normal"},
}


def tiny_config(process, **overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict({**TINY[process], **overrides})
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of 4 EDM steps straight and resumed at step 2, and 2 flow steps.

  The resumed run is the straight one's workdir without its step-4 checkpoint, trained again.
  """
  root = tmp_path_factory.mktemp("edm_flow")
  edm = tiny_config("edm", **{"training.num_steps": 4, "training.checkpoint_every": 2})
  states = {"edm": train_lib.train(edm, str(root / "edm"))}
  shutil.copytree(root / "edm", root / "edm_resumed")
  shutil.rmtree(root / "edm_resumed" / "checkpoints" / "4")
  states["edm_resumed"] = train_lib.train(edm, str(root / "edm_resumed"))
  states["flow"] = train_lib.train(tiny_config("flow", **{"training.num_steps": 2}), str(root / "flow"))
  return root, states


def test_tiny_edm_run_resumes_bit_identically(runs):
  _, states = runs
  assert int(states["edm"].step) == int(states["edm_resumed"].step) == 4
  a, b = (jax.device_get(states[k].params) for k in ("edm", "edm_resumed"))
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree.leaves(diffs)) == 0.0
  moved = jax.tree.map(lambda p, e: float(np.max(np.abs(p - e))), states["edm"].params,
                       states["edm"].ema_params)
  assert max(jax.tree.leaves(moved)) > 0  # The steps were applied (finite loss, finite gradients).


@pytest.mark.parametrize("process,first,second", [("edm", {"sample.preset": "edm"},
                                                   {"sample.sampler": "dpmpp_2m"}),
                                                  ("flow", {"sample.sampler": "ddim"},
                                                   {"sample.sampler": "euler_a", "sample.steps": 4})])
def test_tiny_run_samples_with_two_samplers(runs, process, first, second):
  root, _ = runs
  workdir = str(root / process)
  images = []
  for overrides in (first, second):
    config = tiny_config(process, **{"sample.steps": 2, "sample.num": 8, **overrides})
    path = sample_lib.sample(config, workdir)
    with np.load(path + ".npz") as f:
      images.append(f["images"])
      settings = json.loads(str(f["settings"]))
    assert images[-1].shape == (8, 8, 8, 1) and images[-1].dtype == np.uint8
    if overrides.get("sample.preset") == "edm":  # The preset's settings are what ran and what is named.
      assert os.path.basename(path).startswith("step4_heun_2steps_")
      assert settings["sampler"] == "heun" and settings["grid"] == "karras" and settings["preset"] == "edm"
  # Different images, whatever the 2 or 4 training steps taught: on the flow, Euler-ancestral's fresh
  # noise (DDIM follows the nearly constant velocity of a barely trained network to the same end in any
  # number of steps, as two Euler-ancestral steps would: their noise enters at sigma 1e-5).
  assert np.any(images[0] != images[1])
  assert len(glob.glob(os.path.join(workdir, "samples", "*.npz"))) >= 2


def test_a_flow_run_teaches_a_progressive_velocity_student(runs, tmp_path):
  """The flow run as a progressive teacher: its velocity student trains a round and samples in its steps."""
  root, states = runs
  config = tiny_config("flow", **{"distill.method": "progressive", "distill.teacher": str(root / "flow"),
                                  "distill.student_steps": 2, "training.num_steps": 2,
                                  "sample.grid": "trailing", "sample.clip_x0": False})
  student = train_lib.train(config, str(tmp_path / "student"))
  teacher, trained = (jax.device_get(x) for x in (states["flow"].ema_params, student.params))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), teacher, trained)
  assert 0 < max(jax.tree.leaves(moved)) < 1  # From the teacher's EMA weights, a few small steps.
  config.sample.update(steps=None, num=8)
  path = sample_lib.sample(config, str(tmp_path / "student"))
  with np.load(path + ".npz") as f:
    assert f["images"].shape == (8, 8, 8, 1)
    settings = json.loads(str(f["settings"]))
  assert (settings["sampler"], settings["steps"], settings["grid"]) == ("ddim", 2, "trailing")


def test_resume_with_another_process_is_refused(runs):
  root, _ = runs
  workdir = str(root / "edm")
  listing = lambda: sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  before, saved_config = listing(), (root / "edm" / "config.json").read_text()
  config = tiny_config("flow", **{"training.num_steps": 6, "training.checkpoint_every": 2})
  with pytest.raises(checkpoints.CheckpointError, match=r"diffusion\.process: saved 'edm', now 'flow'"):
    train_lib.train(config, workdir)
  assert listing() == before and (root / "edm" / "config.json").read_text() == saved_config


def test_a_config_saved_before_the_process_keys_is_read_as_vp():
  saved = tiny.get_config().to_dict()
  for key in ("process", "sigma_min", "sigma_max", "sigma_data", "time_sampling", "p_mean", "p_std",
              "logit_mean", "logit_std"):
    del saved["diffusion"][key]
  config = checkpoints.as_current_config(saved)
  assert config.diffusion.process == "vp" and config.diffusion.time_sampling == "uniform"
  mismatched, _ = checkpoints.compare_configs(saved, tiny.get_config().to_dict(), saved_image_shape=(8, 8, 1),
                                              image_shape=(8, 8, 1))
  assert not mismatched
  mismatched, _ = checkpoints.compare_configs(saved, tiny_config("edm").to_dict(),
                                              saved_image_shape=(8, 8, 1), image_shape=(8, 8, 1))
  assert {"diffusion.process", "diffusion.prediction"} <= set(mismatched)
  assert "diffusion.time_sampling" not in mismatched  # Resumable: where training spends its effort.
  old = train_lib.create_schedule(config.diffusion)
  t = jnp.linspace(0.001, 1.0, 50)
  np.testing.assert_array_equal(old.logsnr(t), schedules.create_schedule(schedule="linear",
                                                                         num_timesteps=1000).logsnr(t))


# ----------------------------------------------------------------------------------------------------
# Bad input.

BAD_VALUES = [
    ({"diffusion.process": "ve"}, r"config\.diffusion\.process='ve' is not one of vp, edm, flow"),
    ({"diffusion.prediction": "score"},
     r"config\.diffusion\.prediction='score' is not one of eps, x0, v, edm, velocity"),
    ({**TINY["edm"], "diffusion.sigma_min": 80.0, "diffusion.sigma_max": 0.002},
     r"config\.diffusion\.sigma_min=80\.0 and config\.diffusion\.sigma_max=0\.002 must satisfy"),
    ({**TINY["edm"], "diffusion.sigma_min": 1.0, "diffusion.sigma_max": 1.0},
     r"config\.diffusion\.sigma_min=1\.0 and config\.diffusion\.sigma_max=1\.0"),
    ({**TINY["edm"], "diffusion.num_timesteps": 1000},
     r"config\.diffusion\.process='edm' is a continuous-time process; it needs "
     r"config\.diffusion\.num_timesteps=0"),
    ({**TINY["flow"], "diffusion.prediction": "eps"}, r"config\.diffusion\.process='flow' reaches SNR 0"),
    ({**TINY["edm"], "diffusion.sigma_data": 0.0}, r"config\.diffusion\.sigma_data=0\.0 must be > 0"),
    ({"diffusion.time_sampling": "beta"},
     r"config\.diffusion\.time_sampling='beta' is not one of uniform, logit_normal, lognormal_sigma"),
    ({"diffusion.time_sampling": "lognormal_sigma"},
     r"config\.diffusion\.time_sampling='lognormal_sigma' needs continuous time"),
    ({**TINY["edm"], "diffusion.p_std": 0.0}, r"config\.diffusion\.p_std=0\.0 must be > 0"),
    ({**TINY["edm"], "diffusion.model_time": "sigma"}, r"config\.diffusion\.model_time='sigma' is not one of"),
    ({"training.sample_every": 2, "sample.preset": "karras"},
     r"config\.sample\.preset='karras' is not one of edm, edm_stochastic"),
    ({"training.sample_every": 2, "sample.s_noise": 0.0}, r"config\.sample\.s_noise=0\.0 must be > 0"),
    ({"training.sample_every": 2, "sample.s_tmin": 2.0, "sample.s_tmax": 1.0},
     r"config\.sample\.s_tmax=1\.0 must be above config\.sample\.s_tmin=2\.0"),
]


@pytest.mark.parametrize("overrides,match", BAD_VALUES,
                         ids=[str(sorted(o.items())[-1]) for o, _ in BAD_VALUES])
def test_bad_value_is_named_before_anything_runs(tmp_path, monkeypatch, overrides, match):
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    train_lib.train(config, str(workdir))
  assert not compiled and not workdir.exists()


def test_the_library_functions_refuse_bad_input_too():
  with pytest.raises(ValueError, match=r"config\.diffusion\.sigma_min=80 and config\.diffusion\.sigma_max=2"):
    schedules.create_schedule(schedule="linear", num_timesteps=0, process="edm", sigma_min=80, sigma_max=2)
  with pytest.raises(ValueError, match=r"config\.diffusion\.process='ve' is not one of vp, edm, flow"):
    schedules.create_schedule(schedule="linear", num_timesteps=0, process="ve")
  with pytest.raises(ValueError, match=r"needs sigma_data \(config\.diffusion\.sigma_data\)"):
    param.to_x0_eps("edm", jnp.zeros(2), x_t=jnp.zeros(2), alpha=1.0, sigma=1.0)
  from training import train_step
  with pytest.raises(ValueError, match=r"time_sampling='logit_normal' needs continuous time"):
    discrete = schedules.create_schedule(schedule="linear", num_timesteps=10)
    train_step.sample_times(jax.random.key(0), 4, discrete, distribution="logit_normal")
  config = tiny.get_config()
  config.sample.preset = "fast"
  from training import generate
  with pytest.raises(ValueError, match=r"config\.sample\.preset='fast' is not one of edm, edm_stochastic"):
    generate.SampleOptions.from_config(config)


def test_time_sampling_distributions():
  """logit(t) ~ N(m, s^2) (Esser et al. 2024) and ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022)."""
  from training import train_step
  rng = jax.random.key(5)
  t = np.asarray(train_step.sample_times(rng, 20_000, FLOW, distribution="logit_normal", mean=0.5, std=0.8))
  z = np.log(t / (1 - t))
  assert abs(z.mean() - 0.5) < 0.03 and abs(z.std() - 0.8) < 0.03
  t = train_step.sample_times(rng, 20_000, EDM, distribution="lognormal_sigma", mean=-1.2, std=1.2)
  log_sigma = -0.5 * np.asarray(EDM.logsnr(t))
  assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
  assert log_sigma.min() >= math.log(0.002) - 1e-4 and log_sigma.max() <= math.log(80.0) + 1e-4
