"""Few-call solvers and the digits quality metric: UniPC-3's order, optimised grids, the digits FD.

The analytic problem is test_samplers.py's Gaussian mixture, whose probability-flow ODE is solved
to 1e-10 with SciPy from the same starting noise.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_samplers as ts
from configs import default
from diffusion import grids
from diffusion import optimize_grid
from diffusion import samplers
from evaluation import digits_fd
from training import config_check
from training import generate

ORDER_STEPS = (32, 64, 128, 256)


@pytest.mark.parametrize("use_corrector,order", [(True, 4.0), (False, 3.0)])
def test_unipc3_converges_at_order_p_plus_one(use_corrector, order):
  """Zhao et al. 2023, Thm. 3.1 and Cor. 3.2: UniP-3 alone is of order 3, with UniC-3 of order 4.

  Error against the ODE on logSNR-uniform grids to logSNR 4, in float64 (test_samplers.py's setting).
  """
  x_T, t_min, ref = ts._order_problem()  # pylint: disable=protected-access
  errors = []
  with jax.enable_x64(True):
    denoise_fn = ts.analytic_denoise_fn(ts.CONTINUOUS)
    run = jax.jit(lambda x, t: samplers.sample_unipc3(denoise_fn, x, t, jax.random.key(0),
                                                      schedule=ts.CONTINUOUS, lower_order_final=False,
                                                      use_corrector=use_corrector))
    for steps in ORDER_STEPS:
      t = grids.logsnr_grid(schedule=ts.CONTINUOUS, steps=steps + 1, t_min=t_min)[:-1]
      errors.append(np.median(np.linalg.norm(np.asarray(run(jnp.asarray(x_T), t)) - ref, axis=-1)))
  slope = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
  assert abs(slope - order) <= 0.5, (slope, errors)
  assert errors[-1] < 1e-5, errors


# ----------------------------------------------------------------------------------------------------
# Grids optimised against the ODE solution.


@pytest.fixture(name="fitted", scope="module")
def fixture_fitted():
  """UniPC's 5-step grid fitted on 128 starting points; 256 others and their ODE solutions to score it."""
  schedule = ts.DISCRETE
  denoise_fn = ts.analytic_denoise_fn(schedule)
  logsnr_start = float(schedule.logsnr(1.0))
  x_fit = jax.random.normal(jax.random.key(10), (128, 2))
  x_test = jax.random.normal(jax.random.key(11), (256, 2))
  ref_fit = ts.ode_reference(x_fit, logsnr_start=logsnr_start, logsnr_end=np.inf)
  ref_test = ts.ode_reference(x_test, logsnr_start=logsnr_start, logsnr_end=np.inf)
  grid, losses = optimize_grid.optimize_grid(denoise_fn, sampler="unipc", schedule=schedule, steps=5,
                                             x_T=x_fit, reference=jnp.asarray(ref_fit, jnp.float32),
                                             num_iters=150)
  return dict(schedule=schedule, denoise_fn=denoise_fn, grid=grid, losses=losses, x_test=x_test,
              ref_test=ref_test)


def test_optimized_grid_is_a_grid_and_beats_the_default_on_new_points(fitted):
  grid = np.asarray(fitted["grid"])
  assert grid.shape == (6,)
  assert grid[0] == 1.0 and grid[-1] == 0.0
  assert np.all(np.diff(grid) < 0), grid
  run = lambda timesteps: float(optimize_grid.rmse(samplers.sample(
      "unipc", fitted["denoise_fn"], fitted["x_test"], jax.random.key(0), schedule=fitted["schedule"],
      steps=5, timesteps=timesteps), fitted["ref_test"]))
  default_rmse, optimized_rmse = run(None), run(fitted["grid"])
  # Measured: 0.41 on the default logSNR-uniform grid, ~0.1 optimised.
  assert optimized_rmse < 0.5 * default_rmse, (default_rmse, optimized_rmse)
  assert fitted["losses"]["optimized"] < 0.5 * fitted["losses"]["initial"], fitted["losses"]


def test_grid_logits_round_trip():
  schedule = ts.DISCRETE
  grid = optimize_grid.grid_from_logits(jnp.array([0.3, -0.2, 0.1, 0.5, -1.0]), schedule=schedule)
  back = optimize_grid.grid_from_logits(optimize_grid.logits_from_grid(grid, schedule=schedule),
                                        schedule=schedule)
  np.testing.assert_allclose(back, grid, atol=1e-4)  # float32 logSNR table interpolation.


def test_grid_file_is_read_by_sampling_and_checked(fitted, tmp_path):
  """The file scripts/optimize_grid.py writes is what --mode=sample samples on; a bad one is refused."""
  path = tmp_path / "unipc_5.json"
  path.write_text(json.dumps({"timesteps": [float(t) for t in np.asarray(fitted["grid"], np.float64)]}))
  config = default.get_config()
  config.sample.sampler, config.sample.steps, config.sample.grid_file = "unipc", 5, str(path)
  config_check.validate_sample(config.sample)
  options = generate.SampleOptions.from_config(config)
  np.testing.assert_allclose(options.timesteps, fitted["grid"], rtol=1e-6)

  config.sample.steps = 8
  with pytest.raises(ValueError, match=r"grid_file=.* holds 5 steps, not config.sample.steps=8"):
    config_check.validate_sample(config.sample)
  config.sample.steps, config.sample.grid = 5, "karras"
  with pytest.raises(ValueError, match="both name a grid"):
    config_check.validate_sample(config.sample)
  config.sample.grid = None
  path.write_text(json.dumps({"timesteps": [1.0, 0.2, 0.5, 0.1, 0.05, 0.0]}))
  with pytest.raises(ValueError, match="must decrease strictly"):
    config_check.validate_sample(config.sample)
  config.sample.grid_file = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="missing.json' is not a file"):
    config_check.validate_sample(config.sample)


