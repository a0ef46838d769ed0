"""Per-example image preprocessing on the host: crop, resize, scale to [-1, 1], random flip."""

import dataclasses
from typing import Callable, Optional

import grain
import numpy as np
from PIL import Image

RESIZE_METHODS = ("center_crop", "resize")


def center_crop(image: np.ndarray) -> np.ndarray:
  """Returns the largest centred square of an HxWxC image."""
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return image[top:top + side, left:left + side]


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes an HxWxC image to size x size, channel by channel, with PIL's bilinear filter.

  uint8 images stay uint8; float images are resized in float32 (PIL mode "F").
  When shrinking, PIL widens the filter, so the result is antialiased.
  """
  channels = []
  for c in range(image.shape[-1]):
    plane = image[..., c]
    if plane.dtype != np.uint8:
      plane = plane.astype(np.float32)
    resized = Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR)
    channels.append(np.asarray(resized))
  return np.stack(channels, axis=-1)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels 0..255 to float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """Turns a source example into {"image": float32 [S,S,C] in [-1, 1], "label": int32[, "tokens"]}.

  Attributes:
    image_size: output side S.
    resize: "center_crop" (crop the centred square, then resize) or "resize" (resize the
      whole image to S x S, ignoring its aspect ratio).
    use_label: read example["label"]; otherwise the label is 0.
  """

  image_size: int
  resize: str
  use_label: bool = True
  # Text models: (feature, tokenizer) turns example[feature], a caption, into "tokens", int32 [T].
  caption: Optional[tuple[str, Callable[[list[str]], np.ndarray]]] = None

  def map(self, example: dict) -> dict:
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    if self.resize == "center_crop":
      image = center_crop(image)
    if image.shape[:2] != (self.image_size, self.image_size):
      image = resize_bilinear(image, self.image_size)
    label = example["label"] if self.use_label else 0
    out = {"image": to_model_range(image), "label": np.int32(label)}
    if self.caption is not None:
      feature, tokenize = self.caption
      text = example[feature]
      out["tokens"] = np.asarray(tokenize([text.decode() if isinstance(text, bytes) else str(text)]),
                                 np.int32)[0]
    return out


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Flips the image left-right with probability 1/2.

  grain seeds `rng` from the pipeline seed and the element's position in the stream, so
  the flips are reproducible, differ between epochs and survive a restore.
  """

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
      example = {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example
