"""Metrics to TensorBoard event files and the console; images as PNG grids. Process 0 writes."""

from __future__ import annotations

import math
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging
from PIL import Image
from PIL import PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats to uint8 pixels."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
  return grid


def save_png(path: str, image: np.ndarray, metadata: dict[str, str] | None = None) -> None:
  """Writes a uint8 image [H, W, C] to path (via a temporary file, so a crash leaves no half PNG).

  metadata becomes the PNG's text chunks (key -> value; non-Latin-1 text as iTXt).
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mode = "L" if image.shape[-1] == 1 else "RGB"
  info = PngImagePlugin.PngInfo()
  for key, value in (metadata or {}).items():
    info.add_text(key, str(value))  # PIL writes iTXt where the text is not Latin-1.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(f, format="PNG", pnginfo=info)
  os.replace(tmp, path)


class MetricWriter:
  """Scalars and images to TensorBoard event files in logdir (no TensorFlow needed)."""

  def __init__(self, logdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported here: only process 0 writes.
      self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._writer:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)
    self._writer.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """A uint8 image [H, W, C]."""
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def log_scalars(step: int, scalars: Mapping[str, float]) -> None:
  logging.info("step %d: %s", step, ", ".join(f"{k}={float(v):.5g}" for k, v in scalars.items()))
