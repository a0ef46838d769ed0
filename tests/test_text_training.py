"""Training text-conditional models: the two-digit toy source, the word-level tokenizer, caption
dropout, a few steps with a trainable and a frozen text encoder, and the bad-input errors.

Resuming is the shared loop's (tests/test_train.py's resume test): a text model's state is the same
kind of pytree, and its tokenizer is read back from workdir/tokenizer rather than rebuilt.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
from configs import digits_text
from diffusion import guidance
from input_pipeline import sources
from models import clip
from models import pretrained
from models import tokenizer as tokenizer_lib
from training import config_check
from training import sample as sample_lib
from training import spaces
from training import tasks
from training import text as text_lib
from training import train as train_lib


def tiny_text_config(**overrides):
  """digits_text at 8x8 canvases (two 4x4 digits) with a UNet and a text encoder of a few thousand params."""
  config = digits_text.get_config()
  config.data.image_size = 8
  sd = config.model.sd_unet
  sd.block_out_channels, sd.attention_head_dim, sd.norm_num_groups = (8, 16), (1, 2), 4
  sd.cross_attention_dim = 16
  config.text.clip.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
  config.optim.warmup_steps = 1
  config.optim.ema_decay = 0.9
  config.training.update(batch_size=16, num_steps=2, log_every=1, checkpoint_every=2)
  config.update_from_flattened_dict(overrides)
  return config


def test_two_digits_canvases_show_the_digits_their_captions_name():
  train, test = sources.TwoDigitsSource(16, "train"), sources.TwoDigitsSource(16, "test")
  pools = {"train": sources.DigitsSource(8, slice(0, sources.TWO_DIGITS_TRAIN)),
           "test": sources.DigitsSource(8, slice(sources.TWO_DIGITS_TRAIN, None))}
  for name, source in (("train", train), ("test", test)):
    for i in (0, 1, 7, len(source) - 1):
      item = source[i]
      left, right = source.pair(i)
      a, b = pools[name][left], pools[name][right]
      np.testing.assert_array_equal(item["image"][4:12, :8], a["image"])
      np.testing.assert_array_equal(item["image"][4:12, 8:], b["image"])
      assert not item["image"][:4].any() and not item["image"][12:].any()
      assert item["caption"] == f"a {a['label']} left of a {b['label']}"
      assert item["label"] == 10 * a["label"] + b["label"]
  # Deterministic, and the order is part of the caption: both orders of a pair occur.
  assert sources.TwoDigitsSource(16, "train")[5]["caption"] == train[5]["caption"]
  captions = {train[i]["caption"] for i in range(400)}
  assert "a 3 left of a 7" in captions and "a 7 left of a 3" in captions
  assert len({c.split()[1] for c in captions}) == 10
  with pytest.raises(ValueError, match="config.data.split='valid' is not one of train, test"):
    sources.open_two_digits(split="valid", data_dir=None, image_size=16)


def test_word_level_tokenizer_round_trip_padding_truncation_and_reload(tmp_path):
  texts = ["a 3 left of a 7", "a 1 left of a 2", "A 1 LEFT of a 9"]
  tok = tokenizer_lib.build_word_level(texts, vocab_size=100, directory=str(tmp_path / "tok"), max_length=8)
  vocab = tok.backend.get_vocab()
  assert [vocab[k] for k in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
  assert len(vocab) == 4 + len({"a", "left", "of", "1", "2", "3", "7", "9"})
  ids = tok(["a 3 left of a 7", "", "a 5 left of a 7 and more", "A 3   LEFT of a 7"])
  assert ids.shape == (4, 8) and ids.dtype == np.int32
  words = [vocab[w] for w in "a 3 left of a 7".split()]
  np.testing.assert_array_equal(ids[0], [2] + words + [1])
  np.testing.assert_array_equal(ids[1], [2, 1, 0, 0, 0, 0, 0, 0])  # The empty prompt: <bos> <eos> <pad>...
  np.testing.assert_array_equal(ids[2], [2, vocab["a"], 3, vocab["left"], vocab["of"], vocab["a"], vocab["7"], 1])
  np.testing.assert_array_equal(ids[3], ids[0])  # Lower case; runs of spaces split like one.
  assert tok.backend.decode(ids[0].tolist()) == "a 3 left of a 7"
  reloaded = tokenizer_lib.load(str(tmp_path / "tok"))
  np.testing.assert_array_equal(reloaded(["a 3 left of a 7", ""]), ids[:2])
  with pytest.raises(FileExistsError):
    tokenizer_lib.build_word_level(texts, vocab_size=100, directory=str(tmp_path / "tok"), max_length=8)


def test_caption_dropout_gives_dropped_rows_the_empty_prompt_and_keeps_the_others():
  batch, p = 4096, 0.25
  tokens = jax.random.randint(jax.random.key(0), (batch, 8), 4, 20)
  empty = np.array([2, 1, 0, 0, 0, 0, 0, 0], np.int32)
  drop = jax.random.uniform(jax.random.key(1), (batch,)) < p  # As the train step draws it.
  cond = guidance.drop_cond({"tokens": tokens, "label": jnp.arange(batch)},
                            null=guidance.null_cond(num_classes=0, batch_size=batch, empty_prompt=empty),
                            drop=drop)
  dropped = np.all(np.asarray(cond["tokens"]) == empty, axis=1)
  np.testing.assert_array_equal(dropped, np.asarray(drop))
  kept = ~np.asarray(drop)
  np.testing.assert_array_equal(np.asarray(cond["tokens"])[kept], np.asarray(tokens)[kept])
  np.testing.assert_array_equal(cond["label"], np.arange(batch))  # No null label: never dropped.
  assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / batch)


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two steps of the tiny text config with a trainable from-scratch encoder: (workdir, config, state)."""
  workdir = str(tmp_path_factory.mktemp("text_run"))
  config = tiny_text_config()
  state = jax.device_get(train_lib.train(config, workdir))
  return workdir, config, state


