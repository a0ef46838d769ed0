"""Fully sharded training on a ("data", "fsdp") mesh: the rule, equality with data parallelism,
memory per device, restoring onto another mesh, and bad mesh configs."""

import functools
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from configs import tiny
from training import checkpoints
from training import config_check
from training import generate
from training import sharding
from training import train as train_lib
from training import train_step as train_step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (8, 8, 1)
MIN_SIZE = 256  # Small enough that the tiny models' kernels are split, their biases not.
STEPS = 3


def _config(name, *, data=-1, fsdp=1):
  config = tiny.get_config()
  if name == "dit":
    config.model.name = "dit"
    config.model.dit.update(patch_size=2, hidden_size=32, depth=2, num_heads=4)
  config.mesh.update(data=data, fsdp=fsdp, fsdp_min_size=MIN_SIZE)
  return config


def _run(config, mesh, state0, batches):
  """STEPS train steps jitted as training/train.py does, from state0 laid out by the rule."""
  target = train_lib.abstract_state(config, image_shape=IMAGE_SHAPE, mesh=mesh)
  shardings = jax.tree.map(lambda s: s.sharding, target)
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  step = jax.jit(train_step_lib.make_train_step(
      model=models.create_model(config.model), schedule=train_lib.create_schedule(config.diffusion),
      tx=tx, lr_fn=lr_fn, hparams=train_step_lib.DiffusionHParams.from_config(config.diffusion),
      num_classes=0, ema_decay=config.optim.ema_decay, rng=jax.random.key(1)),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  state, losses = jax.device_put(state0, shardings), []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses), target


@functools.cache
def _trained(name):
  """The same STEPS steps on the 8x1 (data parallel, the default) and 2x4 (data x fsdp) meshes."""
  config = _config(name)
  tx, _ = train_step_lib.create_optimizer(config.optim)
  state0 = jax.device_get(train_step_lib.init_state(
      jax.random.key(0), model=models.create_model(config.model), tx=tx, image_shape=IMAGE_SHAPE,
      num_classes=0))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(-1, 1, (16, *IMAGE_SHAPE)).astype(np.float32),
              "label": np.zeros((16,), np.int32)} for _ in range(STEPS)]
  dp = _run(config, train_lib.create_mesh(), state0, batches)
  fsdp_config = _config(name, data=2, fsdp=4)
  fsdp_mesh = train_lib.create_mesh(fsdp_config.mesh)
  return {"state0": state0, "dp": dp, "fsdp": _run(fsdp_config, fsdp_mesh, state0, batches),
          "config": fsdp_config, "mesh": fsdp_mesh}


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_a_2x4_step_equals_the_data_parallel_step(name):
  run = _trained(name)
  (dp, dp_losses, _), (fsdp, fsdp_losses, target) = run["dp"], run["fsdp"]
  assert dict(run["mesh"].shape) == {"data": 2, "fsdp": 4}
  np.testing.assert_allclose(fsdp_losses, dp_losses, rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), dp.params,
                       run["state0"].params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # The steps moved the parameters: the comparison bites.
  for a, b in zip(jax.tree.leaves(jax.device_get(fsdp)), jax.tree.leaves(jax.device_get(dp))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The step kept the state where the rule put it, and the rule did split weights.
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(fsdp)]
  assert specs == [t.sharding.spec for t in jax.tree.leaves(target)]
  assert sum(sharding.FSDP in spec for spec in specs) >= 4 * 8  # Params, EMA, mu, nu: 8+ kernels.
  assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(dp))


