"""Training batches: per-process shards of a shuffled, repeated stream, as sharded jax.Arrays.

The stream is the whole split, shuffled globally (a new order each epoch, from the seed)
and repeated forever. Global batch k is stream positions [k*G, (k+1)*G); process p of P
reads and preprocesses only its part, positions k*G + p*L .. k*G + (p+1)*L with L = G // P.
So the global batches do not depend on the process count, and the position of an iterator
is one number, the step k: `get_state()` is {"step": k} and works with any num_workers.
"""

import collections
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from input_pipeline import preprocess
from input_pipeline import sources

DATA_AXIS = "data"  # Mesh axis the batch dimension is sharded over.
READ_THREADS = 2  # Threads that read and preprocess batches in each (worker) process.
HOST_BUFFER = 4  # Batches each (worker) process prepares ahead.


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_data_config(data_config: Any, *, global_batch_size: int, process_count: int,
                         mesh: jax.sharding.Mesh | None = None) -> None:
  """Raises ValueError, naming the config key, for a bad config.data; reads no data.

  Checks the dataset name (a SOURCES name or a registered tfds dataset), image_size,
  resize, random_flip, num_workers, prefetch, and that config.training.batch_size splits
  evenly over the processes (and over the devices of `mesh`, where it is given).
  """
  name = data_config.name
  if not isinstance(name, str) or not name:
    raise ValueError(f"config.data.name={name!r} must be a tfds dataset name or one of "
                     f"{', '.join(sources.SOURCES)}.")
  if name not in sources.SOURCES:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      dataset_name, _ = tfds.core.naming.parse_builder_name_kwargs(name)
      tfds.builder_cls(str(dataset_name))
    except (tfds.core.DatasetNotFoundError, ValueError) as e:
      raise ValueError(f"config.data.name={name!r} is not a tfds dataset nor one of "
                       f"{', '.join(sources.SOURCES)}.") from e
  if not isinstance(data_config.split, str) or not data_config.split:
    raise ValueError(f"config.data.split={data_config.split!r} must be a split name like 'train'.")
  image_size = data_config.image_size
  if not _is_int(image_size) or image_size <= 0:
    raise ValueError(f"config.data.image_size={image_size!r} must be a positive integer.")
  if data_config.resize not in preprocess.RESIZE_METHODS:
    raise ValueError(f"config.data.resize={data_config.resize!r} is not one of "
                     f"{', '.join(preprocess.RESIZE_METHODS)}.")
  if not isinstance(data_config.random_flip, (bool, np.bool_)):
    raise ValueError(f"config.data.random_flip={data_config.random_flip!r} must be True or False.")
  for key in ("num_workers", "prefetch"):
    value = getattr(data_config, key)
    if not _is_int(value) or value < 0:
      raise ValueError(f"config.data.{key}={value!r} must be an integer >= 0.")
  if not _is_int(process_count) or process_count <= 0:
    raise ValueError(f"process_count={process_count!r} must be a positive integer.")
  if not _is_int(global_batch_size) or global_batch_size <= 0:
    raise ValueError(
        f"config.training.batch_size={global_batch_size!r} must be a positive integer.")
  if global_batch_size % process_count:
    raise ValueError(f"config.training.batch_size={global_batch_size} is not divisible by the "
                     f"process count {process_count}.")
  if mesh is not None:
    if DATA_AXIS not in mesh.axis_names:
      raise ValueError(f"The mesh has no {DATA_AXIS!r} axis (axes: {mesh.axis_names}).")
    if global_batch_size % mesh.size:
      raise ValueError(
          f"config.training.batch_size={global_batch_size} is not divisible by the {mesh.size} "
          f"devices of the mesh ({' x '.join(f'{k} {v}' for k, v in mesh.shape.items())}).")


