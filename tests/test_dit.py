"""DiT (Peebles & Xie 2023): parameter counts of the paper's table, adaLN-Zero start, patch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import cifar10_dit
from configs import tiny
from models import dit
from training import config_check
from training import generate
from training import train as train_lib

# Peebles & Xie 2023, Table 1, millions of parameters (given for the model size; the patch size moves the
# count by at most 1%, in the patch embedding and the output layer).
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


def _param_shapes(model, shape=(1, 32, 32, 4), labels=True):
  x = jnp.zeros(shape)
  y = {"label": jnp.zeros((shape[0],), jnp.int32)} if labels else None
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((shape[0],)), y,
                                           train=False))["params"]


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_parameter_counts_match_the_paper(size, patch):
  hidden, depth, heads = dit.SIZES[size]
  model = dit.DiT(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, num_classes=1000)
  count = models.count_params(_param_shapes(model))  # ImageNet 256: 32x32x4 SD latents, 1000 classes.
  assert abs(count / 1e6 - PAPER_MILLIONS[size]) / PAPER_MILLIONS[size] < 0.01
  if patch == 2:
    assert round(count / 1e6) == PAPER_MILLIONS[size]
  if size == "XL" and patch == 2:
    # The reference repository counts its frozen position embeddings (256 x 1152) and the learned-sigma
    # half of the output layer (1152 x 16 + 16) too: 675,129,632 for DiT-XL/2.
    assert count + 256 * hidden + hidden * 16 + 16 == 675_129_632
    learned = dit.DiT(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                      num_classes=1000, learn_sigma=True)
    assert models.count_params(_param_shapes(learned)) + 256 * hidden == 675_129_632


def test_adaln_zero_blocks_start_as_the_identity():
  block = dit.DiTBlock(num_heads=4)
  x = jax.random.normal(jax.random.key(1), (2, 16, 64))
  c = jax.random.normal(jax.random.key(2), (2, 64))
  params = block.init(jax.random.key(3), x, c)["params"]
  np.testing.assert_array_equal(block.apply({"params": params}, x, c), x)
  # With a non-zero gate the attention and MLP branches do change x: the identity came from adaLN-Zero.
  moved = jax.tree.map(lambda p: p, params)
  moved["adaLN_modulation"]["bias"] = jnp.full_like(params["adaLN_modulation"]["bias"], 0.5)
  assert float(jnp.max(jnp.abs(block.apply({"params": moved}, x, c) - x))) > 1e-2


def test_model_starts_at_zero_and_unpatchifies_in_the_reference_layout():
  model = dit.DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t, y = jnp.array([10.0, 500.0]), {"label": jnp.array([1, 3])}
  params = jax.jit(lambda rng: model.init(rng, x, t, y, train=False))(jax.random.key(1))["params"]
  out = jax.jit(lambda p: model.apply({"params": p}, x, t, y, train=False))(params)
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialised output layer (adaLN-Zero).
  # A bias alone on the output layer: pixel (r, c, ch) of every patch reads bias[(r % p, c % p, ch)], the
  # reference's 'nhwpqc -> nchpwq' unpatchify.
  bias = jnp.arange(2 * 2 * 3, dtype=jnp.float32)
  params = {**params, "final_linear": {**params["final_linear"], "bias": bias}}
  out = model.apply({"params": params}, x, t, y, train=False)
  expected = np.tile(np.asarray(bias).reshape(2, 2, 3), (4, 4, 1))
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[1], expected)


def test_position_embeddings_match_the_reference_formula():
  emb = dit.sincos_pos_embed_2d(8, 2, 3)
  assert emb.shape == (6, 8)
  # Token k = (row i, column j) row-major; the first half encodes the column j, the second the row i,
  # each as [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(d / (D / 4)).
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  for k in range(6):
    i, j = divmod(k, 3)
    ref = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
    np.testing.assert_allclose(emb[k], ref, rtol=1e-6)


def test_conditioning_changes_the_output_once_trained_layers_are_nonzero():
  model = dit.DiT(patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  params = model.init(jax.random.key(1), x, jnp.zeros((2,)), {"label": jnp.zeros((2,), jnp.int32)},
                      train=False)
  # Give every zero-initialised layer random weights, as training would.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  run = lambda t, y: model.apply(params, x, jnp.full((2,), t), None if y is None else {"label": y},
                                 train=False)
  base = run(10.0, jnp.array([1, 1]))
  assert float(jnp.max(jnp.abs(run(900.0, jnp.array([1, 1])) - base))) > 1e-3  # Time.
  assert float(jnp.max(jnp.abs(run(10.0, jnp.array([2, 2])) - base))) > 1e-3  # Class.
  assert float(jnp.max(jnp.abs(run(10.0, None) - base))) > 1e-3  # The null class of guidance.


def test_bad_shapes_name_the_config_key():
  model = dit.DiT(patch_size=4, hidden_size=32, depth=1, num_heads=4)
  with pytest.raises(ValueError, match="config.model.dit.patch_size=4"):
    model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros((1,)), train=False)
  with pytest.raises(ValueError, match="config.model.dit.num_heads=5"):
    dit.DiT(patch_size=2, hidden_size=32, depth=1, num_heads=5).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)), train=False)


def _tiny_dit_config():
  config = tiny.get_config()
  config.model.name = "dit"
  config.model.dit.update(patch_size=2, hidden_size=32, depth=2, num_heads=4)
  config.model.num_classes = 10
  config.diffusion.p_uncond = 0.1
  return config


def test_a_tiny_dit_trains_and_samples_through_the_same_entry_points(tmp_path):
  config = _tiny_dit_config()
  config.model.dit.learn_sigma = True  # DiT's setting: the hybrid loss, and variances to sample with.
  config.training.num_steps = 3
  state = train_lib.train(config, str(tmp_path))
  assert int(state.step) == 3
  assert "blocks_1" in state.params and "x_embedder" in state.params
  # Training moved the zero-initialised output layer, both the eps and the variance channels of every
  # patch position: the loss reached every block and L_vlb the variances.
  kernel = np.asarray(state.params["final_linear"]["kernel"]).reshape(32, 2, 2, 2)
  assert np.all(np.max(np.abs(kernel), axis=0) > 0)
  mesh = train_lib.create_mesh()
  for sampler_name, variance in (("dpmpp_2m", "small"), ("ddpm", "learned")):
    config.sample.update(sampler=sampler_name, ddpm_variance=variance, steps=3, guidance_scale=2.0)
    sampler = generate.Sampler.from_config(config, model=models.create_model(config.model),
                                           schedule=train_lib.create_schedule(config.diffusion),
                                           mesh=mesh, image_shape=(8, 8, 1))
    images, labels = sampler.sample(state.ema_params, seed=0, num=8)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
    assert len(np.unique(images)) > 1  # Finite samples: NaNs would come out as one value.
    np.testing.assert_array_equal(labels, np.arange(8) % 10)


def test_learned_variances_are_refused_off_the_discrete_vp_process():
  config = _tiny_dit_config()
  config.model.dit.learn_sigma = True
  config.diffusion.update(process="flow", num_timesteps=0, prediction="velocity")
  with pytest.raises(ValueError, match=r"config\.model\.dit\.learn_sigma=True .* "
                     r"config\.diffusion\.process='vp' \(got 'flow'\)"):
    config_check.validate_config(config, device_count=8, process_count=1)
  config = _tiny_dit_config()  # Without learned variances there are none to sample with.
  config.sample.ddpm_variance = "learned"
  with pytest.raises(ValueError, match=r"config\.sample\.ddpm_variance='learned' needs"):
    config_check.validate_config(config, device_count=8, process_count=1)


@pytest.mark.parametrize("key,value,match", [
    ("patch_size", 3, r"config\.data\.image_size=8 is not divisible by config\.model\.dit\.patch_size=3"),
    ("num_heads", 5, r"config\.model\.dit\.num_heads=5 does not divide config\.model\.dit\.hidden_size=32"),
    ("depth", 0, r"config\.model\.dit\.depth=0 must be a positive integer"),
    ("mlp_ratio", -1.0, r"config\.model\.dit\.mlp_ratio=-1\.0 must be positive"),
])
def test_bad_dit_config_names_the_key(key, value, match):
  config = _tiny_dit_config()
  config.model.dit[key] = value
  with pytest.raises(ValueError, match=match):
    config_check.validate_config(config, device_count=8, process_count=1)


def test_settings_of_the_unused_backbone_do_not_block_a_run():
  config = tiny.get_config()  # A UNet run.
  config.model.dit.num_heads = 5  # Would not divide the DiT's hidden size, but no DiT is built.
  config_check.validate_config(config, device_count=8, process_count=1)


def test_shipped_dit_config_builds_dit_b2():
  config = cifar10_dit.get_config()
  config_check.validate_config(config, device_count=8, process_count=1)
  model = models.create_model(config.model)
  assert isinstance(model, dit.DiT)
  count = models.count_params(_param_shapes(model, (1, 32, 32, 3), labels=False))
  assert round(count / 1e6) == PAPER_MILLIONS["B"]
