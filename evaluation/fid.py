"""FID and Inception Score from Inception outputs, and the reference statistics of a dataset.

FID (Heusel et al. 2017, Eq. 6) is the Frechet distance between Gaussians fitted to the pool3 features
of generated and reference images, computed in float64 as pytorch-fid (scipy.linalg.sqrtm, with its
eps offset where the product is singular). Statistics are .npz files with keys mu and sigma, as
pytorch-fid's, so they can be exchanged with it. IS is Salimans et al. 2016's, over 10 splits.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from scipy import linalg

from evaluation import inception
from evaluation import run as run_lib
from training import train as train_lib

STANDARD_NUM_SAMPLES = 50_000  # The N papers report FID on.
IS_SPLITS = 10  # Salimans et al. 2016 (openai/improved-gan) average the Inception Score over 10 splits.


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Heusel et al. 2017, Eq. 6: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it.

  Where sqrtm of the product is not finite, eps is added to both diagonals (pytorch-fid's fallback);
  an imaginary part from round-off is dropped, one above 1e-3 on the diagonal is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}.")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: the product of the covariances is singular; adding %g to their diagonals.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2).")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class FeatureStats:
  """Running mean and covariance (np.cov's, N - 1) of feature batches, in float64.

  Sums are taken about the first batch's mean, so the one pass loses no precision to cancellation.
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    x = x - self._shift
    self.count += len(x)
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 samples, got {self.count}.")
    mean = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return self._shift + mean, sigma


class InceptionScore:
  """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive parts of num images.

  The parts are openai/improved-gan's, [i N / splits, (i + 1) N / splits); batches arrive in order.
  """

  def __init__(self, num: int, splits: int = IS_SPLITS):
    if num < splits:
      raise ValueError(f"The Inception Score over {splits} splits needs at least {splits} images, got {num} "
                       "(an empty split has no score).")
    self.num, self.splits = num, splits
    self._bounds = [i * num // splits for i in range(splits + 1)]
    self._seen = 0
    self._sum_p = np.zeros((splits, inception.NUM_LOGITS))
    self._sum_plogp = np.zeros(splits)

  def update(self, logits: np.ndarray) -> None:
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    split = np.searchsorted(self._bounds, self._seen + np.arange(len(p)), side="right") - 1
    for s in np.unique(split):
      rows = split == s
      self._sum_p[s] += p[rows].sum(axis=0)
      self._sum_plogp[s] += (p[rows] * logp[rows]).sum()
    self._seen += len(p)

  def result(self) -> tuple[float, float]:
    """(mean, std) of the split scores."""
    if self._seen != self.num:
      raise ValueError(f"InceptionScore expected {self.num} images, got {self._seen}.")
    sizes = np.diff(self._bounds).astype(np.float64)
    py = self._sum_p / sizes[:, None]
    # E_x KL = E_x sum_y p log p - sum_y p(y) log p(y).
    kl = self._sum_plogp / sizes - (py * np.log(np.where(py > 0, py, 1.0))).sum(axis=1)
    scores = np.exp(kl)
    return float(scores.mean()), float(scores.std())


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **info) -> None:
  """pytorch-fid's format: an .npz with mu [D] and sigma [D, D] (and any extra keys, e.g. num)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, mu=mu, sigma=sigma, **info)
  os.replace(path + ".tmp", path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(os.path.expanduser(path)) as f:
    return f["mu"][:], f["sigma"][:]


def reference_stats_path(config: ml_collections.ConfigDict, workdir_or_out_path: str) -> str:
  """Where the reference statistics are: an explicit .npz path, config.eval.fid_stats_path, or

  workdir/eval/fid_stats_<name>_<split>_<image_size>.npz.
  """
  if workdir_or_out_path.endswith(".npz"):
    return os.path.expanduser(workdir_or_out_path)
  if config.eval.fid_stats_path:
    return os.path.expanduser(config.eval.fid_stats_path)
  d = config.data
  name = str(d.name).replace("/", "_").replace(":", "_")
  return os.path.join(workdir_or_out_path, "eval", f"fid_stats_{name}_{d.split}_{d.image_size}.npz")


def compute_reference_stats(config: ml_collections.ConfigDict, workdir_or_out_path: str) -> str:
  """--mode=fid_stats: pool3 mean and covariance of every image of config.data.split, as the model sees

  them (cropped and resized to config.data.image_size, not flipped), written to reference_stats_path.
  Returns the path.
  """
  path = reference_stats_path(config, workdir_or_out_path)
  mesh = train_lib.create_mesh()
  extractor = inception.FeatureExtractor(inception.load_variables(config.eval.inception_path),
                                         mesh=mesh, batch_size=config.eval.batch_size)
  images = run_lib.DatasetImages(config.data)
  stats = FeatureStats()
  start = time.perf_counter()
  for begin in range(0, len(images), extractor.batch_size):
    batch, _ = images.read(begin, min(begin + extractor.batch_size, len(images)))
    stats.update(extractor(batch)["pool3"])
  mu, sigma = stats.mu_sigma()
  if jax.process_index() == 0:
    save_stats(path, mu, sigma, num=stats.count)
  logging.info("Reference statistics of %d images of %s (split %r, %dpx) in %.1f s: %s", stats.count,
               config.data.name, config.data.split, config.data.image_size, time.perf_counter() - start,
               path)
  return path