def test_each_weight_is_split_as_the_rule_says():
  state = _trained("dit")["fsdp"][0]
  block = state.params["blocks_0"]
  expected = {
      "fc1": ((32, 128), P(None, "fsdp")),  # The larger dimension.
      "fc2": ((128, 32), P("fsdp", None)),
      "proj": ((32, 32), P(None, "fsdp")),  # A tie: the last dimension.
      "adaLN_modulation": ((32, 192), P(None, "fsdp")),
  }
  for layer, (shape, spec) in expected.items():
    kernel = block[layer]["kernel"]
    assert kernel.shape == shape and kernel.sharding.spec == spec, layer
    assert block[layer]["bias"].sharding.spec == P(), layer  # Below config.mesh.fsdp_min_size.
  assert state.params["x_embedder"]["kernel"].sharding.spec == P()  # 2*2*1*32 = 128 elements.
  # EMA and Adam's moments follow their parameters; the step counters are replicated.
  adam = state.opt_state[1][0]
  for tree in (state.ema_params, adam.mu, adam.nu):
    assert tree["blocks_0"]["fc2"]["kernel"].sharding.spec == P("fsdp", None)
  assert state.step.sharding.spec == P() and adam.count.sharding.spec == P()
  unet = _trained("unet")["fsdp"][0].params
  assert unet["mid_res_0"]["conv_0"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  assert unet["up_1_res_0"]["conv_0"]["kernel"].sharding.spec == P(None, None, "fsdp", None)
  assert unet["conv_in"]["kernel"].sharding.spec == P()  # 3*3*1*8 = 72 elements.


@pytest.mark.parametrize("shape,fsdp_size,dim", [
    ((8, 12), 4, 1), ((12, 8), 4, 0), ((8, 8), 4, 1), ((4, 6, 10), 2, 2), ((3, 3, 16, 16), 4, 3),
    ((4096,), 4, 0), ((3, 5, 7), 4, None), ((), 4, None), ((8, 12), 1, None), ((4, 4), 4, None),
])
def test_fsdp_dim(shape, fsdp_size, dim):
  assert sharding.fsdp_dim(shape, fsdp_size=fsdp_size, min_size=20) == dim


def test_a_large_weight_that_cannot_be_split_is_replicated_and_named_once(caplog):
  mesh = train_lib.create_mesh(_config("unet", data=2, fsdp=4).mesh)
  tree = {"odd": jax.ShapeDtypeStruct((3, 5, 7), np.float32),
          "even": jax.ShapeDtypeStruct((3, 5, 8), np.float32)}
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      specs = sharding.state_shardings(tree, mesh=mesh, fsdp_min_size=100)
  assert specs["odd"].spec == P() and specs["even"].spec == P(None, None, "fsdp")
  warnings = [r.getMessage() for r in caplog.records if "stay replicated" in r.getMessage()]
  assert len(warnings) == 1
  assert "['odd'] [3, 5, 7]" in warnings[0] and "config.mesh.fsdp=4" in warnings[0]
  assert "even" not in warnings[0]


def test_state_bytes_per_device_fall_by_the_fsdp_factor():
  run = _trained("unet")
  dp, fsdp, target = run["dp"][0], run["fsdp"][0], run["fsdp"][2]
  device = jax.devices()[0]

  def on_device(leaf):
    return sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)

  large = small = 0
  for a, b in zip(jax.tree.leaves(fsdp), jax.tree.leaves(dp)):
    assert on_device(b) == b.nbytes  # Data parallel: every device holds every array.
    if sharding.FSDP in a.sharding.spec:
      assert on_device(a) * 4 == a.nbytes
      large += a.nbytes
    else:
      assert on_device(a) == a.nbytes
      small += a.nbytes
  fsdp_bytes = sum(map(on_device, jax.tree.leaves(fsdp)))
  dp_bytes = sum(map(on_device, jax.tree.leaves(dp)))
  assert fsdp_bytes == small + large // 4 and dp_bytes == small + large
  assert large > 0.9 * dp_bytes and fsdp_bytes < 0.3 * dp_bytes
  assert sharding.bytes_per_device(target) == fsdp_bytes


@pytest.fixture(scope="module")
def saved_2x4(tmp_path_factory):
  """The 2x4-sharded UNet state saved by checkpoints.save, as training saves it."""
  run = _trained("unet")
  workdir = str(tmp_path_factory.mktemp("saved_2x4"))
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, STEPS, run["fsdp"][0], config=run["config"], image_shape=IMAGE_SHAPE)
  manager.close()
  return workdir, run["fsdp"][0]