def test_a_trainable_encoder_is_trained_with_the_model_and_sampled_from_its_ema(trained):
  workdir, config, state = trained
  assert int(state.step) == 2 and set(state.params) == {text_lib.MODEL, text_lib.TEXT}
  # The word-level tokenizer of the captions is in the workdir, and the saved config names it.
  tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  assert tok(["a 3 left of a 7"]).shape == (1, 8)
  restored = train_lib.checkpoints.restore_config(workdir)
  assert restored.text.tokenizer == os.path.join(workdir, "tokenizer")
  # Both parts moved (the EMA, decay 0.9, lags behind params only where a step changed them).
  for part in (text_lib.MODEL, text_lib.TEXT):
    moved = jax.tree.map(lambda p, e: np.max(np.abs(p - e)), state.params[part], state.ema_params[part])
    assert min(jax.tree.leaves(moved)) > 0, part
  # Sampling reads the EMA copy of the encoder: the contexts differ between prompts and from params'.
  text = text_lib.create_conditioning(restored)
  model_params, cond, null = text.sampling_inputs(state.ema_params, ["a 3 left of a 7", "a 7 left of a 3"])
  assert _leaves_equal(model_params, state.ema_params[text_lib.MODEL])
  context = np.asarray(cond["context"])
  assert context.shape == (2, 8, 16) and null["context"].shape == (8, 16)
  assert np.abs(context[0] - context[1]).max() > 1e-3
  expected = text.encoder.encode(state.ema_params[text_lib.TEXT], text.encoder.tokenize("a 3 left of a 7"))
  np.testing.assert_allclose(context[:1], expected, atol=1e-5)


