"""LoRA (training/lora.py) on a tiny SD UNet: exactness at B = 0, merged vs unmerged, the train step,
the diffusers/PEFT and kohya files, and the errors."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from configs import default as default_config
from diffusion import schedules
from models import clip
from models import sd_unet
from training import config_check
from training import lora
from training import train_step as train_step_lib

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
PROJ_IN = "down_blocks_0/attentions_0/proj_in"  # SD 1.x: a 1x1 convolution [1, 1, 32, 32].
TO_K = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"  # Dense [16 (context), 32].


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


@pytest.fixture(scope="module")
def unet():
  """(model, random params, jitted apply(params, x, t, context), inputs) of a two-level SD 1.x UNet."""
  model = sd_unet.SDUNet(**TINY)
  x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, {"context": jnp.zeros((1, 3, 16))})["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(np.prod(s.shape[:-1])) if p[-1].key == "kernel"
                               else (p[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), jnp.float32), shapes)
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, {"context": c}))
  inputs = (jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32), jnp.array([10.0, 700.0]),
            jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32))
  return model, params, apply, inputs


def _random_adapters(params, patterns, *, rank=4, seed=1):
  adapters = lora.init_adapters(jax.random.key(seed), params, paths=lora.target_paths(params, patterns),
                                rank=rank)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.asarray(0.2 * rng.normal(size=v.shape), jnp.float32) if p[-1].key == "lora_B" else v,
      adapters)


def test_default_targets_are_the_attention_projections_and_b0_is_the_base_exactly(unet):
  model, params, apply, inputs = unet
  assert tuple(default_config.get_config().lora.targets) == lora.UNET_TARGETS
  paths = lora.target_paths(params, lora.UNET_TARGETS)
  # 2 transformer blocks (down 0, mid) + 2 (up 1) = 4, each attn1 and attn2 with q, k, v, out.
  assert len(paths) == 4 * 2 * 4 and all(p.rsplit("/", 1)[1] in ("to_q", "to_k", "to_v", "to_out_0") for p in paths)
  adapters = lora.init_adapters(jax.random.key(0), params, paths=paths, rank=4)
  assert _get(adapters, TO_K)["lora_A"].shape == (16, 4) and _get(adapters, TO_K)["lora_B"].shape == (4, 32)
  assert float(jnp.abs(_get(adapters, TO_K)["lora_A"]).max()) > 0  # A random, B zero (Hu et al., Sec. 4.1).
  merged = lora.merge(params, adapters, scale=3.0)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  np.testing.assert_array_equal(apply(merged, *inputs), apply(params, *inputs))


def test_merged_equals_the_unmerged_low_rank_branch(unet):
  """h = W x + s B A x computed layer by layer (Hu et al. 2021, Eq. 3) vs the layers with merged W."""
  model, params, apply, inputs = unet
  scale = 0.5
  adapters = _random_adapters(params, lora.UNET_TARGETS + ("proj_in$", "conv_in$"))  # + 1x1 and 3x3 convs.
  assert _get(adapters, PROJ_IN)["lora_A"].shape == (1, 1, 32, 4)
  assert _get(adapters, "conv_in")["lora_A"].shape == (3, 3, 4, 4)
  merged_params = lora.merge(params, adapters, scale=scale)
  layers = []  # (module, path, input, unmerged output) of every adapted layer.

  def branch(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
      return out
    path = "/".join(module.scope.path)
    try:
      adapter = _get(adapters, path)
    except KeyError:
      return out
    (x,) = args
    a, b = adapter["lora_A"], adapter["lora_B"]
    if isinstance(module, nn.Conv):  # A: a convolution of the kernel's window to r channels.
      xa = nn.Conv(a.shape[-1], module.kernel_size, strides=module.strides, padding=module.padding,
                   use_bias=False).apply({"params": {"kernel": a}}, x)
    else:
      xa = x @ a
    out = out + scale * (xa @ b)
    layers.append((module, path, x, out))
    return out

  def unmerged_fn(params):  # One compiled forward; each adapted layer's input and output come out too.
    layers.clear()
    with nn.intercept_methods(branch):
      out = model.apply({"params": params}, *inputs[:2], {"context": inputs[2]})
    return out, [(x, y) for _, _, x, y in layers]

  unmerged, values = jax.jit(unmerged_fn)(params)
  modules = [(module.clone(parent=None), path) for module, path, _, _ in layers]
  assert len(modules) == 32 + 4 + 1  # Attention projections, proj_in (down 0, mid, up 1 twice), conv_in.
  # The same inputs through the layers with the merged kernels.
  merged_fn = lambda p, xs: [m.apply({"params": _get(p, path)}, x) for (m, path), x in zip(modules, xs)]
  merged_layers = jax.jit(merged_fn)(merged_params, [x for x, _ in values])
  for (_, path), (_, out), merged in zip(modules, values, merged_layers):
    np.testing.assert_allclose(merged, out, atol=1e-6, rtol=1e-6, err_msg=path)
  merged = apply(merged_params, *inputs)
  assert float(jnp.abs(merged - apply(params, *inputs)).mean()) > 0.05  # The adapters change the output,
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)  # the same way through the whole network.


def test_a_train_step_trains_only_the_adapters(unet):
  model, params, _, inputs = unet
  settings = lora.Settings(rank=4, alpha=8.0)
  tx = optax.adam(1e-2)
  base_init = lambda rng: train_step_lib.TrainState(step=0, params=params, ema_params=params,
                                                    opt_state=tx.init(params))
  state = lora.init_state(jax.random.key(0), base_init=base_init, tx=tx, settings=settings)
  adapter_params, adapter_bytes = lora.count(state.params)
  assert adapter_params == lora.count(lora.init_adapters(
      jax.random.key(0), params, paths=lora.target_paths(params, lora.UNET_TARGETS), rank=4))[0]
  assert adapter_bytes == 4 * adapter_params
  step = jax.jit(train_step_lib.make_train_step(
      model=model, schedule=schedules.create_schedule(schedule="linear", num_timesteps=1000), tx=tx, lr_fn=lambda s: 1e-2,
      hparams=train_step_lib.DiffusionHParams(), num_classes=0, ema_decay=0.5, rng=jax.random.key(1),
      condition=lambda frozen, batch, rng: {"context": batch["context"]},
      params_fn=lora.base_params_fn(settings)))
  base_before = jax.tree.map(np.array, params)
  new, metrics = step(state, {"image": inputs[0], "context": inputs[2]}, {"space": {}, "base": params})
  assert bool(metrics["finite"]) and int(new.step) == 1
  # The state holds adapters only; B moved off zero (A's gradient is zero while B = 0).
  assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(new.params)[0]} == {"lora_A", "lora_B"}
  assert float(jnp.abs(_get(new.params, TO_K)["lora_B"]).min()) > 0
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.array, params))  # Base as it was.
  # The effective model differs from the base exactly at the adapted kernels.
  merged = lora.merge(params, new.params, scale=settings.scale)
  targets = set(lora.target_paths(params, lora.UNET_TARGETS))
  for path, leaf in lora._flat(merged).items():  # pylint: disable=protected-access
    changed = not np.array_equal(leaf, _get(params, path))
    assert changed == (path.rsplit("/", 1)[0] in targets and path.endswith("kernel")), path


def test_saved_adapters_reload_in_the_diffusers_layout(unet, tmp_path):
  _, params, _, _ = unet
  adapters = _random_adapters(params, lora.UNET_TARGETS + ("proj_in$",), rank=4)
  path = str(tmp_path / "pytorch_lora_weights.safetensors")
  lora.save_file(path, {"unet": adapters}, rank=4, alpha=8.0)
  with pytest.raises(FileExistsError):
    lora.save_file(path, {"unet": adapters}, rank=4, alpha=8.0)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, "np") as f:
    keys, metadata = set(f.keys()), json.loads(f.metadata()[lora.METADATA_KEY])
    down = f.get_tensor("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight")
    conv_up = f.get_tensor("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight")
  assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
  assert down.shape == (4, 16) and conv_up.shape == (32, 4, 1, 1)  # torch [r, in], [out, r, 1, 1].
  assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0
  loaded = lora.read_file(path, {"unet": params}, scale=0.5)["unet"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a["lora_A"], b["lora_A"]), loaded, adapters,
               is_leaf=lora._is_adapter)  # pylint: disable=protected-access
  # The file's alpha / r = 2 times the load scale 0.5 is folded into B.
  np.testing.assert_allclose(_get(loaded, TO_K)["lora_B"], _get(adapters, TO_K)["lora_B"], rtol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lora.merge(params, loaded), lora.merge(params, adapters, scale=1.0))


def _clip_shapes():
  model = clip.CLIPTextTransformer(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=6)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]


def test_peft_kohya_and_old_diffusers_files_map_to_the_right_weights(unet, tmp_path):
  _, params, _, _ = unet
  text = jax.tree.map(lambda s: np.random.default_rng(2).normal(size=s.shape).astype(np.float32), _clip_shapes())
  rng = np.random.default_rng(3)
  r = lambda *shape: rng.normal(size=shape).astype(np.float32)
  peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": r(2, 16),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": r(32, 2),
          "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight": r(2, 8),
          "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight": r(8, 2),
          # The attention processors' layout of older diffusers releases.
          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": r(2, 64),
          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": r(64, 2)}
  metadata = {"unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {"to_out.0": 1},
              "text_encoder.r": 2, "text_encoder.lora_alpha": 1}
  kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 32, 1, 1),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(32, 4, 1, 1),
           "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(1.0, np.float32),
           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": r(4, 8),
           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": r(16, 4)}  # No alpha: scale 1.
  save_file(peft, str(tmp_path / "peft.safetensors"), metadata={lora.METADATA_KEY: json.dumps(metadata)})
  save_file(kohya, str(tmp_path / "kohya.safetensors"))
  trees = {"unet": params, "text_encoder": text}

  def expect(tree, path, down, up, scale):
    """W + scale * (up @ down) in torch's [out, in(, 1, 1)] layout, brought to ours."""
    w = np.asarray(_get(tree, path)["kernel"])
    if w.ndim == 4:
      return w + scale * (up[:, :, 0, 0] @ down[:, :, 0, 0]).T[None, None]
    return w + scale * (up @ down).T

  merged = lora.merge_file(str(tmp_path / "peft.safetensors"), trees, scale=0.5)
  attn2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
  checks = [(merged["unet"], TO_K, peft[attn2 + ".lora_A.weight"], peft[attn2 + ".lora_B.weight"], 0.5 * 4 / 2),
            (merged["unet"], "mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0",
             peft["unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"],
             peft["unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"],
             0.5 * 1 / 2),
            (merged["text_encoder"], "layers_1/self_attn/q_proj",
             peft["text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight"],
             peft["text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight"], 0.5 * 1 / 2)]
  merged = lora.merge_file(str(tmp_path / "kohya.safetensors"), trees, scale=2.0)
  stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
  fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
  checks += [(merged["unet"], PROJ_IN, kohya[stem + ".lora_down.weight"], kohya[stem + ".lora_up.weight"],
              2.0 * 1.0 / 4),
             (merged["text_encoder"], "layers_0/fc1", kohya[fc1 + ".lora_down.weight"],
              kohya[fc1 + ".lora_up.weight"], 2.0)]
  for tree, path, down, up, scale in checks:
    base = trees["unet" if "blocks" in path else "text_encoder"]
    np.testing.assert_allclose(_get(tree, path)["kernel"], expect(base, path, down, up, scale), atol=1e-5,
                               err_msg=path)
  # Everything else is the base's own.
  np.testing.assert_array_equal(_get(merged["unet"], TO_K)["kernel"], _get(params, TO_K)["kernel"])
  np.testing.assert_array_equal(_get(merged["text_encoder"], "layers_1/self_attn/q_proj")["kernel"],
                                _get(text, "layers_1/self_attn/q_proj")["kernel"])


