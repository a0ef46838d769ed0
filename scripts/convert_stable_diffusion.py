"""Converts a diffusers-format Stable Diffusion folder (1.x, 2.x) into a workdir main.py samples and trains.

  python scripts/convert_stable_diffusion.py PATH/stable-diffusion-v1-5 runs/sd15
  python main.py --config=configs/stable_diffusion.py:runs/sd15 --workdir=runs/sd15 --mode=sample \
      --config.sample.prompt="a photograph of an astronaut riding a horse"

Every file needed is checked first (model_index.json; unet/, vae/, text_encoder/ with their config.json
and safetensors weights; tokenizer/; scheduler/scheduler_config.json), then each component is converted
by its own script into WORKDIR/unet, WORKDIR/vae and WORKDIR/text_encoder (with the tokenizer copied to
WORKDIR/text_encoder/tokenizer), and WORKDIR/config.json records the settings they imply:
config.model.sd_unet (the UNet's arguments), config.model.pretrained (where training starts and what a
workdir without checkpoints samples), config.latent (the autoencoder and its scaling factor),
config.text.encoder, config.data.image_size (the UNet's sample_size times the autoencoder's factor),
and the scheduler's noise schedule and DDIM time grid (`scheduler_config`). configs/stable_diffusion.py
lays that file over configs/default.py. Pickled weights (.bin, .ckpt) are refused: unpickling a
downloaded file runs its code.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convert_clip  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_unet  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_diffusers_vae  # pylint: disable=g-import-not-at-top,wrong-import-position

COMPONENTS = ("unet", "vae", "text_encoder")
# The safetensors files each component may hold, and their pickled counterparts.
WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json"),
           "vae": (convert_diffusers_vae.WEIGHTS,),
           "text_encoder": convert_clip.WEIGHTS}
PICKLED = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "pytorch_model.bin",
           "pytorch_model.fp16.bin", "model.ckpt")
# diffusers' scheduler fields -> ours; any other value of these fields is refused by name.
BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("leading", "trailing", "linspace")


def _missing(path: str) -> FileNotFoundError:
  return FileNotFoundError(f"{path} does not exist: the folder is not a diffusers-format Stable Diffusion "
                           "model (hf download REPO --local-dir DIR fetches one; see the README).")


def check_folder(folder: str) -> None:
  """Raises, naming the first missing or unusable file, unless folder has everything conversion reads."""
  for path in ("model_index.json", "scheduler/scheduler_config.json",
               *(f"{c}/config.json" for c in COMPONENTS)):
    if not os.path.exists(os.path.join(folder, path)):
      raise _missing(os.path.join(folder, path))
  for component, names in WEIGHTS.items():
    directory = os.path.join(folder, component)
    if any(os.path.exists(os.path.join(directory, n)) for n in names):
      continue
    pickled = [n for n in PICKLED if os.path.exists(os.path.join(directory, n))]
    if pickled:
      raise ValueError(
          f"{os.path.join(directory, pickled[0])} is a pickled checkpoint, which is not read: unpickling a "
          f"downloaded file runs the code it holds. Download the safetensors weights instead: `hf download "
          f"REPO --local-dir DIR --include '*.json' '*.txt' '*.safetensors'` (most SD repositories have "
          "them), or, with diffusers in an environment you trust, `StableDiffusionPipeline."
          "from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`.")
    raise _missing(os.path.join(directory, names[0]))
  tokenizer = os.path.join(folder, "tokenizer")
  if not (os.path.exists(os.path.join(tokenizer, "tokenizer.json"))
          or os.path.exists(os.path.join(tokenizer, "vocab.json"))):
    raise _missing(os.path.join(tokenizer, "vocab.json"))


def scheduler_config(scheduler: dict[str, Any]) -> dict[str, Any]:
  """config.diffusion and config.sample settings equal to a diffusers scheduler_config.json.

  Our time t = (k + 1) / T is diffusers' index k (model_time "index_from_zero"); the DDIM grid is
  DDIMScheduler.set_timesteps's (diffusion/grids.py, scheduler_grid).
  """
  def get(field, default, allowed=None):
    value = scheduler.get(field, default)
    if allowed is not None and value not in allowed:
      raise ValueError(f"scheduler_config.json: {field}={value!r} is not one of "
                       f"{', '.join(map(repr, allowed))}.")
    return value

  if scheduler.get("trained_betas") is not None:
    raise ValueError("scheduler_config.json: trained_betas (an explicit beta table) is not supported; "
                     f"use beta_schedule, one of {', '.join(BETA_SCHEDULES)}.")
  get("thresholding", False, (False,))
  get("clip_sample", False, (False,))  # SD samples latents unclipped.
  spacing = get("timestep_spacing", "leading", SPACINGS)
  num_timesteps = int(get("num_train_timesteps", 1000))
  return {
      "diffusion": {"schedule": get("beta_schedule", "linear", BETA_SCHEDULES),
                    "num_timesteps": num_timesteps,
                    "beta_start": float(get("beta_start", 0.0001)), "beta_end": float(get("beta_end", 0.02)),
                    "prediction": PREDICTIONS[get("prediction_type", "epsilon", tuple(PREDICTIONS))],
                    "zero_terminal_snr": bool(get("rescale_betas_zero_snr", False)),
                    "model_time": "index_from_zero"},
      "sample": {"sampler": "ddim", "grid": spacing,
                 "steps_offset": int(get("steps_offset", 0)) if spacing == "leading" else 0,
                 "set_alpha_to_one": bool(get("set_alpha_to_one", True)), "clip_x0": False},
  }


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def run_config(folder: str, workdir: str) -> dict[str, Any]:
  """The settings of WORKDIR/config.json, from the folder's JSON files alone (nothing is converted)."""
  unet = convert_diffusers_unet.module_kwargs(_read_json(os.path.join(folder, "unet", "config.json")))
  vae_config = _read_json(os.path.join(folder, "vae", "config.json"))
  factor = 2 ** (len(convert_diffusers_vae.module_kwargs(vae_config)["ch_mult"]) - 1)
  if vae_config.get("shift_factor") is not None:
    raise ValueError(f"{folder}/vae/config.json: shift_factor={vae_config['shift_factor']} is not "
                     "supported (Stable Diffusion 1.x and 2.x have none).")
  levels = len(unet["block_out_channels"])
  if isinstance(unet["attention_head_dim"], int):
    unet["attention_head_dim"] = [unet["attention_head_dim"]] * levels
  sample_size = _read_json(os.path.join(folder, "unet", "config.json")).get("sample_size", 64)
  config = scheduler_config(_read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
  workdir = os.path.abspath(workdir)
  config["model"] = {"name": "sd_unet", "sd_unet": unet, "pretrained": os.path.join(workdir, "unet")}
  config["latent"] = {"autoencoder": os.path.join(workdir, "vae"),
                      "scale_factor": float(vae_config.get("scaling_factor", 0.18215))}
  config["text"] = {"encoder": os.path.join(workdir, "text_encoder")}
  config["data"] = {"image_size": int(sample_size) * factor}
  config["sample"].update(steps=50, guidance_scale=7.5, num=4, batch_size=4)
  return config


def convert(folder: str, workdir: str) -> dict[str, Any]:
  """Converts folder's unet, vae and text encoder into workdir and writes workdir/config.json."""
  folder = os.path.expanduser(folder)
  check_folder(folder)
  config = run_config(folder, workdir)  # Refuses a scheduler or architecture it cannot map, first.
  outputs = [os.path.join(workdir, c) for c in COMPONENTS] + [os.path.join(workdir, "config.json")]
  existing = [p for p in outputs if os.path.exists(p)]
  if existing:
    raise FileExistsError(f"{existing[0]} exists already; give a new workdir (nothing is overwritten).")
  os.makedirs(workdir, exist_ok=True)
  convert_diffusers_unet.convert(os.path.join(folder, "unet"), os.path.join(workdir, "unet"))
  convert_diffusers_vae.convert(os.path.join(folder, "vae"), os.path.join(workdir, "vae"))
  convert_clip.convert(os.path.join(folder, "text_encoder"), os.path.join(workdir, "text_encoder"),
                       os.path.join(folder, "tokenizer"))
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
  os.replace(path + ".tmp", path)
  return config


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  try:
    config = convert(argv[1], argv[2])
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"Error: {e}") from None
  print(f"Wrote {argv[2]}: {config['data']['image_size']}px images, {config['diffusion']['schedule']} "
        f"schedule, {config['diffusion']['prediction']} prediction. Sample with\n  python main.py "
        f"--config=configs/stable_diffusion.py:{argv[2]} --workdir={argv[2]} --mode=sample "
        "--config.sample.prompt='...'")


if __name__ == "__main__":
  main(sys.argv)
