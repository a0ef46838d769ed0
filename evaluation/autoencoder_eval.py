"""--mode=eval of an autoencoder run: PSNR, rFID and LPIPS of its reconstructions of held-out images.

For every checkpoint not yet evaluated with the same settings (or only config.eval.step), reconstructs
the first config.eval.num_samples images of config.data.holdout_split (default config.data.split; all
of them where it has fewer) from the posterior mode with the EMA parameters, and records
- psnr: the mean PSNR in dB of the reconstructions (clipped to [-1, 1]) against the originals;
- rfid: the FID (Heusel et al. 2017) between the Inception features of the reconstructions and those of
  the originals, with the network and code of diffusion eval (evaluation/inception.py, fid.py);
- lpips: the mean LPIPS distance (Zhang et al. 2018), where config.autoencoder_loss.lpips_path holds
  weights (scripts/convert_lpips.py).
Records go to workdir/eval/metrics.jsonl and TensorBoard under workdir/eval, as diffusion eval's; a
rerun skips what metrics.jsonl already holds.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from evaluation import evaluate as evaluate_lib
from evaluation import fid
from evaluation import inception
from evaluation import run as run_lib
from models import lpips as lpips_lib
from training import checkpoints
from training import tasks
from training import train as train_lib
from training import writers


def _lpips_fn(path: str, mesh: jax.sharding.Mesh):
  """(x_hat, x) -> LPIPS per image, or None where path holds no weights."""
  if not os.path.exists(os.path.expanduser(path)):
    logging.info("No LPIPS weights at config.autoencoder_loss.lpips_path=%r: LPIPS is not computed.", path)
    return None
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(lpips_lib.load_params(path), replicated)
  distance = jax.jit(lambda p, a, b: lpips_lib.LPIPS().apply({"params": p}, a, b),
                     out_shardings=replicated)
  return lambda x_hat, x: np.asarray(jax.device_get(distance(params, x_hat, x)))


def reconstruction_metrics(reconstruct, params: Any, images: run_lib.DatasetImages, *, num: int,
                           batch_size: int, extractor: inception.FeatureExtractor,
                           reference: fid.FeatureStats, lpips_fn=None) -> dict[str, float]:
  """PSNR, rFID (and LPIPS) of the first num images reconstructed by reconstruct(params, x).

  reference: the originals' Inception statistics, filled on first use and reused afterwards.
  """
  fill = reference.count == 0
  stats, psnr, distances = fid.FeatureStats(), [], []
  for begin in range(0, num, batch_size):
    originals, _ = images.read(begin, min(begin + batch_size, num))
    x = originals.astype(np.float32) / 127.5 - 1.0
    x_hat, batch_psnr = reconstruct(params, x)
    psnr.append(batch_psnr)
    stats.update(extractor(writers.to_uint8(x_hat))["pool3"])
    if fill:
      reference.update(extractor(originals)["pool3"])
    if lpips_fn is not None:
      distances.append(lpips_fn(np.clip(x_hat, -1.0, 1.0), x))
  metrics = {"psnr": float(np.mean(np.concatenate(psnr))),
             "rfid": fid.frechet_distance(*stats.mu_sigma(), *reference.mu_sigma())}
  if lpips_fn is not None:
    metrics["lpips"] = float(np.mean(np.concatenate(distances)))
  return metrics


def evaluate_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Evaluates the checkpoints of an autoencoder workdir not yet evaluated; returns the new records."""
  ev = config.eval
  evaluate_lib.validate_eval(ev, device_count=jax.device_count())
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.split = config.data.get("holdout_split") or config.data.split
  images = run_lib.DatasetImages(data)
  num = min(ev.num_samples, len(images))
  if num < 2:
    raise ValueError(f"config.data.holdout_split={data.split!r} has {len(images)} images; rFID needs "
                     "at least 2.")
  if num < ev.num_samples:
    logging.info("config.eval.num_samples=%d: config.data.holdout_split=%r has %d images, all used.",
                 ev.num_samples, data.split, num)
  manager = checkpoints.create_manager(workdir, read_only=True)
  steps = evaluate_lib.on_process_0(evaluate_lib.steps_to_evaluate, manager, workdir, ev.step)
  mesh = train_lib.create_mesh()
  extractor = inception.FeatureExtractor(inception.load_variables(ev.inception_path), mesh=mesh,
                                         batch_size=ev.batch_size)
  lpips_fn = _lpips_fn(config.autoencoder_loss.lpips_path, mesh)
  lpips_path = os.path.abspath(os.path.expanduser(config.autoencoder_loss.lpips_path))
  eval_dir = os.path.join(workdir, "eval")
  metrics_path = os.path.join(eval_dir, "metrics.jsonl")
  done = evaluate_lib.read_metrics(metrics_path) if jax.process_index() == 0 else []
  writer = writers.MetricWriter(eval_dir)
  reference, records, built = fid.FeatureStats(), [], (None, None)
  try:
    for step in steps:
      restored = evaluate_lib.restore(manager, workdir, step, mesh)
      if restored is None:
        continue
      trained, state, _, _, image_shape = restored
      setting = {"step": step, "num_images": num, "holdout": f"{data.name}:{data.split}",
                 "image_size": data.image_size, "batch_size": ev.batch_size,
                 "inception_weights": os.path.abspath(os.path.expanduser(ev.inception_path)),
                 "lpips_weights": lpips_path if lpips_fn is not None else None}
      if evaluate_lib.on_process_0(evaluate_lib.evaluated, done, setting):
        logging.info("Checkpoint %d is already evaluated with these settings in %s; skipped.", step,
                     metrics_path)
        continue
      model = tasks.autoencoder_model(trained.model, channels=image_shape[-1])
      if built[0] != model:  # One compiled reconstruction for checkpoints of the same model.
        built = (model, tasks.make_reconstruct(model, mesh))
      metrics = reconstruction_metrics(built[1], state.ema_params, images, num=num,
                                       batch_size=ev.batch_size, extractor=extractor,
                                       reference=reference, lpips_fn=lpips_fn)
      record = {**setting, **metrics, "num_devices": jax.device_count()}
      scalars = {f"{k}/n{num}": v for k, v in metrics.items()}
      evaluate_lib.publish(writer, metrics_path, step, record, scalars)
      records.append(record)
  finally:
    writer.close()
    manager.close()
  return records
