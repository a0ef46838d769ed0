"""A latent cache: the posteriors q(z | x) of a dataset split under a frozen autoencoder, encoded once.

`--mode=encode` writes the posterior moments of every image of config.data.split ([mean, log-variance]
concatenated on channels, [h, w, 2c], as the encoder gives them) and its labels under
config.latent.cache. Training with config.latent.cache set reads them instead of the images, skips
the encoder and still draws a fresh z = mean + std * e each step, as latent diffusion does (Rombach et
al. 2022 sample the posterior, not its mode); see LatentSpace.encode_batch in training/spaces.py.

The directory holds manifest.json (what was encoded: the autoencoder and its checkpoint step, the
data's name, split, image size and resize, the number of images, whether mirrored images were encoded)
and shards moments_NNNNN.npy (float32 [n, h, w, 2c]), labels_NNNNN.npy (int32 [n]) and, where
config.data.random_flip, flipped_NNNNN.npy (the moments of the left-right mirrored images: a flipped
image's latents are not the flipped latents). It is written as <cache>.partial by process 0 and renamed
when complete, so an interrupted encode leaves nothing that training reads as a cache. Training refuses
a cache whose manifest does not match its config, naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import input_pipeline
from models import pretrained
from training import config_check

MANIFEST = "manifest.json"
FORMAT = 1  # Version of the layout above.
SHARD_BYTES = 256 * 2**20  # Shards hold about this much of moments (the flipped ones as much again).


def _abspath(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def _expected(config: ml_collections.ConfigDict, autoencoder_step: int | None) -> dict[str, Any]:
  """The manifest entries a cache made for config must have, by the config key that sets each."""
  return {"latent.autoencoder": _abspath(config.latent.autoencoder),
          "latent.autoencoder (its checkpoint step)": autoencoder_step,
          "data.name": config.data.name, "data.split": config.data.split,
          "data.data_dir": config.data.data_dir, "data.image_size": config.data.image_size,
          "data.resize": config.data.resize}


def check_manifest(manifest: dict[str, Any], config: ml_collections.ConfigDict, *,
                   autoencoder_step: int | None, cache: str) -> None:
  """Raises ValueError naming the first config key the cache was not made for."""
  if manifest.get("format") != FORMAT:
    raise ValueError(f"config.latent.cache={cache!r} has format {manifest.get('format')!r}, not "
                     f"{FORMAT}; encode it again (--mode=encode) into a new directory.")
  for key, value in _expected(config, autoencoder_step).items():
    if manifest["config"].get(key) != value:
      raise ValueError(
          f"config.latent.cache={cache!r} was encoded with config.{key}="
          f"{manifest['config'].get(key)!r}, but this run has {value!r}. Encode the split for this "
          "config into another directory (--mode=encode --config.latent.cache=NEW).")
  if config.data.random_flip and not manifest["flipped"]:
    raise ValueError(f"config.data.random_flip=True but config.latent.cache={cache!r} holds no "
                     "mirrored images' posteriors (it was encoded with config.data.random_flip=False); "
                     "pass --config.data.random_flip=False or encode it again with flips.")


def read_manifest(cache: str) -> dict[str, Any]:
  """The manifest of a complete cache, or FileNotFoundError naming config.latent.cache."""
  path = os.path.join(_abspath(cache), MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.latent.cache={cache!r} is not a complete latent cache (no {MANIFEST}); write it with "
        "python main.py --config=<this config> --workdir=<any> --mode=encode.")
  with open(path) as f:
    return json.load(f)


def autoencoder_step(path: str) -> int | None:
  """The checkpoint step an autoencoder workdir gives (its latest); None for a converted one."""
  from training import checkpoints  # pylint: disable=g-import-not-at-top
  directory = _abspath(path)
  if os.path.exists(os.path.join(directory, "model.json")):
    return None
  manager = checkpoints.create_manager(directory, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _load_autoencoder(path: str):
  try:
    return pretrained.load_autoencoder(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"config.latent.autoencoder={path!r} is not an autoencoder: {e}") from e


def encode_split(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=encode: writes config.data.split's posteriors to config.latent.cache; returns its path.

  Every device encodes (batches of config.eval.batch_size); process 0 writes. A complete cache made for
  the same config is kept as it is; one made for another config is an error, and never overwritten.
  """
  del workdir  # The cache is config.latent.cache, shared by the runs that read it.
  config_check.validate_latent(config)
  cache = config.latent.cache
  if cache is None or config.latent.autoencoder is None:
    raise ValueError(f"--mode=encode needs config.latent.autoencoder (now "
                     f"{config.latent.autoencoder!r}) and config.latent.cache (now {cache!r}): the "
                     "autoencoder to encode with and the directory to write.")
  batch_size = config.eval.batch_size
  if not isinstance(batch_size, int) or batch_size <= 0 or batch_size % jax.device_count():
    raise ValueError(f"config.eval.batch_size={batch_size!r} must be a positive multiple of the "
                     f"{jax.device_count()} devices.")
  module, params, description = _load_autoencoder(config.latent.autoencoder)
  step = description.get("step")
  directory = _abspath(cache)
  if os.path.exists(directory):
    if not os.path.exists(os.path.join(directory, MANIFEST)):
      raise ValueError(f"config.latent.cache={cache!r} exists and is not a latent cache; pass a new "
                       "directory.")
    check_manifest(read_manifest(cache), config, autoencoder_step=step, cache=cache)
    logging.info("%s is already a latent cache of this config; nothing to do.", directory)
    return directory

  from evaluation import run as run_lib  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  images = run_lib.DatasetImages(config.data)
  config_check.validate_autoencoder(config, latent_channels=module.latent_channels,
                                    factor=module.downsampling_factor, out_channels=module.out_channels,
                                    data_channels=images.num_channels)
  mesh = train_lib.create_mesh()
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def moments(params, x):
    x = x.astype(jnp.float32) / 127.5 - 1.0
    q = module.apply({"params": params}, x, method=module.encode)
    return jnp.concatenate([q.mean, q.logvar], axis=-1)

  params = jax.device_put(params, replicated)
  flip = bool(config.data.random_flip)
  size = config.data.image_size // module.downsampling_factor
  per_image = size * size * 2 * module.latent_channels * 4
  shard_images = max(batch_size, SHARD_BYTES // per_image // batch_size * batch_size)
  partial = directory + ".partial"
  writing = jax.process_index() == 0
  if writing:
    if os.path.exists(partial):
      logging.warning("Removing %s, left by an interrupted encode.", partial)
      shutil.rmtree(partial)
    os.makedirs(partial)
  num, shards, pending = len(images), [], {"moments": [], "flipped": [], "labels": []}

  def flush():
    if not pending["labels"]:
      return
    index = len(shards)
    names = ("moments", "labels") + (("flipped",) if flip else ())
    if writing:
      for name in names:
        np.save(os.path.join(partial, f"{name}_{index:05d}.npy"), np.concatenate(pending[name]))
    shards.append(int(sum(len(b) for b in pending["labels"])))
    for values in pending.values():
      values.clear()

  logging.info("Encoding %d images of %s %r with %s into %s.", num, config.data.name,
               config.data.split, config.latent.autoencoder, directory)
  for begin in range(0, num, batch_size):
    x, labels = images.read(begin, min(begin + batch_size, num))
    n = len(x)
    x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    views = (x, x[:, :, ::-1]) if flip else (x,)
    for name, view in zip(("moments", "flipped"), views):
      array = jax.make_array_from_callback(view.shape, batch_sharding,
                                           lambda index, v=view: v[index])
      pending[name].append(np.asarray(jax.device_get(moments(params, array)))[:n])
    pending["labels"].append(labels)
    if sum(len(b) for b in pending["labels"]) >= shard_images:
      flush()
  flush()
  manifest = {"format": FORMAT, "config": _expected(config, step), "count": num, "shards": shards,
              "flipped": flip, "latent_shape": [size, size, module.latent_channels],
              "image_shape": [config.data.image_size, config.data.image_size, images.num_channels],
              "num_classes": images.num_classes}
  if writing:
    with open(os.path.join(partial, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(partial, directory)  # Complete, or not there at all.
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("latent cache written")
  logging.info("Wrote the posteriors of %d images in %d shards to %s.", num, len(shards), directory)
  return directory


class CacheSource:
  """Random access over a cache's shards: item i -> {"moments", "label"} (and "flipped").

  The shards are memory-mapped on first use in each process (grain workers open their own).
  """

  def __init__(self, directory: str, manifest: dict[str, Any]):
    self.directory = directory
    self.names = ("moments", "labels") + (("flipped",) if manifest["flipped"] else ())
    self.offsets = np.cumsum([0] + list(manifest["shards"]))
    self._arrays = None

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _open(self):
    if self._arrays is None:
      self._arrays = [{name: np.load(os.path.join(self.directory, f"{name}_{i:05d}.npy"), mmap_mode="r")
                       for name in self.names} for i in range(len(self.offsets) - 1)]
    return self._arrays

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
    arrays = self._open()[shard]
    row = index - int(self.offsets[shard])
    item = {name: np.array(arrays[name][row]) for name in self.names}
    item["label"] = item.pop("labels").astype(np.int32)
    return item

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}  # Workers map the files themselves.


@dataclasses.dataclass(frozen=True)
class Moments(grain.transforms.Map):
  """{"image": the posterior moments, "label"}: what the train step reads (spaces.encode_batch)."""

  def map(self, example: dict) -> dict:
    return {"image": example["moments"], "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class RandomFlipMoments(grain.transforms.RandomMap):
  """The mirrored image's moments with probability 1/2, seeded as preprocess.RandomFlip."""

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    key = "flipped" if rng.random() < 0.5 else "moments"
    return {"image": example[key], "label": example["label"]}


def create_dataset(config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   mesh: jax.sharding.Mesh, tokenizer: Any = None) -> input_pipeline.Dataset:
  """The training batches: config.data's images, or with config.latent.cache its posterior moments.

  tokenizer: a text model's (captions become batch["tokens"]); the cache holds no captions.

  The cache is read with input_pipeline's conventions: one global shuffle per epoch from the seed,
  process p reads its part of each batch, state {"step": k}.
  """
  if config.latent.get("cache") is None:
    return input_pipeline.create_dataset(config.data, global_batch_size=global_batch_size, seed=seed,
                                         mesh=mesh, tokenizer=tokenizer)
  if tokenizer is not None:
    raise ValueError(f"config.latent.cache={config.latent.cache!r} holds no captions: a text model "
                     "(config.text.encoder) encodes each batch (config.latent.cache=None).")
  input_pipeline.validate_data_config(config.data, global_batch_size=global_batch_size,
                                      process_count=jax.process_count(), mesh=mesh)
  cache = config.latent.cache
  manifest = read_manifest(cache)
  check_manifest(manifest, config, autoencoder_step=autoencoder_step(config.latent.autoencoder),
                 cache=cache)
  source = CacheSource(_abspath(cache), manifest)
  transform = RandomFlipMoments() if config.data.random_flip else Moments()
  batches = input_pipeline.shuffled_batches(
      source, [transform], seed=seed, global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  logging.info("Data: the latent cache %s of %d images.", cache, len(source))
  host = input_pipeline.NumpyIterator(batches, num_workers=config.data.num_workers,
                                      num_examples=len(source), num_classes=manifest["num_classes"],
                                      num_channels=manifest["image_shape"][-1])
  return input_pipeline.Dataset(host, mesh=mesh, prefetch=config.data.prefetch)
