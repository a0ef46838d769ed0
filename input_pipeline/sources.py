"""Random-access image sources: sklearn's digits (offline) and any prepared tfds dataset.

A source has __len__ and __getitem__(index) -> {"image": uint8 HxWxC, "label": int, ...},
which is what grain.MapDataset.source reads.

tfds datasets are read with `tfds.data_source`, which needs them prepared once in the
array_record format. Preparing needs TensorFlow and internet (the tfds builders read the
raw files and encode the images with TensorFlow); reading them afterwards does not:

  pip install tensorflow
  tfds build cifar10 --file_format=array_record --data_dir=DIR

Leave out --data_dir for the tfds default (~/tensorflow_datasets, or $TFDS_DATA_DIR);
otherwise set config.data.data_dir=DIR. The Python equivalent is
`tfds.builder("cifar10", data_dir=DIR, file_format="array_record").download_and_prepare()`.
"""

import dataclasses
import re
from typing import Any, Callable

import numpy as np

from input_pipeline import preprocess

DIGITS_SIZE = 8  # sklearn's digits are 8x8 ...
DIGITS_MAX = 16.0  # ... with values 0..16.
TWO_DIGITS_TRAIN = 1497  # two_digits' "train" canvases use sklearn's first 1497 digits, "test" the last 300.


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """An opened source and what the model needs to know about it."""

  source: Any  # Random-access: __len__ and __getitem__.
  num_classes: int  # 0 where the dataset has no class label.
  num_channels: int
  has_label: bool
  captions: tuple[str, ...] = ()  # Features holding a caption (a string), for config.data.caption_feature.