def test_stochastic_sampler_refused():
  with pytest.raises(ValueError, match="sampler='ddpm' is not one of ddim, "):
    optimize_grid.optimize_grid(lambda x, t: (x, x), sampler="ddpm", schedule=ts.DISCRETE, steps=5,
                                x_T=jnp.zeros((2, 2)), reference=jnp.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------------
# The digits FD.


@pytest.fixture(name="cache_dir", scope="module")
def fixture_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_fd"))


@pytest.fixture(name="metric", scope="module")
def fixture_metric(cache_dir):
  return digits_fd.DigitsFD.create(16, cache_dir=cache_dir)


def test_digits_classifier_generalises(metric):
  assert metric.test_accuracy > 0.9


def test_digits_fd_zero_on_identical_sets_and_floor_far_below_noise(metric):
  assert abs(metric.distance(metric.reference_features)) < 1e-6
  noise = np.random.RandomState(0).randint(0, 256, (metric.num, 16, 16, 1)).astype(np.uint8)
  floor, noise_fd = metric.floor(), metric.score(noise)
  # Measured: floor ~5, uniform noise ~1300.
  assert 0 < floor < 0.02 * noise_fd, (floor, noise_fd)
  images, _ = digits_fd.digits(16)
  _, floor_idx, _ = digits_fd.split_indices(len(images))
  assert metric.score(images[floor_idx]) == pytest.approx(floor)
  with pytest.raises(ValueError, match="needs at least 449"):
    metric.score(noise[:10])


def test_digits_fd_classifier_same_seed_same_weights(metric, cache_dir):
  """Training is deterministic, so the cached classifier is what a retrain gives; another seed differs."""
  images, labels = digits_fd.digits(16)
  train, _, _ = digits_fd.split_indices(len(images))
  a = digits_fd.train_classifier(images[train], labels[train], seed=0, steps=20)
  b = digits_fd.train_classifier(images[train], labels[train], seed=0, steps=20)
  c = digits_fd.train_classifier(images[train], labels[train], seed=1, steps=20)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])
  reloaded = digits_fd.DigitsFD.create(16, cache_dir=cache_dir)  # From the file the fixture wrote.
  assert reloaded.floor() == metric.floor()


def test_max_steps_fills_the_nfe_budget():
  assert [samplers.max_steps("heun", n) for n in (1, 2, 4, 8, 16, 50)] == [1, 1, 2, 4, 8, 25]
  assert [samplers.max_steps("unipc3", n) for n in (1, 2, 50)] == [1, 2, 50]
  for name in samplers.SAMPLERS:
    for nfe in range(1, 20):
      steps = samplers.max_steps(name, nfe)
      assert samplers.num_evaluations(name, steps) <= nfe < samplers.num_evaluations(name, steps + 1)


def test_nfe_to_match_interpolates_log_log_and_ignores_round_off():
  from bench import samplers as bench_samplers  # pylint: disable=import-outside-toplevel

  assert bench_samplers.nfe_to_reach([10, 100], [1e-1, 1e-3], 1e-2) == pytest.approx(10**1.5, rel=1e-3)
  assert bench_samplers.nfe_to_reach([10, 100], [1e-1, 1e-3], 1e-4) is None
  # The same algorithm in float32 may miss the target by round-off: it still reaches it.
  assert bench_samplers.nfe_to_reach([50, 100], [0.3, 0.2100001], 0.21) == pytest.approx(100.0, rel=1e-3)


def test_students_option_parsed_and_checked(tmp_path):
  from bench import digits_fd as bench_fd  # pylint: disable=import-outside-toplevel

  assert bench_fd.parse_student(f"pd={tmp_path}:ddim:1,2,4") == ("pd", str(tmp_path), "ddim", [1, 2, 4])
  for spec, match in [(f"pd={tmp_path}:ddim", "NAME=WORKDIR:SAMPLER:STEPS"),
                      (f"pd={tmp_path}:ddim:one", "NAME=WORKDIR:SAMPLER:STEPS"),
                      (f"pd={tmp_path}/missing:ddim:1", "does not exist"),
                      (f"pd={tmp_path}:dpm:1", "config.sample.sampler='dpm' is not one of")]:
    with pytest.raises(ValueError, match=match):
      bench_fd.parse_student(spec)