def test_bad_patterns_and_files_are_refused_naming_what_exists(unet, tmp_path):
  _, params, _, _ = unet
  with pytest.raises(ValueError, match=r"config\.lora\.targets: the pattern 'attn3/to_q' matches none.*"
                                       r"e\.g\. '.*/"):
    lora.target_paths(params, ("attn1/to_q$", "attn3/to_q"))
  with pytest.raises(ValueError, match=r"'\(to_q' is not a regular expression"):
    lora.target_paths(params, ("(to_q",))
  r = np.ones((2, 16), np.float32)
  save_file({"model.layers.0.weight": r, "model.layers.1.weight": r}, str(tmp_path / "other.safetensors"))
  with pytest.raises(ValueError, match=r"none of its 2 keys names a weight.*model\.layers\.0\.weight"):
    lora.read_file(str(tmp_path / "other.safetensors"), {"unet": params})
  save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 32, 1, 1), np.float32),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.ones((32, 4, 1, 1), np.float32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r},
            str(tmp_path / "partial.safetensors"))
  with pytest.raises(ValueError, match=r"1 of its 3 keys name no weight of the model's unet.*lora_te_text"):
    lora.read_file(str(tmp_path / "partial.safetensors"), {"unet": params})
  save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((2, 8), np.float32),
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((32, 2), np.float32)},
            str(tmp_path / "shape.safetensors"))
  with pytest.raises(ValueError, match=r"lora_down \(2, 8\) and lora_up \(32, 2\) do not fit the kernel \(16, 32\)"):
    lora.read_file(str(tmp_path / "shape.safetensors"), {"unet": params})
  (tmp_path / "x.ckpt").touch()
  with pytest.raises(ValueError, match=r"not a \.safetensors file"):
    lora.read_file(str(tmp_path / "x.ckpt"), {"unet": params})

  config = default_config.get_config()
  config.lora.rank = 4
  with pytest.raises(ValueError, match=r"config\.lora\.base"):
    config_check.validate_lora(config.lora, model_name="sd_unet")
  config.lora.base, config.lora.targets = str(tmp_path), ("[",)
  with pytest.raises(ValueError, match=r"config\.lora\.targets: '\[' is not a regular expression"):
    config_check.validate_lora(config.lora, model_name="sd_unet")
  config.lora.targets, config.lora.text_targets = lora.UNET_TARGETS, ("self_attn/(q_proj",)
  with pytest.raises(ValueError, match=r"config\.lora\.text_targets: 'self_attn/\(q_proj' is not a regular"):
    config_check.validate_lora(config.lora, model_name="sd_unet")
  config.lora.text_targets = lora.TEXT_TARGETS
  with pytest.raises(ValueError, match=r"config\.lora\.base=.* is neither a converted model"):
    config_check.validate_lora(config.lora, model_name="sd_unet")
  config.lora.base = lora_base = str(tmp_path / "base")
  os.makedirs(lora_base)
  (tmp_path / "base" / "model.json").write_text("{}")
  with pytest.raises(ValueError, match=r"config\.lora\.text_targets=.* adapts the text encoder, but "
                                       r"config\.text\.encoder is None"):
    config_check.validate_config(config, device_count=1, process_count=1)
  config.lora.base = None
  config.lora.rank, config.lora.load = 0, str(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match=r"config\.lora\.load=.*missing\.safetensors' does not exist"):
    config_check.validate_lora(config.lora, model_name="sd_unet")


def test_sd15_adapter_sizes():
  """Rank r adapters on SD 1.5's attention projections: 16 transformer blocks of width c (5 at 320, 5 at
  640, 6 at 1280) with context 768; attn1 4 c x c, attn2 2 c x c + 2 768 x c: r (14 c + 1536) each."""
  config = default_config.get_config()
  model = sd_unet.SDUNet()  # The defaults are SD 1.5's.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                          {"context": jnp.zeros((1, 1, 768))})["params"]
  paths = lora.target_paths(shapes, tuple(config.lora.targets))
  assert len(paths) == 16 * 8
  for rank in (4, 16):
    adapters = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(0), shapes, paths=paths, rank=rank))
    n, size = lora.count(adapters)
    assert n == rank * (14 * (5 * 320 + 5 * 640 + 6 * 1280) + 16 * 1536) == rank * 199_296
    assert size == 4 * n  # float32: 3.19 MB at rank 4, 12.75 MB at rank 16.