class DigitsSource:
  """sklearn's digits (1797 8x8 images, labels 0..9), upsampled bilinearly to image_size.

  Items are {"image": uint8 [image_size, image_size, 1], "label": int}.
  """

  def __init__(self, image_size: int, examples: slice = slice(None)):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    self._images = digits.images.astype(np.float32)[examples]  # [1797, 8, 8], 0..16.
    self._labels = digits.target.astype(np.int64)[examples]
    self._image_size = image_size

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    image = self._images[index][..., None]
    if self._image_size != DIGITS_SIZE:
      image = preprocess.resize_bilinear(image, self._image_size)
    image = np.round(np.clip(image, 0.0, DIGITS_MAX) * (255.0 / DIGITS_MAX)).astype(np.uint8)
    return {"image": image, "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"DigitsSource(image_size={self._image_size})"


def open_digits(*, split: str, data_dir: str | None, image_size: int) -> SourceInfo:
  """Opens sklearn's digits; they ship with scikit-learn, so nothing is downloaded."""
  del data_dir  # Unused.
  # tfds's slicing syntax, in examples: "train[:1597]" and "train[1597:]" hold images out.
  match = re.fullmatch(r"train(?:\[(-?\d*):(-?\d*)\])?", split)
  if not match:
    raise ValueError(f"config.data.split={split!r} is not one of train or a slice of it like "
                     "train[:1597] (train is the only split of digits).")
  start, stop = (int(v) if v else None for v in match.groups(default=""))
  return SourceInfo(DigitsSource(image_size, slice(start, stop)), num_classes=10, num_channels=1,
                    has_label=True)


class TwoDigitsSource:
  """Two sklearn digits side by side on one canvas, captioned "a 3 left of a 7" (offline, deterministic).

  Each digit is resized to half the canvas side and the pair is centred vertically, so the left and
  right halves of an image_size canvas each hold one digit of image_size // 2 pixels, as
  DigitsSource draws it at that size. Canvas i picks both digit images with a generator seeded by
  (i, split); "train" draws them from sklearn's first TWO_DIGITS_TRAIN digits, "test" from the rest, so
  the test canvases hold digit images no training canvas shows. Items: {"image": uint8 [S, S, 1],
  "label": 10 * left + right, "caption": str}.
  """

  SPLITS = {"train": (slice(0, TWO_DIGITS_TRAIN), 20_000), "test": (slice(TWO_DIGITS_TRAIN, None), 2_000)}
  VOCABULARY = ("a", "left", "of") + tuple(str(d) for d in range(10))  # Every word of every caption.

  def __init__(self, image_size: int, split: str = "train"):
    if image_size % 4:
      raise ValueError(f"config.data.image_size={image_size} must be a multiple of 4 for two_digits "
                       "(two digits of half its side, centred vertically).")
    pool, self._size = self.SPLITS[split]
    digits = DigitsSource(image_size // 2, pool)
    self._images = np.stack([digits[i]["image"] for i in range(len(digits))])
    self._labels = np.array([digits[i]["label"] for i in range(len(digits))])
    self._split, self._image_size = split, image_size

  def __len__(self) -> int:
    return self._size

  def pair(self, index: int) -> tuple[int, int]:
    """The pool indices of canvas index's left and right digit images."""
    rng = np.random.default_rng((index, list(self.SPLITS).index(self._split)))
    left, right = rng.integers(0, len(self._labels), size=2)
    return int(left), int(right)

  def __getitem__(self, index: int) -> dict:
    left, right = self.pair(index)
    s, half = self._image_size, self._image_size // 2
    image = np.zeros((s, s, 1), np.uint8)
    image[half // 2:half // 2 + half, :half] = self._images[left]
    image[half // 2:half // 2 + half, half:] = self._images[right]
    a, b = int(self._labels[left]), int(self._labels[right])
    return {"image": image, "label": 10 * a + b, "caption": caption(a, b)}

  def __repr__(self) -> str:
    return f"TwoDigitsSource(image_size={self._image_size}, split={self._split!r})"


def caption(left: int, right: int) -> str:
  """The caption of a two_digits canvas."""
  return f"a {left} left of a {right}"


def open_two_digits(*, split: str, data_dir: str | None, image_size: int) -> SourceInfo:
  """The two_digits toy (TwoDigitsSource): splits "train" and "test"."""
  del data_dir  # Unused.
  if split not in TwoDigitsSource.SPLITS:
    raise ValueError(f"config.data.split={split!r} is not one of {', '.join(TwoDigitsSource.SPLITS)} "
                     "(the splits of two_digits).")
  return SourceInfo(TwoDigitsSource(image_size, split), num_classes=100, num_channels=1, has_label=True,
                    captions=("caption",))


def prepare_command(name: str, data_dir: str | None) -> str:
  """The one-time shell command that prepares a tfds dataset for `tfds.data_source`."""
  command = f"tfds build {name} --file_format=array_record"
  if data_dir:
    command += f" --data_dir={data_dir}"
  return command


def _not_prepared_message(name: str, data_dir: str | None) -> str:
  return (
      f"config.data.name={name!r} is not prepared for tfds.data_source in the array_record "
      f"format under config.data.data_dir={data_dir!r}. Prepare it once, on a machine with "
      f"internet (this step needs TensorFlow; training does not):\n"
      f"  pip install tensorflow\n  {prepare_command(name, data_dir)}")


def open_tfds(*, name: str, split: str, data_dir: str | None) -> SourceInfo:
  """Opens a prepared tfds image dataset with `tfds.data_source`; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(
        f"config.data.name={name!r} is not a tfds dataset nor one of {', '.join(SOURCES)}.") from e
  except (ValueError, AssertionError) as e:  # E.g. an unknown config or version in the name.
    raise ValueError(f"config.data.name={name!r}: {e}") from e

  features = builder.info.features
  if "image" not in features or not isinstance(features["image"], tfds.features.Image):
    raise ValueError(f"config.data.name={name!r} has no 'image' feature: {list(features.keys())}")
  if np.dtype(features["image"].np_dtype) != np.uint8:
    raise ValueError(f"config.data.name={name!r} has {features['image'].np_dtype} images; "
                     "only uint8 images are supported.")
  has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises KeyError, NotImplementedError or ValueError here; say what to do instead.
    if not builder.is_prepared():
      raise ValueError(_not_prepared_message(name, data_dir)) from e
    if "array_record" not in {f.value for f in builder.info.available_file_formats()}:
      raise ValueError(
          f"config.data.name={name!r} is prepared under {builder.data_dir} in "
          f"{builder.info.file_format}, but tfds.data_source needs array_record. Prepare it "
          f"again in another config.data.data_dir (needs TensorFlow):\n"
          f"  pip install tensorflow\n  {prepare_command(name, 'NEW_DIR')}") from e
    raise ValueError(f"config.data.split={split!r} cannot be read from {name!r} (splits: "
                     f"{', '.join(builder.info.splits)}): {e}") from e

  num_channels = features["image"].shape[-1]
  if num_channels is None:
    num_channels = np.asarray(source[0]["image"]).shape[-1]
  captions = tuple(k for k, f in features.items() if isinstance(f, tfds.features.Text))
  return SourceInfo(source, num_classes=features["label"].num_classes if has_label else 0,
                    num_channels=int(num_channels), has_label=has_label, captions=captions)


# Sources that are not tfds datasets, by config.data.name; every other name goes to tfds.
SOURCES: dict[str, Callable[..., SourceInfo]] = {"digits": open_digits, "two_digits": open_two_digits}


def open_source(*, name: str, split: str, data_dir: str | None, image_size: int) -> SourceInfo:
  """Opens config.data.name: one of SOURCES, or else a prepared tfds dataset."""
  if name in SOURCES:
    return SOURCES[name](split=split, data_dir=data_dir, image_size=image_size)
  return open_tfds(name=name, split=split, data_dir=data_dir)
