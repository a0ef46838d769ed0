"""Converts pytorch-fid's FID Inception weights (a torch state dict) to the Flax .npz that eval reads.

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  pip install torch  # Only this script needs it.
  python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth [OUT.npz]

OUT defaults to configs/default.py's config.eval.inception_path. The names and shapes are checked
against evaluation/inception.py's network, so a wrong file fails here rather than in eval.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import inception  # pylint: disable=g-import-not-at-top,wrong-import-position


def convert(torch_path: str, out_path: str) -> str:
  """Reads the torch state dict at torch_path and writes the Flax variables to out_path (.npz)."""
  import torch  # pylint: disable=g-import-not-at-top

  state_dict = torch.load(torch_path, map_location="cpu", weights_only=True)
  numpy_state = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  variables = inception.convert_state_dict(numpy_state)
  out_path = os.path.expanduser(out_path)
  inception.save_variables(out_path, variables)
  return out_path


def main(argv: list[str] | None = None) -> None:
  from configs import default as default_config  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("torch_path", help="pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases.")
  parser.add_argument("out_path", nargs="?", default=default_config.get_config().eval.inception_path,
                      help="Where to write the Flax weights (default: config.eval.inception_path).")
  args = parser.parse_args(argv)
  path = convert(args.torch_path, args.out_path)
  print(f"Wrote {path}; use it with --config.eval.inception_path={path}")


if __name__ == "__main__":
  main()
