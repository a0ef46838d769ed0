"""Consistency models: the parameterisation's boundary, iCT's formulas, CD's Heun step against the Heun

sampler, the consistency sampler on a Gaussian (whose PF-ODE is linear, so its consistency function is
known in closed form), tiny distillation and training runs that resume bit-identically, bad input.
"""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import tiny
from diffusion import consistency
from diffusion import guidance
from diffusion import parameterization as param
from diffusion import samplers
from diffusion import schedules
from tests.test_samplers import NULL, analytic_apply_fn
from training import generate
from training import sample as sample_lib
from training import train as train_lib

EDM = schedules.create_schedule(schedule="linear", num_timesteps=0, process="edm", model_time="c_noise")
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


def test_boundary_condition_holds_exactly():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 3.0
  network = lambda x_in, s: 1e3 * jnp.tanh(x_in) + 7.0  # Any output: c_out is exactly 0 there.
  f = consistency.consistency_function(network, x, jnp.full((4,), SIGMA_MIN), sigma_min=SIGMA_MIN,
                                       sigma_data=SIGMA_DATA)
  np.testing.assert_array_equal(np.asarray(f), np.asarray(x))
  c_skip, c_out, c_in = param.consistency_scalings(sigma=jnp.asarray([SIGMA_MIN, 1.0, SIGMA_MAX]),
                                                   sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA)
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
  gap = 1.0 - SIGMA_MIN  # CM, App. C at sigma = 1.
  np.testing.assert_allclose([c_skip[1], c_out[1], c_in[1]],
                             [0.25 / (gap**2 + 0.25), gap * 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)],
                             rtol=1e-6)
  assert abs(float(c_skip[2])) < 1e-4 and abs(float(c_out[2]) - SIGMA_DATA) < 1e-3  # F alone at sigma_max.