def build_process_batches(source: Any, *, image_size: int, resize: str, random_flip: bool,
                          seed: int, global_batch_size: int, process_index: int,
                          process_count: int, has_label: bool = True,
                          caption: tuple[str, Any] | None = None) -> grain.MapDataset:
  """Returns an (infinite) grain.MapDataset whose element k is this process's part of batch k.

  Elements are {"image": float32 [L,H,W,C] in [-1, 1], "label": int32 [L]}, L = G // P.
  `source` is any random-access source (__len__, __getitem__ -> {"image", "label"}).
  caption: (feature, tokenizer): elements also hold "tokens", int32 [L, T], of example[feature].
  """
  transforms = [preprocess.Preprocess(image_size, resize, use_label=has_label, caption=caption)]
  if random_flip:
    transforms.append(preprocess.RandomFlip())  # Seeded by (seed, stream position).
  return shuffled_batches(source, transforms, seed=seed, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count)


def shuffled_batches(source: Any, transforms: list[Any], *, seed: int, global_batch_size: int,
                     process_index: int, process_count: int) -> grain.MapDataset:
  """Element k: this process's part of global batch k of source, each example mapped by transforms.

  transforms are grain Maps or RandomMaps, applied in order; the order of the examples is a new
  global shuffle each epoch, derived from the seed.
  """
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  for transform in transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform)
    else:
      ds = ds.map(transform)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  return ds[process_index::process_count]


class NumpyIterator(grain.DatasetIterator):
  """Iterates over this process's batches as host numpy arrays.

  Yields {"image": float32 [L,H,W,C] in [-1, 1], "label": int32 [L]}, L = global batch //
  process count. State: {"step": batches handed out}. Being a grain.DatasetIterator, it
  also works with grain.checkpoint.CheckpointSave/CheckpointRestore.
  """

  def __init__(self, batches: grain.MapDataset, *, num_workers: int = 0,
               num_examples: int, num_classes: int, num_channels: int):
    super().__init__()
    self.num_examples = num_examples  # Size of the split.
    self.num_classes = num_classes  # 0 where the dataset has no labels.
    self.num_channels = num_channels
    self._batches = batches
    self._num_workers = num_workers
    self._step = 0
    self._iterator = None  # Started on first use, so set_state right after creation is free.

  def start_prefetch(self) -> None:
    if self._iterator is None:
      ds = self._batches[self._step:].to_iter_dataset(
          grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=HOST_BUFFER))
      if self._num_workers > 0:
        if not flags.FLAGS.is_parsed():
          # grain 0.2.x reads an absl flag in mp_prefetch even when no one parsed flags (outside
          # absl.app: tests, notebooks); github.com/google/grain/issues/1355.
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
      self._iterator = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    self.start_prefetch()
    batch = next(self._iterator)
    if self._num_workers > 0:
      # Own the memory: arrays from workers live in shared memory that grain frees on GC.
      batch = {k: np.array(v) for k, v in batch.items()}
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop()
    self._step = int(state["step"])

  def _stop(self) -> None:
    if self._iterator is not None:
      if hasattr(self._iterator, "close"):
        self._iterator.close()
      self._iterator = None

  def close(self) -> None:
    self._stop()
    super().close()


class Dataset(grain.DatasetIterator):
  """Global batches as jax.Arrays, the batch dimension split over every device of the mesh.

  Yields {"image": float32 [G,H,W,C] in [-1, 1], "label": int32 [G]}. `prefetch` batches
  are kept on their way to the devices; get_state() is still the position after the last
  batch handed out.
  """

  def __init__(self, host: NumpyIterator, *, mesh: jax.sharding.Mesh, prefetch: int):
    super().__init__()
    self.host = host  # The numpy iterator underneath (this process's part of each batch).
    self.num_examples = host.num_examples
    self.num_classes = host.num_classes
    self.num_channels = host.num_channels
    self.sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # Over every device (data, fsdp).
    self._prefetch = prefetch
    self._in_flight = collections.deque()  # (device batch, host state after it).
    self._state = host.get_state()

  def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}

  def __next__(self) -> dict[str, jax.Array]:
    self._assert_not_closed()
    while len(self._in_flight) <= self._prefetch:
      batch = self._to_device(next(self.host))  # Transfers are asynchronous.
      self._in_flight.append((batch, self.host.get_state()))
    batch, self._state = self._in_flight.popleft()
    return batch

  def get_state(self) -> dict[str, int]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._in_flight.clear()
    self.host.set_state(state)
    self._state = self.host.get_state()

  def start_prefetch(self) -> None:
    self.host.start_prefetch()

  def close(self) -> None:
    self._in_flight.clear()
    self.host.close()
    super().close()


