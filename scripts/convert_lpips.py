"""Converts LPIPS-VGG weights (torchvision's VGG16 + the `lpips` package's vgg.pth) to the .npz we read.

  wget https://download.pytorch.org/models/vgg16-397923af.pth      # torchvision's ImageNet VGG16
  pip install torch lpips  # Only this script needs them; vgg.pth ships inside the lpips package:
  python scripts/convert_lpips.py vgg16-397923af.pth $(python -c "import lpips, os; print(os.path.join(os.path.dirname(lpips.__file__), 'weights/v0.1/vgg.pth'))") [OUT.npz]

A whole LPIPS(net="vgg") state dict (keys net.sliceK.N.*, linK.model.1.weight) may be given as both
files. OUT defaults to config.autoencoder_loss.lpips_path; the result is checked against
models/lpips.py's network, so a wrong file fails here rather than in training.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import lpips  # pylint: disable=g-import-not-at-top,wrong-import-position


def name_table() -> list[tuple[str, int]]:
  """(our conv name, index in torchvision's vgg16().features) for the 13 convolutions.

  torchvision's features are [conv, ReLU] per convolution and a MaxPool after each block.
  """
  table, index = [], 0
  for block, widths in enumerate(lpips.VGG16_BLOCKS, start=1):
    for i in range(1, len(widths) + 1):
      table.append((f"conv{block}_{i}", index))
      index += 2
    index += 1  # The block's MaxPool.
  return table


def _by_feature_index(state: Mapping[str, np.ndarray]) -> dict[tuple[int, str], np.ndarray]:
  """{(features index, "weight" | "bias"): array} from torchvision (features.N.*) or lpips (net.sliceK.N.*)."""
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
    if match:
      out[(int(match.group(1)), match.group(2))] = value
  return out


def convert_state_dicts(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict:
  """Our LPIPS parameter tree from torch state dicts (as numpy): OIHW kernels become HWIO."""
  features = _by_feature_index(vgg)
  params = {}
  for name, index in name_table():
    if (index, "weight") not in features:
      raise KeyError(f"features.{index}.weight (VGG16's {name}) is not in the VGG16 state dict.")
    params[name] = {"kernel": np.transpose(features[(index, "weight")], (2, 3, 1, 0)),
                    "bias": features[(index, "bias")]}
  for k in range(len(lpips.VGG16_BLOCKS)):
    key = f"lin{k}.model.1.weight"
    if key not in lin:
      raise KeyError(f"{key} is not in the LPIPS lin weights (the lpips package's weights/v0.1/vgg.pth).")
    params[f"lin{k}"] = {"kernel": np.transpose(lin[key], (2, 3, 1, 0))}
  return params


def convert(vgg_path: str, lin_path: str, out_path: str) -> str:
  """Reads both torch files and writes the Flax parameters to out_path (.npz), checked on reading."""
  import torch  # pylint: disable=g-import-not-at-top

  read = lambda p: {k: v.detach().cpu().numpy() for k, v in
                    torch.load(p, map_location="cpu", weights_only=True).items()}
  params = convert_state_dicts(read(vgg_path), read(lin_path))
  out_path = os.path.expanduser(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  lpips.save_params(out_path, params)
  lpips.load_params(out_path)  # Names and shapes against the network.
  return out_path


def main(argv: list[str] | None = None) -> None:
  from configs import default as default_config  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("vgg_path", help="torchvision's vgg16-397923af.pth (or a whole LPIPS state dict).")
  parser.add_argument("lin_path", help="the lpips package's weights/v0.1/vgg.pth.")
  parser.add_argument("out_path", nargs="?", default=default_config.get_config().autoencoder_loss.lpips_path,
                      help="Where to write the Flax weights (default: config.autoencoder_loss.lpips_path).")
  args = parser.parse_args(argv)
  path = convert(args.vgg_path, args.lin_path, args.out_path)
  print(f"Wrote {path}; use it with --config.autoencoder_loss.lpips_path={path}")


if __name__ == "__main__":
  main()
