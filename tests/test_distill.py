"""Progressive distillation: the target against a Gaussian's exact denoiser, the grids, a tiny round
that resumes bit-identically and is sampled at its steps, and bad input refused before compiling."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from diffusion import distillation
from diffusion import samplers
from diffusion import schedules
from evaluation import run as run_lib
from training import config_check
from training import progressive
from training import sample as sample_lib
from training import sharding
from training import tasks
from training import train as train_lib

MU, STD = 0.3, 0.6  # The data: x0 ~ N(MU, STD^2) in every dimension.


def gaussian_denoiser(schedule):
  """The exact E[x0 | x_t] of Gaussian data and the eps it implies (a teacher without error)."""
  def denoise_fn(x, t):
    _, alpha, sigma = samplers.noise_level(schedule, t)
    x0 = MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x - alpha * MU)
    return x0, (x - alpha * x0) / sigma
  return denoise_fn


SCHEDULES = {"discrete_cosine": schedules.create_schedule(schedule="cosine", num_timesteps=1000),
             "continuous_linear": schedules.create_schedule(schedule="linear", num_timesteps=0),
             "flow": schedules.create_schedule(schedule="linear", num_timesteps=0, process="flow")}


@pytest.mark.parametrize("name", SCHEDULES)
def test_one_student_step_to_the_target_is_two_teacher_steps(name):
  schedule = SCHEDULES[name]
  teacher = gaussian_denoiser(schedule)
  student_times = distillation.student_grid(schedule=schedule, steps=4)
  teacher_times = distillation.teacher_grid(schedule=schedule, steps=4)
  z = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  for k in range(4):  # Every student step, the last one (to t = 0) included.
    t, t_mid, t_next = student_times[k], teacher_times[2 * k + 1], student_times[k + 1]
    z_next = distillation.two_teacher_steps(teacher, z, t=t, t_mid=t_mid, t_next=t_next,
                                            schedule=schedule)
    _, alpha_t, sigma_t = samplers.noise_level(schedule, t)
    _, alpha_n, sigma_n = samplers.noise_level(schedule, t_next)
    x_target = distillation.ddim_x_target(z_t=z, z_next=z_next, alpha_t=alpha_t, sigma_t=sigma_t,
                                          alpha_next=alpha_n, sigma_next=sigma_n)
    student = lambda x, _: (x_target, (x - alpha_t * x_target) / sigma_t)  # The analytic student.
    one = samplers.sample_ddim(student, z, jnp.stack([t, t_next]), jax.random.key(1), schedule=schedule)
    two = samplers.sample_ddim(teacher, z, jnp.stack([t, t_mid, t_next]), jax.random.key(1),
                               schedule=schedule)
    np.testing.assert_allclose(one, two, rtol=2e-5, atol=2e-5)
    # Not the teacher's own x0 at t: the target carries the second step's correction.
    assert float(jnp.max(jnp.abs(x_target - teacher(z, t)[0]))) > 1e-3


def test_loss_weights():
  logsnr = jnp.array([-3.0, 0.0, 2.0])
  np.testing.assert_allclose(distillation.x_loss_weight("truncated_snr", logsnr=logsnr),
                             [1.0, 1.0, np.exp(2.0)], rtol=1e-6)
  np.testing.assert_allclose(distillation.x_loss_weight("snr_plus_one", logsnr=logsnr),
                             [1.0 + np.exp(-3.0), 2.0, 1.0 + np.exp(2.0)], rtol=1e-6)


def test_student_grid_is_every_other_time_of_the_teachers():
  continuous = SCHEDULES["continuous_linear"]
  np.testing.assert_allclose(distillation.student_grid(schedule=continuous, steps=4),
                             [1.0, 0.75, 0.5, 0.25, 0.0])
  for schedule in SCHEDULES.values():
    for n in (1, 2, 8, 64, 256):
      student = np.asarray(distillation.student_grid(schedule=schedule, steps=n))
      teacher = np.asarray(distillation.teacher_grid(schedule=schedule, steps=n))
      assert len(student) == n + 1 and student[0] == 1.0 and student[-1] == 0.0
      np.testing.assert_array_equal(teacher[::2], student)
      assert np.all(np.diff(teacher) < 0)
  # On 1000 discrete steps the times are trained ones, i / 1000.
  times = np.asarray(distillation.teacher_grid(schedule=SCHEDULES["discrete_cosine"], steps=64)) * 1000
  np.testing.assert_allclose(times, np.round(times), atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# A tiny round: conftest's eps teacher, a v student of 2 DDIM steps trained 4 steps, and the same
# student stopped at step 2 and resumed.


def student_config(teacher, **overrides):
  config = tiny.get_config()
  config.model.num_classes = 10
  config.diffusion.p_uncond = 0.2
  config.diffusion.prediction = "v"  # The teacher predicts eps; the student v, from its weights.
  config.distill.method = "progressive"
  config.distill.teacher = teacher
  config.distill.student_steps = 2
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def runs(trained_workdir, tmp_path_factory):
  """(root, states): root/teacher is conftest's trained_workdir; root/student a round of 4 steps,
  root/resumed the same round from its step-2 checkpoint."""
  root = tmp_path_factory.mktemp("distill")
  os.symlink(trained_workdir, root / "teacher")
  config = student_config(str(root / "teacher"))
  states = {"straight": train_lib.train(config, str(root / "student"))}
  shutil.copytree(root / "student", root / "resumed")
  shutil.rmtree(root / "resumed" / "checkpoints" / "4")
  states["resumed"] = train_lib.train(config, str(root / "resumed"))
  return root, states


def max_difference(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_student_starts_from_the_teacher_and_resumes_bit_identically(runs):
  root, states = runs
  teacher_params = jax.device_get(run_lib.load_run(str(root / "teacher"))[1].ema_params)
  config = progressive.with_student_sampler(student_config(str(root / "teacher")))
  task = tasks.create_task(config, image_shape=(8, 8, 1), rng=jax.random.key(0),
                           mesh=train_lib.create_mesh())
  assert max_difference(jax.device_get(task.init_state(jax.random.key(1)).params), teacher_params) == 0.0
  # On an fsdp mesh the frozen teacher is split like the student's params, not replicated.
  config.mesh.update(fsdp=4, fsdp_min_size=64)
  mesh = train_lib.create_mesh(config.mesh)
  task = tasks.create_task(config, image_shape=(8, 8, 1), rng=jax.random.key(0), mesh=mesh)
  want = sharding.state_shardings(task.constants["teacher"], mesh=mesh, fsdp_min_size=64)
  got = jax.tree.map(lambda x: x.sharding, task.constants["teacher"])
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  assert any(s.spec != P() for s in jax.tree.leaves(got))
  assert int(states["straight"].step) == int(states["resumed"].step) == 4
  assert max_difference(jax.device_get(states["straight"].params),
                        jax.device_get(states["resumed"].params)) == 0.0
  assert max_difference(jax.device_get(states["straight"].params), teacher_params) > 0  # It trained.


def test_the_run_records_its_sampler_and_sample_mode_uses_it(runs):
  root, _ = runs
  saved = json.loads((root / "student" / "config.json").read_text())["sample"]
  assert (saved["sampler"], saved["steps"], saved["grid"], saved["clip_x0"]) == ("ddim", 2, "trailing", False)
  config = student_config(str(root / "teacher"), **{"sample.steps": None, "sample.num": 8,
                                                     "sample.grid": "trailing"})
  path = sample_lib.sample(config, str(root / "student"))
  with np.load(path + ".npz") as f:
    settings = json.loads(str(f["settings"]))
    assert f["images"].shape == (8, 8, 8, 1)
  assert (settings["sampler"], settings["steps"], settings["grid"]) == ("ddim", 2, "trailing")
  assert os.path.basename(path).startswith("step4_ddim_2steps_")


@pytest.mark.parametrize("overrides,message", [
    ({"distill.teacher": "MISSING"}, r"config\.distill\.teacher='.*missing' does not exist"),
    ({"model.unet.ch": 16}, r"config\.distill\.teacher=.*\n  model\.unet\.ch: teacher 8, student 16"),
    ({"distill.student_steps": 3}, r"config\.distill\.student_steps=3 must be a power of two"),
    ({"distill.teacher": "STUDENT"}, r"config\.distill\.student_steps=2: the teacher .* is a "
                                     r"progressive student of 2 steps; the next round has 1"),
    ({"diffusion.prediction": "eps"}, r"config\.diffusion\.prediction='eps' cannot be a progressive"),
])
def test_bad_input_is_refused_before_compiling(runs, tmp_path, monkeypatch, overrides, message):
  root, _ = runs
  where = {"MISSING": str(root / "missing"), "STUDENT": str(root / "student")}
  overrides = {k: where.get(v, v) for k, v in overrides.items()}
  def compile_nothing(*args, **kwargs):
    raise AssertionError("the training loop started")
  monkeypatch.setattr(train_lib, "_train", compile_nothing)  # Where the state and step compile.
  workdir = tmp_path / "new"
  with pytest.raises(ValueError, match=message):
    train_lib.train(student_config(str(root / "teacher"), **overrides), str(workdir))
  assert not os.path.exists(workdir / "checkpoints") and not os.path.exists(workdir / "config.json")


def test_distill_section_alone_is_checked(tmp_path):
  config = student_config(str(tmp_path), **{"distill.weighting": "snr"})
  with pytest.raises(ValueError, match=r"config\.distill\.weighting='snr' is not one of truncated_snr"):
    config_check.validate_distill(config)
  config = student_config(str(tmp_path), **{"diffusion.num_timesteps": 2})
  with pytest.raises(ValueError, match=r"teacher's grid of 4 steps needs at most"):
    config_check.validate_distill(config)