def caption_feature(data_config: Any, info: sources.SourceInfo) -> str | None:
  """config.data.caption_feature, checked against the source's caption features."""
  feature = data_config.get("caption_feature")
  if feature is not None and feature not in info.captions:
    raise ValueError(f"config.data.caption_feature={feature!r} is not a caption feature of "
                     f"config.data.name={data_config.name!r}; its text features: "
                     f"{', '.join(info.captions) or 'none'}.")
  return feature


def read_captions(data_config: Any) -> list[str]:
  """Every caption of config.data.split's config.data.caption_feature (a word-level vocabulary's text).

  A source with a fixed VOCABULARY (two_digits) gives that instead of reading every example.
  """
  info = sources.open_source(name=data_config.name, split=data_config.split,
                             data_dir=data_config.data_dir, image_size=data_config.image_size)
  feature = caption_feature(data_config, info)
  if feature is None:
    raise ValueError(f"config.data.caption_feature is None: name the caption feature of "
                     f"config.data.name={data_config.name!r} (text features: "
                     f"{', '.join(info.captions) or 'none'}).")
  if hasattr(info.source, "VOCABULARY"):
    return [" ".join(info.source.VOCABULARY)]
  texts = (info.source[i][feature] for i in range(len(info.source)))
  return [t.decode() if isinstance(t, bytes) else str(t) for t in texts]


def create_numpy_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1,
                          tokenizer: Any = None) -> NumpyIterator:
  """Returns this process's batches as host numpy (for tests, notebooks and evaluation).

  Process `process_index` of `process_count` gets its global_batch_size // process_count
  examples of each global batch; with the defaults, the whole global batch. With
  config.data.caption_feature, a tokenizer (prompts -> int32 ids [n, T]) turns each caption
  into batch["tokens"], int32 [L, T].
  """
  validate_data_config(data_config, global_batch_size=global_batch_size,
                       process_count=process_count)
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"config.seed={seed!r} must be an integer >= 0.")
  if not _is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index!r} is not in [0, {process_count}).")
  info = sources.open_source(name=data_config.name, split=data_config.split,
                             data_dir=data_config.data_dir, image_size=data_config.image_size)
  feature = caption_feature(data_config, info)
  if feature is not None and tokenizer is None:
    raise ValueError(f"config.data.caption_feature={feature!r} needs a text encoder's tokenizer "
                     "(config.text.encoder).")
  batches = build_process_batches(
      info.source, image_size=data_config.image_size, resize=data_config.resize,
      random_flip=bool(data_config.random_flip), seed=seed,
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, has_label=info.has_label,
      caption=(feature, tokenizer) if feature is not None else None)
  logging.info("Data: %s split %r, %d examples, process %d of %d reads %d per batch of %d.",
               data_config.name, data_config.split, len(info.source), process_index,
               process_count, global_batch_size // process_count, global_batch_size)
  return NumpyIterator(batches, num_workers=data_config.num_workers,
                       num_examples=len(info.source), num_classes=info.num_classes,
                       num_channels=info.num_channels)


def create_dataset(data_config: Any, *, global_batch_size: int, seed: int,
                   mesh: jax.sharding.Mesh, process_index: int | None = None,
                   process_count: int | None = None, tokenizer: Any = None) -> Dataset:
  """Returns the training batches of config.data as sharded jax.Arrays, with a restorable state.

  Args:
    data_config: the config.data section.
    global_batch_size: batch size over all processes (config.training.batch_size).
    seed: seeds the shuffle and the flips (config.seed).
    mesh: the batch dimension is split over all its devices (axes "data" and "fsdp").
    process_index, process_count: default to jax.process_index(), jax.process_count().
    tokenizer: of the text encoder, for config.data.caption_feature (batch["tokens"]).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  validate_data_config(data_config, global_batch_size=global_batch_size,
                       process_count=process_count, mesh=mesh)
  host = create_numpy_iterator(data_config, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count,
                               tokenizer=tokenizer)
  return Dataset(host, mesh=mesh, prefetch=data_config.prefetch)