def test_mode_sample_draws_prompts_with_the_runs_trained_encoder(trained):
  workdir, config, state = trained
  config = config.copy_and_resolve_references()
  config.sample.update(prompt="a 3 left of a 7", negative_prompt="a 7 left of a 3", steps=2, num=4,
                       batch_size=4, guidance_scale=2.0)
  path = sample_lib.sample(config, workdir)
  npz = np.load(path + ".npz")
  assert npz["images"].shape == (4, 8, 8, 1) and np.all(np.isfinite(npz["images"]))
  assert list(npz["prompts"]) == ["a 3 left of a 7"] * 4
  # The state's EMA encoder gave the contexts (a "new" encoder has no other weights).
  text = text_lib.create_conditioning(train_lib.checkpoints.restore_config(workdir))
  _, cond, null = text.sampling_inputs(state.ema_params, ["a 3 left of a 7"], negative_prompt="a 7 left of a 3",
                                       num=4)
  assert cond["context"].shape == (4, 8, 16) and null["context"].shape == (8, 16)
  np.testing.assert_array_equal(cond["context"][0], cond["context"][3])


def test_a_frozen_encoder_stays_out_of_the_state_and_bitwise_equal(tmp_path):
  # A "converted" encoder: a tiny CLIP and a word-level tokenizer in scripts/convert_clip.py's layout.
  module = clip.CLIPTextTransformer(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8, eos_token_id=1)
  params = module.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
  encoder_dir = str(tmp_path / "encoder")
  kwargs = {k: getattr(module, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads",
                                            "max_position_embeddings", "hidden_act", "eos_token_id")}
  pretrained.save(encoder_dir, kind="clip_text", kwargs=kwargs, params=params)
  tokenizer_lib.build_word_level(input_pipeline.read_captions(tiny_text_config().data), vocab_size=20,
                                 directory=os.path.join(encoder_dir, "tokenizer"), max_length=8)
  config = tiny_text_config(**{"text.encoder": encoder_dir, "text.trainable": False,
                               "text.max_length": None})
  mesh = train_lib.create_mesh()
  task = tasks.create_task(config, image_shape=(8, 8, 1), rng=jax.random.key(0), mesh=mesh,
                           space=spaces.PixelSpace(data_shape=(8, 8, 1)))
  assert _leaves_equal(task.constants["text"], params)
  # The step's shapes (traced, not compiled): the state holds the UNet alone; the encoder is a constant
  # the step reads and does not return, so it stays bitwise equal.
  state = jax.eval_shape(task.init_state, jax.random.key(0))
  assert text_lib.TEXT not in state.params and "conv_in" in state.params
  tokens = np.asarray(text_lib.create_text_encoder(config).tokenize(["a 1 left of a 2"] * 16))
  batch = {"image": jnp.zeros((16, 8, 8, 1)), "label": jnp.zeros((16,), jnp.int32), "tokens": tokens}
  new_state, _ = jax.eval_shape(task.train_step, state, batch, task.constants)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  _, saved = pretrained.load(encoder_dir, kind="clip_text")
  assert _leaves_equal(saved, params) and _leaves_equal(task.constants["text"], params)


@pytest.mark.parametrize("overrides, match", [
    ({"model.sd_unet.cross_attention_dim": 32},
     r"config.model.sd_unet.cross_attention_dim=32 is not config.text.clip.hidden_size=16"),
    ({"text.trainable": False}, r"config.text.encoder='new' .* needs config.text.trainable=True"),
    ({"data.caption_feature": None}, r"set config.data.caption_feature"),
    ({"text.encoder": None}, r"config.model.name='sd_unet' reads cond\['context'\]: set config.text.encoder"),
    ({"model.name": "unet", "model.unet.attn_resolutions": (4,)}, r"config.model.name must be 'sd_unet', got 'unet'"),
    ({"text.clip.num_attention_heads": 3}, r"config.text.clip.num_attention_heads=3 does not divide"),
])
def test_bad_text_configs_are_named_before_anything_runs(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_check.validate_config(tiny_text_config(**overrides), device_count=8, process_count=1)


def test_a_caption_feature_the_dataset_lacks_is_named(tmp_path):
  config = tiny_text_config(**{"data.caption_feature": "text"})
  with pytest.raises(ValueError, match=r"config.data.caption_feature='text' is not a caption feature of "
                                       r"config.data.name='two_digits'; its text features: caption"):
    train_lib.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  config = tiny_text_config(**{"data.name": "digits"})
  with pytest.raises(ValueError, match=r"caption feature of config.data.name='digits'; its text features: none"):
    input_pipeline.read_captions(config.data)
