"""What the optional reference tests share: torch, imported with a torchvision that cannot load hidden."""

import sys

import pytest


def import_torch():
  """torch, or the calling module skipped; PyPI's torchvision does not load beside torch 2.13.0's wheel,
  so it is marked absent (importlib.util.find_spec then says so) and diffusers and transformers do
  without it."""
  torch = pytest.importorskip("torch")
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    sys.modules["torchvision"] = None
  return torch