@pytest.mark.parametrize("devices,data,fsdp", [(2, 1, 2), (8, 2, 4), (8, -1, 1)])
def test_a_2x4_checkpoint_restores_bit_identical_on_another_mesh(saved_2x4, devices, data, fsdp):
  workdir, saved = saved_2x4
  config = _config("unet", data=data, fsdp=fsdp)
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:devices])
  target = train_lib.abstract_state(config, image_shape=IMAGE_SHAPE, mesh=mesh)
  manager = checkpoints.create_manager(workdir, read_only=True)
  # The mesh differs from the saved config's: it may change on resume.
  restored, step = checkpoints.restore(manager, target, config=config, image_shape=IMAGE_SHAPE)
  manager.close()
  assert step == STEPS
  for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(target)):
    assert a.sharding == t.sharding and len(a.sharding.device_set) == devices
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_sampler_takes_sharded_params():
  run = _trained("dit")
  config = run["config"]
  config.sample.update(sampler="ddim", steps=2)
  params = run["dp"][0].ema_params  # Replicated over the 8x1 mesh.
  sharded = jax.device_put(params, jax.tree.map(lambda s: s.sharding, run["fsdp"][2].ema_params))
  model, schedule = models.create_model(config.model), train_lib.create_schedule(config.diffusion)
  images = {}
  for key, mesh, p in (("dp", train_lib.create_mesh(), params), ("fsdp", run["mesh"], sharded)):
    sampler = generate.Sampler.from_config(config, model=model, schedule=schedule, mesh=mesh,
                                           image_shape=IMAGE_SHAPE)
    images[key], _ = sampler.sample(p, seed=0, num=8)
  diff = np.abs(images["fsdp"].astype(int) - images["dp"].astype(int))
  assert images["dp"].std() > 10 and diff.max() <= 1 and diff.mean() < 0.01


def test_train_on_2x4_through_main_then_resume_on_the_default_mesh(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.mesh.data=2", "--config.mesh.fsdp=4", f"--config.mesh.fsdp_min_size={MIN_SIZE}",
       "--config.training.num_steps=2"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Mesh: data 2 x fsdp 4." in proc.stderr
  manager = checkpoints.create_manager(str(workdir), read_only=True)
  assert manager.all_steps() == [2]
  fsdp_mesh = train_lib.create_mesh(_config("unet", data=2, fsdp=4).mesh)
  on_2x4, _ = checkpoints.restore(manager, train_lib.abstract_state(
      _config("unet", data=2, fsdp=4), image_shape=IMAGE_SHAPE, mesh=fsdp_mesh))
  manager.close()
  assert on_2x4.params["mid_res_0"]["conv_0"]["kernel"].sharding.spec == P(None, None, None, "fsdp")

  config = tiny.get_config()  # The default mesh: data parallel over the 8 devices.
  resumed = train_lib.train(config, str(workdir))
  assert int(resumed.step) == config.training.num_steps == 4
  assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(resumed))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(resumed.params)))
  # Two steps were taken from the 2x4 run's parameters.
  kernel = lambda state: np.asarray(state.params["mid_res_0"]["conv_0"]["kernel"])
  assert 0 < np.max(np.abs(kernel(resumed) - kernel(on_2x4))) < 0.1


@pytest.mark.parametrize("overrides,match", [
    ({"mesh.data": 3, "mesh.fsdp": 2},
     r"config\.mesh\.data x config\.mesh\.fsdp = 3 x 2 = 6 is not the 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1},
     r"config\.mesh\.data=-1 and config\.mesh\.fsdp=-1: at most one"),
    ({"mesh.fsdp": 0}, r"config\.mesh\.fsdp=0 must be a positive integer or -1"),
    ({"mesh.data": -2}, r"config\.mesh\.data=-2 must be a positive integer or -1"),
    ({"mesh.fsdp": 3}, r"config\.mesh\.fsdp=3 does not divide the 8 devices"),
    ({"mesh.fsdp_min_size": -1}, r"config\.mesh\.fsdp_min_size=-1 must be an integer >= 0"),
    ({"mesh.fsdp": 4, "training.batch_size": 12},
     r"config\.training\.batch_size=12 is not divisible by the 8 devices \(config\.mesh\.data x "
     r"config\.mesh\.fsdp = 2 x 4\)"),
])
def test_bad_mesh_configs_name_the_key(tmp_path, overrides, match):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=match):
    config_check.validate_config(config, device_count=8, process_count=1)
  with pytest.raises(ValueError, match=match):  # Before anything is compiled or written.
    train_lib.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_configs_saved_before_the_mesh_section_load_with_the_default():
  saved = tiny.get_config().to_dict()
  del saved["mesh"]
  config = checkpoints.as_current_config(saved)
  assert (config.mesh.data, config.mesh.fsdp) == (-1, 1)
  assert sharding.mesh_shape(config.mesh, device_count=8) == (8, 1)
  assert train_lib.abstract_state(config, image_shape=IMAGE_SHAPE, mesh=train_lib.create_mesh())
