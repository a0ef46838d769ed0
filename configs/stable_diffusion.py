"""A Stable Diffusion workdir converted by scripts/convert_stable_diffusion.py: its config.json over default.py.

  python main.py --config=configs/stable_diffusion.py:runs/sd15 --workdir=runs/sd15 --mode=sample \
      --config.sample.prompt="a photograph of an astronaut riding a horse"

The argument after ':' is the converted workdir (its config.json holds the UNet's shape, the scheduler's
settings and where the converted weights are); command-line overrides apply on top as usual.
"""

import json
import os

import ml_collections

from configs import default


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  if not workdir:
    raise ValueError("configs/stable_diffusion.py needs the converted workdir: "
                     "--config=configs/stable_diffusion.py:WORKDIR (scripts/convert_stable_diffusion.py).")
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: convert a diffusers folder into {workdir} first "
                            "(python scripts/convert_stable_diffusion.py FOLDER WORKDIR).")
  config = default.get_config()
  with open(path) as f:
    config.update(json.load(f))
  return config
