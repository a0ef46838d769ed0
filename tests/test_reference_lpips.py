"""Optional: our LPIPS against the `lpips` package's torch LPIPS(net="vgg") with the same random weights.

Runs where torch and lpips import (requirements-reference.txt). Nothing is downloaded: the package's
network is built with random lin layers (pretrained=False) and a random VGG16 trunk (pnet_rand=True),
saved as a state dict, converted by scripts/convert_lpips.py, and both networks score the same pairs.
torchvision's VGG16 (the trunk lpips asks torchvision for) is built here layer for layer, since
PyPI's torchvision does not load beside torch 2.13.0's wheel.
"""

import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import convert_lpips  # pylint: disable=g-import-not-at-top,wrong-import-position


def _vgg16_features():
  """torchvision's vgg16().features: configuration "D" of Simonyan & Zisserman, [conv, ReLU]... + MaxPool."""
  layers, in_ch = [], 3
  for widths in lpips_lib.VGG16_BLOCKS:
    for width in widths:
      layers += [torch.nn.Conv2d(in_ch, width, 3, padding=1), torch.nn.ReLU(inplace=True)]
      in_ch = width
    layers.append(torch.nn.MaxPool2d(2, 2))
  return torch.nn.Sequential(*layers)


def _import_lpips():
  """The lpips package, with torchvision.models.vgg16 answered by _vgg16_features."""
  stub = types.ModuleType("torchvision")
  stub.models = types.SimpleNamespace(
      vgg16=lambda pretrained=False, **kwargs: types.SimpleNamespace(features=_vgg16_features()))
  saved = sys.modules.get("torchvision")
  sys.modules["torchvision"] = stub
  try:
    return pytest.importorskip("lpips")
  finally:
    if saved is None:
      del sys.modules["torchvision"]
    else:
      sys.modules["torchvision"] = saved


def test_lpips_matches_the_package(tmp_path):
  lpips = _import_lpips()
  torch.manual_seed(0)
  reference = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
  with torch.no_grad():  # Positive lin weights, as the trained ones are (they are clamped at >= 0).
    for lin in reference.lins:
      lin.model[-1].weight.abs_()
  path = str(tmp_path / "lpips_state.pth")
  torch.save(reference.state_dict(), path)
  out = convert_lpips.convert(path, path, str(tmp_path / "lpips.npz"))
  params = lpips_lib.load_params(out)

  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  x1 = np.clip(x0 + rng.normal(scale=0.3, size=x0.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x0.transpose(0, 3, 1, 2)),
                         torch.from_numpy(x1.transpose(0, 3, 1, 2))).numpy().reshape(-1)
  ours = np.asarray(lpips_lib.LPIPS().apply({"params": params}, jnp.asarray(x0), jnp.asarray(x1)))
  assert np.all(expected > 0)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
  same = np.asarray(lpips_lib.LPIPS().apply({"params": params}, jnp.asarray(x0), jnp.asarray(x0)))
  np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_converter_names_a_missing_weight():
  with pytest.raises(KeyError, match=r"lin0\.model\.1\.weight"):
    vgg = {f"features.{i}.{k}": np.zeros(1) for _, i in convert_lpips.name_table() for k in ("weight", "bias")}
    vgg = {k: np.zeros((1, 1, 3, 3)) if k.endswith("weight") else v for k, v in vgg.items()}
    convert_lpips.convert_state_dicts(vgg, {})