def test_curriculum_discretisation_and_pseudo_huber():
  n = lambda k, **kw: int(consistency.curriculum(k, **kw))
  ict = dict(total_steps=400_000, s0=10, s1=1280)  # iCT: K' = floor(400000 / 8) = 50000.
  assert [n(k, **ict) for k in (0, 49_999, 50_000, 100_000, 299_999, 300_000, 350_000, 399_999)] == [
      11, 11, 21, 41, 321, 641, 1281, 1281]
  assert {n(k, total_steps=1000, s0=17, s1=17) for k in (0, 500, 999)} == {18}  # CM's fixed N = 18.
  sigmas = np.asarray(consistency.discretisation(jnp.asarray(11), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                                 size=21))
  ramp = (SIGMA_MIN ** (1 / 7) + np.arange(11) / 10 * (SIGMA_MAX ** (1 / 7) - SIGMA_MIN ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas[:11], ramp, rtol=1e-5)
  assert sigmas[0] == np.float32(SIGMA_MIN) and np.all(sigmas[11:] == sigmas[10])
  p = np.asarray(consistency.level_probabilities(jnp.asarray(sigmas), jnp.asarray(11),
                                                 distribution="lognormal", p_mean=-1.1, p_std=2.0))
  cdf = erf((np.log(ramp) + 1.1) / (math.sqrt(2) * 2.0))
  np.testing.assert_allclose(p[:10], np.diff(cdf) / np.sum(np.diff(cdf)), rtol=1e-4)
  assert np.all(p[10:] == 0) and abs(p.sum() - 1) < 1e-6
  assert consistency.pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.029929, abs=1e-6)  # iCT on CIFAR-10.
  x, y = jnp.zeros((2, 3)), jnp.asarray([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(consistency.pseudo_huber(x, y, c=1.0), [math.sqrt(26) - 1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(consistency.weight(jnp.asarray([1.0]), jnp.asarray([1.5]),
                                                weighting="inverse_gap"), [2.0])


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_distillation_heun_step_is_the_heun_samplers_step(guidance_scale):
  """On a VP teacher (cosine, eps) of the class mixture: CM's target step from sigma_{n+1} to sigma_n,
  per example, equals sample_heun's single step between the same sigmas on the teacher's own times."""
  teacher = schedules.create_schedule(schedule="cosine", num_timesteps=0)
  labels = jnp.asarray([0, 1, 2, NULL])
  one_example = analytic_apply_fn(teacher, "eps")  # Reads the time of the batch's first example.
  apply_fn = jax.vmap(lambda x, t, label: one_example(x[None], t[None], {"label": label[None]})[0])
  denoise_fn = guidance.make_denoise_fn(
      lambda x, t, cond: apply_fn(x, t, cond["label"]), schedule=teacher, prediction="eps",
      cond={"label": labels},
      uncond={"label": jnp.full_like(labels, NULL)}, guidance_scale=guidance_scale)
  sigma_next = jnp.asarray([60.0, 3.0, 0.5, 0.01])
  sigma = jnp.asarray([40.0, 2.0, 0.3, 0.005])
  x = jax.random.normal(jax.random.key(1), (4, 2)) * jnp.sqrt(1.0 + sigma_next**2)[:, None]
  x_hat = consistency.heun_step(consistency.teacher_denoiser(denoise_fn, schedule=teacher), x,
                                sigma=sigma_next, sigma_next=sigma)
  t_of = lambda s: teacher.t_from_logsnr(-2.0 * jnp.log(s))
  for i in range(4):
    one = lambda x_t, t: tuple(a[i:i + 1] for a in denoise_fn(jnp.tile(x_t, (4, 1)), t))
    times = jnp.stack([t_of(sigma_next[i]), t_of(sigma[i])])
    alpha = lambda t: samplers.noise_level(teacher, t)[1]
    out = samplers.sample_heun(one, x[i:i + 1] * alpha(times[0]), times, jax.random.key(0),
                               schedule=teacher) / alpha(times[1])
    np.testing.assert_allclose(x_hat[i], out[0], rtol=2e-4, atol=2e-5)
  assert float(jnp.min(jnp.max(jnp.abs(x_hat - x)[:3], axis=1))) > 0.05  # The large steps moved.


def gaussian_consistency_apply_fn(mu, s):
  """F of the exact consistency function of data N(mu, s^2 I): the PF-ODE of a Gaussian is linear,
  x(sigma) - mu proportional to sqrt(s^2 + sigma^2), so f(x, sigma) = mu + sqrt((s^2 + sigma_min^2) /
  (s^2 + sigma^2)) (x - mu); F = (f - c_skip x) / c_out."""
  def apply_fn(x_in, model_time, cond):
    del cond
    sigma = jnp.exp(4.0 * model_time)[:, None]  # c_noise = ln(sigma) / 4.
    c_skip, c_out, c_in = param.consistency_scalings(sigma=sigma, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA)
    x = x_in / c_in
    f = mu + jnp.sqrt((s**2 + SIGMA_MIN**2) / (s**2 + sigma**2)) * (x - mu)
    return (f - c_skip * x) / c_out
  return apply_fn


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sampler_maps_noise_to_the_gaussian(steps):
  mu, s = jnp.asarray([0.3, -0.2]), 0.4
  denoise_fn = guidance.make_denoise_fn(gaussian_consistency_apply_fn(mu, s), schedule=EDM,
                                        prediction="consistency")
  x_T = jax.random.normal(jax.random.key(2), (40_000, 2))
  x = samplers.sample("consistency", denoise_fn, x_T, jax.random.key(3), schedule=EDM, steps=steps)
  x = np.asarray(x, np.float64)
  if steps == 1:  # f(sigma_max z, sigma_max) sample by sample (x_T / alpha(1) = sqrt(1 + sigma_max^2) z).
    ratio = math.sqrt((s**2 + SIGMA_MIN**2) / (s**2 + SIGMA_MAX**2))
    expected = mu + ratio * (math.sqrt(1 + SIGMA_MAX**2) * x_T - mu)
    np.testing.assert_allclose(x, expected, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(x.mean(0), mu, atol=0.01)
  np.testing.assert_allclose(x.std(0), math.sqrt(s**2 + SIGMA_MIN**2), rtol=0.015)


# ----------------------------------------------------------------------------------------------------
# Tiny runs.

CONSISTENCY = {"distill.method": "consistency", "diffusion.process": "edm", "diffusion.num_timesteps": 0,
               "diffusion.prediction": "consistency", "diffusion.model_time": "c_noise",
               "consistency.s0": 2, "consistency.s1": 4, "sample.sampler": "consistency",
               "sample.steps": 1}


def tiny_config(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def runs(trained_workdir, tmp_path_factory):
  """conftest's class-conditional VP teacher (2 steps); a distilled student of 2 steps, straight and
  resumed from step 1; 1 CT step (unconditional)."""
  root = tmp_path_factory.mktemp("consistency")
  os.symlink(trained_workdir, root / "teacher")
  cd = tiny_config(**CONSISTENCY, **{"distill.teacher": str(root / "teacher"), "training.num_steps": 2,
                                     "training.checkpoint_every": 1, "consistency.target_decay": 0.9,
                                     "model.num_classes": 10})
  states = {"cd": train_lib.train(cd, str(root / "cd"))}
  shutil.copytree(root / "cd", root / "cd_resumed")
  shutil.rmtree(root / "cd_resumed" / "checkpoints" / "2")
  states["cd_resumed"] = train_lib.train(cd, str(root / "cd_resumed"))
  states["ct"] = train_lib.train(tiny_config(**CONSISTENCY, **{"training.num_steps": 1}), str(root / "ct"))
  return root, states


def test_distillation_resumes_bit_identically(runs):
  _, states = runs
  assert int(states["cd"].step) == int(states["cd_resumed"].step) == 2
  a, b = (jax.device_get(states[k]) for k in ("cd", "cd_resumed"))
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree.leaves(diffs)) == 0.0  # params, EMA, target network and Adam's moments.
  # mu = 0.9: the target network moved a tenth of the way, neither staying nor jumping to the params.
  moved = lambda p, q: max(jax.tree.leaves(jax.tree.map(lambda u, v: float(np.max(np.abs(u - v))), p, q)))
  assert 0 < moved(a.target_params, a.params) and moved(a.params, a.ema_params) > 0
  assert int(states["ct"].step) == 1
  ct = jax.device_get(states["ct"])
  assert moved(ct.target_params, ct.params) == 0.0  # mu = 0: the online network (iCT).


def test_sample_mode_draws_with_the_consistency_sampler(runs):
  root, _ = runs
  path = sample_lib.sample(tiny_config(**CONSISTENCY), str(root / "cd"))
  with np.load(path + ".npz") as f:
    assert f["images"].shape == (8, 8, 8, 1) and f["images"].dtype == np.uint8
    assert len(np.unique(f["images"])) > 2
  assert "step2_consistency_1steps" in path
  with pytest.raises(ValueError, match=r"config\.sample\.sampler='ddim' with config\.diffusion\."
                                       r"prediction='consistency'"):
    sample_lib.sample(tiny_config(**{**CONSISTENCY, "sample.sampler": "ddim"}), str(root / "cd"))


def bad_values(root):
  teacher = str(root / "teacher")
  return [
      ({"diffusion.sigma_min": 80.0, "diffusion.sigma_max": 0.002},
       r"config\.diffusion\.sigma_min=80\.0 and config\.diffusion\.sigma_max=0\.002 must satisfy"),
      ({"distill.teacher": str(root / "missing")}, r"config\.distill\.teacher='.*missing' does not exist"),
      ({"distill.teacher": teacher, "data.image_size": 16, "model.unet.attn_resolutions": (8,)},
       r"config\.distill\.teacher='.*teacher' is a different model: its config\.data\.image_size=8"),
      ({"distill.teacher": teacher, "model.num_classes": 0},
       r"config\.distill\.teacher='.*teacher' is a different model: its config\.model\.num_classes=10"),
      ({"distill.teacher": str(root / "cd")}, r"config\.distill\.teacher='.*cd' is a consistency model"),
      ({"distill.teacher": teacher, "diffusion.sigma_max": 500.0},
       r"config\.distill\.teacher='.*teacher' reaches sigma 1\d\d\.?\d* at t = 1, below .*sigma_max=500"),
      ({"distill.method": None}, r"config\.diffusion\.prediction='consistency' and config\.distill\.method"),
      ({"diffusion.process": "vp", "diffusion.num_timesteps": 1000, "diffusion.model_time": "index"},
       r"config\.distill\.method='consistency' needs config\.diffusion\.process='edm'"),
      ({"consistency.s0": 8, "consistency.s1": 4}, r"config\.consistency\.s0=8 and s1=4"),
      ({"consistency.loss": "lpips"}, r"config\.consistency\.loss='lpips' is not one of pseudo_huber, l2"),
      ({"consistency.target_decay": 1.0}, r"config\.consistency\.target_decay=1\.0 must be in \[0, 1\)"),
  ]


def test_bad_input_is_named_before_anything_compiles(runs, monkeypatch):
  root, _ = runs
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  for i, (overrides, match) in enumerate(bad_values(root)):
    workdir = root / f"bad{i}"
    with pytest.raises(ValueError, match=match):
      train_lib.train(tiny_config(**{**CONSISTENCY, "model.num_classes": 10, **overrides}), str(workdir))
    assert not compiled and not workdir.exists(), overrides


def test_consistency_options_refuse_other_samplers():
  with pytest.raises(ValueError, match=r"config\.sample\.sampler='consistency' with config\.diffusion\."
                                       r"prediction='eps'"):
    generate.SampleOptions.from_config(tiny_config(**{"sample.sampler": "consistency"}))
