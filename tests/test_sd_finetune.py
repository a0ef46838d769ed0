"""Fine-tuning a converted Stable Diffusion workdir with the training loop, fully and with LoRA.

A tiny random diffusers-format folder (tests/test_stable_diffusion.py's, with a grey autoencoder for
the two_digits toy's captioned 16x16 canvases) is converted once, fine-tuned for two steps through
train.train as the README's commands do, then sampled from a prompt through --mode=sample's function.
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from configs import stable_diffusion
from models import pretrained
from tests import test_stable_diffusion
from training import lora
from training import sample as sample_lib
from training import text as text_lib
from training import train as train_lib

PROMPT = "a 3 left of a 7"


def _digests(directory):
  """{relative path: sha256} of every file under directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _finetune_config(converted, **overrides):
  """configs/stable_diffusion.py:converted on the two_digits captions, two steps of 8 images."""
  config = stable_diffusion.get_config(converted)
  config.data.update(name="two_digits", caption_feature="caption", random_flip=False)
  config.diffusion.p_uncond = 0.25
  config.optim.update(warmup_steps=1, learning_rate=1e-2, ema_decay=0.5)
  config.training.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2, sample_every=0,
                         keep_every=0)
  config.sample.update(prompt=PROMPT, steps=3, num=2, batch_size=2, seed=1)
  config.update_from_flattened_dict(overrides)
  return config


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(converted workdir, its files' digests before and after training, {"full" | "lora": (workdir,
  final state)}, the base's samples)."""
  root = tmp_path_factory.mktemp("sd_finetune")
  # One level with cross-attention (and the middle block), one text layer: fewer ops to compile.
  unet = dict(test_stable_diffusion.UNET, block_out_channels=(16,),
              down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
  text = dict(test_stable_diffusion.TEXT, num_hidden_layers=1)
  folder = test_stable_diffusion.write_sd_folder(str(root / "diffusers"), channels=1, unet=unet,
                                                 text=text)
  converted = str(root / "sd")
  test_stable_diffusion.convert_stable_diffusion.convert(folder, converted)
  before = _digests(converted)
  out = {}
  for name, overrides in (("full", {}),
                          ("lora", {"lora.rank": 2, "lora.base": os.path.join(converted, "unet"),
                                    "lora.text_targets": lora.TEXT_TARGETS})):
    workdir = str(root / name)
    out[name] = workdir, jax.device_get(train_lib.train(_finetune_config(converted, **overrides), workdir))
  after = _digests(converted)
  base = np.load(sample_lib.sample(_finetune_config(converted), converted) + ".npz")["images"]
  return converted, (before, after), out, base


def test_full_finetune_trains_the_unet_with_the_text_encoder_frozen_and_converted_files_untouched(runs):
  converted, (before, after), out, _ = runs
  workdir, state = out["full"]
  assert int(state.step) == 2
  _, unet = pretrained.load(os.path.join(converted, "unet"), kind="sd_unet")
  tuned, base = _flat(state.params), _flat(unet)
  assert tuned.keys() == base.keys()  # The UNet alone: a frozen encoder is a constant, not state.
  assert text_lib.TEXT not in state.params and text_lib.MODEL not in state.params
  moved = [k for k in base if not np.array_equal(tuned[k], base[k])]
  assert len(moved) > len(base) // 2, f"{len(moved)} of {len(base)} UNet parameters moved"
  # The conversion's weights, tokenizer and config.json: byte for byte as written.
  assert after == before
  assert not os.path.exists(os.path.join(converted, "checkpoints"))
  saved = train_lib.checkpoints.restore_config(workdir)
  assert saved.model.pretrained == os.path.join(converted, "unet") and saved.text.trainable is False


def test_lora_finetune_checkpoints_only_adapters_of_the_unet_and_text_encoder(runs):
  converted, _, out, _ = runs
  _, state = out["lora"]
  _, unet = pretrained.load(os.path.join(converted, "unet"), kind="sd_unet")
  _, encoder = pretrained.load(os.path.join(converted, "text_encoder"), kind="clip_text")
  # The state (what checkpoints.save writes): rank-2 adapters on the attention projections, no base.
  assert set(state.params) == {text_lib.MODEL, text_lib.TEXT}
  # 4 transformer blocks (down, middle, 2 up), each attn1 and attn2 with q, k, v, out: A and B of 32;
  # the text encoder's one layer: q, k, v, out.
  for part, base, targets, n in ((text_lib.MODEL, unet, lora.UNET_TARGETS, 32),
                                 (text_lib.TEXT, encoder, lora.TEXT_TARGETS, 4)):
    leaves = _flat(state.params[part])
    assert len(leaves) == 2 * len(lora.target_paths(base, targets)) == 2 * n, part
    for key, value in leaves.items():
      assert value.shape[-1 if key.endswith("['lora_A']") else 0] == 2, key
      assert key.endswith("['lora_A']") or key.endswith("['lora_B']"), key
    assert all(np.abs(v).max() > 0 for k, v in leaves.items() if "lora_B" in k), part  # B moved off zero.
    assert all(np.abs(v).max() > 0 for k, v in _flat(state.ema_params[part]).items() if "lora_B" in k)


def test_lora_run_saved_as_a_file_samples_the_converted_model_as_the_run_does(runs, tmp_path):
  converted, _, out, _ = runs
  workdir, state = out["lora"]
  path = str(tmp_path / "adapters.safetensors")
  lora.save_file(path, {"unet": state.ema_params[text_lib.MODEL], "text_encoder": state.ema_params[text_lib.TEXT]},
                 rank=2, alpha=2.0)
  run = np.load(sample_lib.sample(_finetune_config(converted), workdir) + ".npz")["images"]
  loaded = np.load(sample_lib.sample(_finetune_config(converted, **{"lora.load": path}), converted) + ".npz")
  # The same adapters, merged from the file into the converted UNet and text encoder: the same images.
  assert np.abs(loaded["images"].astype(int) - run.astype(int)).max() <= 1
  without_text = str(tmp_path / "unet_only.safetensors")
  lora.save_file(without_text, {"unet": state.ema_params[text_lib.MODEL]}, rank=2, alpha=2.0)
  unet_only = np.load(sample_lib.sample(_finetune_config(converted, **{"lora.load": without_text}),
                                        converted) + ".npz")["images"]
  assert np.abs(unet_only.astype(int) - run.astype(int)).max() > 0  # The text adapters matter.


def test_sampling_each_finetuned_workdir_from_a_prompt(runs):
  converted, _, out, base = runs
  assert base.shape == (2, 16, 16, 1)
  for name in ("full", "lora"):
    workdir, _ = out[name]
    path = sample_lib.sample(_finetune_config(converted), workdir)
    assert os.path.basename(path).startswith("step2_ddim_3steps_w7.5_seed1")  # "_1" when sampled again.
    npz = np.load(path + ".npz")
    assert npz["images"].shape == base.shape and list(npz["prompts"]) == [PROMPT] * 2
    # The same prompt, seed and noise from the base: the fine-tuned weights change the images.
    assert np.abs(npz["images"].astype(int) - base.astype(int)).max() > 8, name
