"""Tests of input_pipeline: tfds (mocked) and digits sources, sharding, determinism, resume."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order

import grain
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from configs import default
import input_pipeline
from input_pipeline import preprocess
from models import tokenizer as tokenizer_lib

NUM_DEVICES = 8


def _data_config(**overrides):
  config = default.get_config().data
  config.name = "digits"
  config.image_size = 16
  config.random_flip = True
  config.num_workers = 0
  config.prefetch = 2
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _mesh(explicit=True):
  if explicit:  # jax.make_mesh: Explicit axes on recent jax.
    return jax.make_mesh((jax.device_count(),), ("data",))
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # Auto axes.


def _take(iterator, n):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


class _IndexSource:
  """A source whose label is the example's index, to follow examples through the pipeline."""

  def __init__(self, n):
    self._n = n

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    return {"image": np.full((4, 4, 1), index % 256, np.uint8), "label": index}


def _index_batches(*, seed=0, global_batch_size=8, process_index=0, process_count=1, n=40,
                   random_flip=False):
  return input_pipeline.build_process_batches(
      _IndexSource(n), image_size=4, resize="resize", random_flip=random_flip, seed=seed,
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count)


def test_forced_cpu_devices():
  assert jax.device_count() == NUM_DEVICES


@pytest.mark.parametrize("explicit_mesh", [True, False])
def test_cifar10_mock_batch_is_sharded_over_the_mesh(explicit_mesh):
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = input_pipeline.create_dataset(_data_config(name="cifar10", image_size=32),
                                       global_batch_size=16, seed=0, mesh=_mesh(explicit_mesh))
    batch = next(ds)
  assert (ds.num_examples, ds.num_classes, ds.num_channels) == (64, 10, 3)
  image, label = batch["image"], batch["label"]
  assert image.shape == (16, 32, 32, 3) and image.dtype == jax.numpy.float32
  assert label.shape == (16,) and label.dtype == jax.numpy.int32
  for x in (image, label):
    assert x.sharding.spec == P("data")
    assert len(x.sharding.device_set) == NUM_DEVICES
    assert {s.data.shape[0] for s in x.addressable_shards} == {16 // NUM_DEVICES}
  image = np.asarray(image)
  assert -1.0 <= image.min() < -0.9 and 0.9 < image.max() <= 1.0  # Mock pixels span 0..255.
  assert np.all((np.asarray(label) >= 0) & (np.asarray(label) < 10))


def test_tfds_grayscale_keeps_one_channel():
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    it = input_pipeline.create_numpy_iterator(_data_config(name="mnist", image_size=28),
                                              global_batch_size=4, seed=0)
    batch = next(it)
  assert (it.num_classes, it.num_channels) == (10, 1)
  assert batch["image"].shape == (4, 28, 28, 1)


def test_tfds_without_labels_gives_zero_labels_and_crops():
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    it = input_pipeline.create_numpy_iterator(
        _data_config(name="celeb_a", image_size=8, resize="center_crop"),
        global_batch_size=4, seed=0)
    batch = next(it)
  assert it.num_classes == 0
  assert batch["image"].shape == (4, 8, 8, 3)  # 218x178 -> centred 178x178 -> 8x8.
  np.testing.assert_array_equal(batch["label"], np.zeros(4, np.int32))


class CaptionedImages(tfds.core.GeneratorBasedBuilder):
  """A captioned image dataset's shape (image + Text caption), as a user's own tfds dataset has it."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(12, 12, 3)), "caption": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield from ()


def test_tfds_caption_feature_is_tokenised_into_each_example(tmp_path):
  config = _data_config(name="captioned_images", image_size=8, caption_feature="caption", random_flip=False)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    captions = input_pipeline.read_captions(config)
    tokenizer = tokenizer_lib.build_word_level(captions, vocab_size=1000, directory=str(tmp_path / "tok"),
                                               max_length=16)
    it = input_pipeline.create_numpy_iterator(config, global_batch_size=4, seed=0, tokenizer=tokenizer)
    batch = next(it)
    with pytest.raises(ValueError, match=r"config.data.caption_feature='caption' needs a text encoder's tokenizer"):
      input_pipeline.create_numpy_iterator(config, global_batch_size=4, seed=0)
  assert len(captions) == 12 and len(set(captions)) > 1  # Mock captions: random strings.
  assert (it.num_classes, batch["image"].shape, batch["tokens"].shape) == (0, (4, 8, 8, 3), (4, 16))
  assert batch["tokens"].dtype == np.int32
  every = {tuple(row) for row in tokenizer(captions)}  # Each example's tokens are its own caption's.
  assert all(tuple(row) in every for row in batch["tokens"])
  assert len({tuple(row) for row in batch["tokens"]}) > 1


def test_center_crop_and_resize_differ_on_a_wide_image():
  image = np.zeros((4, 8, 1), np.uint8)
  image[:, :2] = 255  # White left quarter, outside the centred 4x4 square.
  cropped = preprocess.Preprocess(4, "center_crop").map({"image": image, "label": 3})
  resized = preprocess.Preprocess(4, "resize").map({"image": image, "label": 3})
  np.testing.assert_array_equal(cropped["image"], -np.ones((4, 4, 1), np.float32))
  assert resized["image"][:, 0].min() > 0.0 and resized["image"][:, -1].max() == -1.0
  assert cropped["label"] == 3 and cropped["label"].dtype == np.int32


def test_digits_source():
  source = input_pipeline.DigitsSource(image_size=16)
  assert len(source) == 1797
  items = [source[i] for i in range(0, 1797, 7)]
  assert all(x["image"].shape == (16, 16, 1) and x["image"].dtype == np.uint8 for x in items)
  assert {x["label"] for x in items} == set(range(10))
  # At the native 8x8 size the pixels are sklearn's 0..16 values scaled to 0..255.
  digits = sk_datasets.load_digits()
  np.testing.assert_array_equal(input_pipeline.DigitsSource(image_size=8)[5]["image"][..., 0],
                                np.round(digits.images[5] * 255 / 16).astype(np.uint8))


def test_digits_batches():
  it = input_pipeline.create_numpy_iterator(_data_config(), global_batch_size=64, seed=0)
  assert (it.num_examples, it.num_classes, it.num_channels) == (1797, 10, 1)
  batch = next(it)
  assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))


def test_same_seed_same_batches_different_seed_different():
  a = _take(input_pipeline.create_numpy_iterator(_data_config(), global_batch_size=16, seed=3), 3)
  b = _take(input_pipeline.create_numpy_iterator(_data_config(), global_batch_size=16, seed=3), 3)
  c = _take(input_pipeline.create_numpy_iterator(_data_config(), global_batch_size=16, seed=4), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_each_epoch_is_a_new_permutation():
  batches = _index_batches(global_batch_size=40)
  epoch0, epoch1 = batches[0]["label"], batches[1]["label"]
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1)


def test_random_flip_mirrors_some_images_and_keeps_the_order():
  config = dict(global_batch_size=64, seed=0)
  flipped = next(input_pipeline.create_numpy_iterator(_data_config(random_flip=True), **config))
  plain = next(input_pipeline.create_numpy_iterator(_data_config(random_flip=False), **config))
  np.testing.assert_array_equal(flipped["label"], plain["label"])
  same = [np.array_equal(f, p) for f, p in zip(flipped["image"], plain["image"])]
  mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped["image"], plain["image"])]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 10 < sum(m and not s for s, m in zip(same, mirrored)) < 54


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_yields_the_same_batches(prefetch):
  config = _data_config(random_flip=True, prefetch=prefetch)
  kwargs = dict(global_batch_size=16, seed=1, mesh=_mesh())
  ds = input_pipeline.create_dataset(config, **kwargs)
  _take(ds, 3)
  state = json.loads(json.dumps(ds.get_state()))
  assert state == {"step": 3}  # Batches prefetched ahead do not count.
  expected = _take(ds, 4)
  resumed = input_pipeline.create_dataset(config, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)
  assert resumed.get_state() == {"step": 7}


def test_resume_through_grain_checkpoint_handler(tmp_path):
  kwargs = dict(global_batch_size=16, seed=2, mesh=_mesh())
  ds = input_pipeline.create_dataset(_data_config(), **kwargs)
  _take(ds, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, item=ds)
  expected = _take(ds, 2)
  resumed = handler.restore(tmp_path, item=input_pipeline.create_dataset(_data_config(), **kwargs))
  _assert_batches_equal(_take(resumed, 2), expected)


def test_worker_processes_give_the_same_batches():
  kwargs = dict(global_batch_size=8, seed=0)
  it = input_pipeline.create_numpy_iterator(_data_config(num_workers=1), **kwargs)
  try:
    with_workers = _take(it, 3)
    it.set_state({"step": 1})
    resumed = _take(it, 2)
  finally:
    it.close()
  in_process = _take(input_pipeline.create_numpy_iterator(_data_config(), **kwargs), 3)
  _assert_batches_equal(with_workers, in_process)
  _assert_batches_equal(resumed, in_process[1:])


def test_two_processes_split_each_global_batch():
  single = _index_batches(process_count=1)
  parts = [_index_batches(process_index=p, process_count=2) for p in range(2)]
  seen = []
  for step in range(5):  # One epoch: 40 examples, global batch 8.
    labels0, labels1 = parts[0][step]["label"], parts[1][step]["label"]
    assert len(labels0) == len(labels1) == 4
    assert not set(labels0) & set(labels1)
    np.testing.assert_array_equal(np.concatenate([labels0, labels1]), single[step]["label"])
    seen.extend(single[step]["label"])
  assert sorted(seen) == list(range(40))
  other_seed = _index_batches(seed=1, process_count=1)
  assert not np.array_equal(other_seed[0]["label"], single[0]["label"])


def test_two_processes_through_create_numpy_iterator():
  config = _data_config(random_flip=True)
  whole = next(input_pipeline.create_numpy_iterator(config, global_batch_size=8, seed=0))
  halves = [next(input_pipeline.create_numpy_iterator(
      config, global_batch_size=8, seed=0, process_index=p, process_count=2)) for p in range(2)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


@pytest.mark.parametrize("key,value", [
    ("name", "not_a_dataset"),
    ("resize", "crop"),
    ("image_size", 0),
    ("image_size", -4),
    ("num_workers", -1),
    ("prefetch", -1),
])
def test_bad_config_values_name_the_key(key, value):
  config = _data_config(**{key: value})
  with pytest.raises(ValueError, match=f"config.data.{key}"):
    input_pipeline.validate_data_config(config, global_batch_size=8, process_count=1)
  with pytest.raises(ValueError, match=f"config.data.{key}"):
    input_pipeline.create_dataset(config, global_batch_size=8, seed=0, mesh=_mesh())


def test_batch_not_divisible_by_processes_or_devices():
  with pytest.raises(ValueError, match="config.training.batch_size"):
    input_pipeline.validate_data_config(_data_config(), global_batch_size=10, process_count=4)
  with pytest.raises(ValueError, match="config.training.batch_size"):
    input_pipeline.create_dataset(_data_config(), global_batch_size=12, seed=0, mesh=_mesh())


def test_unknown_digits_split():
  with pytest.raises(ValueError, match="config.data.split"):
    input_pipeline.create_numpy_iterator(_data_config(split="test"), global_batch_size=8, seed=0)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  config = _data_config(name="cifar10", data_dir=str(tmp_path))
  # Validation reads no data, so it passes although cifar10 is not prepared.
  input_pipeline.validate_data_config(config, global_batch_size=8, process_count=1)
  with pytest.raises(ValueError, match="config.data.name") as error:
    input_pipeline.create_numpy_iterator(config, global_batch_size=8, seed=0)
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in str(error.value)
