"""A quality metric for the digits demo: Frechet distance in the features of a small digits classifier.

FID's Inception network knows nothing of 16x16 digits; this metric uses a network that does. sklearn's
1797 digits, made exactly as the data pipeline makes them (input_pipeline.sources.DigitsSource: bilinear
upsampling to image_size, uint8), are split once by a fixed permutation into
- TRAIN (half): a small MLP classifier is trained on it (Adam, full batch, a few seconds on a CPU);
- FLOOR and REFERENCE (a quarter each), held out from the classifier.
The score of a set of images is the Frechet distance (Heusel et al. 2017, Eq. 2 of the FID) between the
Gaussians of their penultimate-layer features and those of REFERENCE, on as many images as FLOOR has.
FLOOR, real held-out digits scored the same way, gives the floor: what a perfect generator would score
with that many images. The classifier's weights are cached, so the metric is the same in every run;
the same seed trains the same classifier.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from evaluation import fid
from input_pipeline import sources

NUM_CLASSES = 10
FEATURES = 64
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "digits_fd")


class Classifier(nn.Module):
  """MLP on [-1, 1] images: flattened -> 256 -> FEATURES (the metric's features) -> 10 logits."""

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = images.reshape(images.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    features = nn.relu(nn.Dense(FEATURES)(x))
    return nn.Dense(NUM_CLASSES)(features), features


def digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [1797, S, S, 1], int labels) as the data pipeline reads them at config.data.image_size = S."""
  source = sources.DigitsSource(image_size)
  items = [source[i] for i in range(len(source))]
  return np.stack([it["image"] for it in items]), np.array([it["label"] for it in items])


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TRAIN (half), FLOOR and REFERENCE (a quarter each) by one fixed permutation of range(n)."""
  perm = np.random.RandomState(0).permutation(n)
  half, three_quarters = n // 2, (3 * n) // 4
  return perm[:half], perm[half:three_quarters], perm[three_quarters:]


def to_model_input(images: np.ndarray) -> jnp.ndarray:
  """uint8 [n, S, S, 1] (or [n, S, S]) -> float32 in [-1, 1], as the diffusion model sees them."""
  return jnp.asarray(np.asarray(images, np.float32).reshape(len(images), -1) / 127.5 - 1.0)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, seed: int = 0, steps: int = 600,
                     learning_rate: float = 1e-3, weight_decay: float = 1e-4) -> dict:
  """Parameters of Classifier trained on (images, labels): full-batch AdamW, cross-entropy."""
  model = Classifier()
  x, y = to_model_input(images), jnp.asarray(labels)
  params = model.init(jax.random.key(seed), x[:1])["params"]
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(p):
    logits, _ = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, opt_state = carry
      grad = jax.grad(loss_fn)(p)
      updates, opt_state = optimizer.update(grad, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None
    (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
    return p

  return train(params)


def _flatten(params: dict) -> dict[str, np.ndarray]:
  return {f"{layer}/{name}": np.asarray(v) for layer, sub in params.items() for name, v in sub.items()}


def _unflatten(arrays) -> dict:
  params: dict = {}
  for key in arrays.files:
    layer, name = key.split("/")
    params.setdefault(layer, {})[name] = jnp.asarray(arrays[key])
  return params


@dataclasses.dataclass
class DigitsFD:
  """The metric at one image size: score(images) and the floor, from a cached classifier."""

  image_size: int
  params: dict
  reference_features: np.ndarray
  floor_features: np.ndarray
  test_accuracy: float

  @classmethod
  def create(cls, image_size: int = 16, *, seed: int = 0, cache_dir: str | None = DEFAULT_CACHE) -> "DigitsFD":
    """Loads the classifier of (image_size, seed) from cache_dir, training and saving it if absent."""
    images, labels = digits(image_size)
    train, floor, reference = split_indices(len(images))
    path = cache_dir and os.path.join(cache_dir, f"classifier_{image_size}px_seed{seed}.npz")
    if path and os.path.exists(path):
      with np.load(path) as arrays:
        params = _unflatten(arrays)
    else:
      params = train_classifier(images[train], labels[train], seed=seed)
      if path:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:
          np.savez(f, **_flatten(params))
        os.replace(path + ".tmp", path)
    metric = cls(image_size, params, np.empty(0), np.empty(0), 0.0)
    held_out = np.concatenate([floor, reference])
    logits, _ = Classifier().apply({"params": params}, to_model_input(images[held_out]))
    metric.test_accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[held_out]))
    metric.reference_features = metric.features(images[reference])
    metric.floor_features = metric.features(images[floor])
    return metric

  @property
  def num(self) -> int:
    """Images scored: as many as FLOOR has, so a score and the floor have the same finite-sample bias."""
    return len(self.floor_features)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Penultimate-layer features (float64 [n, FEATURES]) of uint8 images [n, S, S, 1]."""
    images = np.asarray(images)
    if images.shape[1:3] != (self.image_size, self.image_size) or images.dtype != np.uint8:
      raise ValueError(f"images of shape {images.shape} and dtype {images.dtype}: expected uint8 "
                       f"[n, {self.image_size}, {self.image_size}, 1] digits.")
    _, feats = Classifier().apply({"params": self.params}, to_model_input(images))
    return np.asarray(feats, np.float64)

  def distance(self, features: np.ndarray) -> float:
    """Frechet distance of the Gaussian of features to that of REFERENCE."""
    mu, sigma = np.mean(features, 0), np.cov(features, rowvar=False)
    ref_mu, ref_sigma = np.mean(self.reference_features, 0), np.cov(self.reference_features, rowvar=False)
    return float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))

  def score(self, images: np.ndarray) -> float:
    """The FD of the first `num` images (an error if there are fewer: the floor would not compare)."""
    if len(images) < self.num:
      raise ValueError(f"{len(images)} images; the digits FD needs at least {self.num} (the size of the "
                       "held-out set its floor is measured on).")
    return self.distance(self.features(np.asarray(images)[:self.num]))

  def floor(self) -> float:
    """The FD of held-out real digits (FLOOR) to REFERENCE: the score of a perfect generator."""
    return self.distance(self.floor_features)
