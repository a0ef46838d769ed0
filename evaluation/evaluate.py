"""--mode=eval: FID, IS (and NLL) of each checkpoint of a workdir, written with the settings behind them.

For every checkpoint not yet evaluated with the same settings (or only config.eval.step), draws
config.eval.num_samples images from the EMA parameters with config.sample's sampler, steps and
guidance (training/generate.Sampler, sharded over all devices and processes), and compares their
Inception features with the reference statistics (--mode=fid_stats). Each result goes, with N, the
sampler, its steps and options, the seed and the reference file, to workdir/eval/metrics.jsonl (one
JSON object a line, appended when the checkpoint is done) and to TensorBoard under workdir/eval. A rerun
skips what metrics.jsonl already holds, so an interrupted evaluation resumes at the next checkpoint.

It can run beside the training job: process 0 decides which steps to evaluate and every process follows
it; a checkpoint that training's max_to_keep deletes before (or while) it is restored is skipped with a
warning.

The model comes from the checkpoint's own config; config.sample and config.eval from the command line,
and config.data names the reference images (FID statistics path, NLL images).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from diffusion import guidance
from diffusion import samplers
from evaluation import fid
from evaluation import inception
from evaluation import likelihood
from evaluation import run as run_lib
from training import checkpoints
from training import config_check
from training import generate
from training import sharding
from training import spaces
from training import train as train_lib
from training import writers


def validate_eval(eval_config: ml_collections.ConfigDict, *, device_count: int) -> None:
  """Raises ValueError naming the config.eval key that is out of range."""
  ev = eval_config
  if not isinstance(ev.num_samples, int) or ev.num_samples < fid.IS_SPLITS:
    raise ValueError(f"config.eval.num_samples={ev.num_samples!r} must be an integer >= {fid.IS_SPLITS}: the "
                     f"Inception Score averages over {fid.IS_SPLITS} splits of the samples.")
  if not isinstance(ev.batch_size, int) or ev.batch_size <= 0 or ev.batch_size % device_count:
    raise ValueError(f"config.eval.batch_size={ev.batch_size!r} must be a positive multiple of the "
                     f"{device_count} devices.")
  if ev.nll and (not isinstance(ev.nll_num, int) or ev.nll_num <= 0):
    raise ValueError(f"config.eval.nll_num={ev.nll_num!r} must be a positive integer.")
  if ev.step is not None and (not isinstance(ev.step, int) or ev.step < 0):
    raise ValueError(f"config.eval.step={ev.step!r} must be a checkpoint step or None (all).")


def _chunk_seed(seed: int, chunk: int) -> int:
  """The sampling seed of the chunk-th batch: distinct, reproducible, independent of the device count."""
  return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def settings(config: ml_collections.ConfigDict, step: int, schedule, reference: str) -> dict[str, Any]:
  """What produces the figures of a checkpoint; a result with the same settings is not computed again."""
  options = generate.SampleOptions.from_config(config)
  # The seed of each chunk of eval.batch_size images depends on the chunk's index (_chunk_seed).
  out = {"step": step, "num_samples": config.eval.num_samples, "batch_size": config.eval.batch_size,
         "sampler": options.sampler, "steps": options.steps,
         "grid": options.grid or samplers.default_grid(options.sampler, schedule),
         **options.sampler_options(), "guidance_scale": options.guidance_scale,
         "guidance_rescale": options.guidance_rescale, "dynamic_threshold": options.dynamic_threshold,
         "clip_x0": options.clip_x0, "seed": config.sample.seed, "reference_stats": os.path.abspath(reference)}
  if config.latent.autoencoder is not None:  # FID and IS of the decoded images.
    out.update(latent_autoencoder=os.path.abspath(os.path.expanduser(config.latent.autoencoder)),
               latent_scale_factor=config.latent.scale_factor)
  if config.eval.nll:
    # The ODE's start time: records made when it started below the trained times are not reused.
    out.update(nll_num=config.eval.nll_num, nll_hutchinson=config.eval.nll_hutchinson,
               nll_data=f"{config.data.name}:{config.data.split}", nll_ode_t_start=schedule.t_min)
  return out


def evaluated(records: list[dict[str, Any]], setting: dict[str, Any]) -> bool:
  """Whether a record holds figures made with exactly these settings (a setting it lacks differs)."""
  missing = object()
  return any(all(r.get(k, missing) == v for k, v in setting.items()) for r in records)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl (a torn last line, from a kill mid-write, is ignored)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("Ignoring an unreadable line of %s: %r", path, line[:80])
  return records


def publish(writer: Any, metrics_path: str, step: int, record: dict[str, Any],
            scalars: dict[str, float]) -> None:
  """One evaluation's result: scalars to TensorBoard and the log, the record to metrics_path (process 0)."""
  writer.write_scalars(step, scalars)
  if jax.process_index() == 0:
    _append(metrics_path, record)
  writers.log_scalars(step, scalars)


def _append(path: str, record: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"  # A write cut off by a kill: start a new line.
  with open(path, "a") as f:
    f.write(("\n" if torn else "") + json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def sample_fid_is(sampler: generate.Sampler, params: Any, extractor: inception.FeatureExtractor, *,
                  num: int, seed: int, reference: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[dict[str, float], np.ndarray]:
  """FID and IS of num images drawn in batches of sampler.options.batch_size; also the first batch."""
  batch = sampler.options.batch_size
  stats, score = fid.FeatureStats(), fid.InceptionScore(num)
  first = None
  for chunk, start in enumerate(range(0, num, batch)):
    n = min(batch, num - start)
    labels = (np.arange(start, start + n) % max(sampler.num_classes, 1)).astype(np.int32)
    images, _ = sampler.sample(params, seed=_chunk_seed(seed, chunk), num=n, labels=labels)
    features = extractor(images)
    stats.update(features["pool3"])
    score.update(features["logits_unbiased"])
    first = images if first is None else first
    if chunk % max(1, (num // batch) // 10) == 0:
      logging.info("Sampled %d of %d images.", start + n, num)
  mu, sigma = stats.mu_sigma()
  is_mean, is_std = score.result()
  return {"fid": fid.frechet_distance(mu, sigma, *reference), "inception_score": is_mean,
          "inception_score_std": is_std}, first


def _rows(array: np.ndarray, index) -> np.ndarray:
  return array[index]


def nll(config: ml_collections.ConfigDict, *, params: Any, model, schedule, mesh: jax.sharding.Mesh,
        max_steps: int = 10_000) -> dict[str, Any]:
  """Mean bits/dim of the first config.eval.nll_num images of config.data.split: PF-ODE (Song et al.

  2021; Hutchinson or exact trace per config.eval.nll_hutchinson) from schedule.t_min with the noise
  left there bounded by a Gaussian decoder (evaluation/likelihood.py) and, for discrete-time models, the
  variational bound (Ho et al. 2020) with config.sample.ddpm_variance. Class-conditional models are
  conditioned on the true labels, without guidance. Where the adaptive solver fails to reach t = 1 in
  max_steps steps, nll_ode_bpd is NaN and nll_ode_failed_images counts the images of the failed batches.
  """
  ev = config.eval
  data = run_lib.DatasetImages(config.data)
  num = min(ev.nll_num, len(data))
  num_classes = config.model.num_classes
  divergence = "rademacher" if ev.nll_hutchinson else "exact"
  discrete = schedule.num_timesteps > 0
  batch_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
  params_sharding = jax.tree.map(lambda a: a.sharding, params)  # As they lie (config.mesh.fsdp).

  learned = models.learns_variance(config.model)

  def batch_nll(params, images, labels, rng):
    apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y, train=False)
    make = functools.partial(guidance.make_denoise_fn, apply_fn, schedule=schedule,
                             prediction=config.diffusion.prediction,
                             cond={"label": labels} if num_classes else None, learned=learned)
    denoise_fn = make()
    ode_rng, vlb_rng = jax.random.split(rng)
    bpd, nfe, success = likelihood.ode_bits_per_dim(denoise_fn, images, ode_rng, schedule=schedule,
                                                    divergence=divergence, max_steps=max_steps)
    out = {"ode": bpd, "nfe": jnp.broadcast_to(nfe, bpd.shape), "ode_ok": jnp.broadcast_to(success, bpd.shape)}
    if discrete:
      vlb_fn = make(return_variance=config.sample.ddpm_variance == "learned")
      out["vlb"] = likelihood.vlb_bits_per_dim(vlb_fn, images, vlb_rng, schedule=schedule,
                                               variance=config.sample.ddpm_variance)["bpd"]
    return out

  fn = jax.jit(batch_nll, in_shardings=(params_sharding, batch_sharding, batch_sharding, replicated),
               out_shardings=batch_sharding)
  results = []
  for i, begin in enumerate(range(0, num, ev.batch_size)):
    images, labels = data.read(begin, min(begin + ev.batch_size, num))
    n = len(images)
    pad = ev.batch_size - n
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    labels = np.concatenate([labels, np.repeat(labels[-1:], pad)])
    arrays = [jax.make_array_from_callback(a.shape, batch_sharding, functools.partial(_rows, a))
              for a in (images, labels)]
    out = fn(params, *arrays, jax.random.fold_in(jax.random.key(config.sample.seed), i))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      out = multihost_utils.process_allgather(out, tiled=True)
    results.append(jax.tree.map(lambda a: np.asarray(a)[:n], jax.device_get(out)))
  merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
  sem = lambda a: float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
  failed = int(np.sum(~merged["ode_ok"]))
  if failed:  # The ODE's bpd of those batches is NaN, and so is the mean: no number from the wrong time.
    logging.error("The PF-ODE solver (dopri5) did not reach t = 1 within %d steps on %d of %d images; "
                  "nll_ode_bpd is recorded as NaN.", max_steps, failed, num)
  record = {"nll_ode_bpd": float(merged["ode"].mean()), "nll_ode_bpd_sem": sem(merged["ode"]),
            "nll_ode_nfe": float(merged["nfe"].mean()), "nll_ode_divergence": divergence,
            "nll_ode_solver": f"dopri5 rtol=atol=1e-5 max_steps={max_steps}",
            "nll_ode_failed_images": failed, "nll_ode_t_start": schedule.t_min,
            "nll_ode_start_noise": "bound: x_t0 = alpha0 y + sigma0 e, one e per image, + D log alpha0",
            "nll_images": num}
  if discrete:
    record.update(nll_vlb_bpd=float(merged["vlb"].mean()), nll_vlb_bpd_sem=sem(merged["vlb"]),
                  nll_vlb_variance=config.sample.ddpm_variance)
  return record


def _broadcast_json(value: Any) -> Any:
  """Process 0's value (anything JSON can hold) on every process; the others' value is ignored."""
  source = jax.process_index() == 0
  data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32) if source else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if source else 0)))
  data = multihost_utils.broadcast_one_to_all(data if source else np.zeros(size, np.int32))
  return json.loads(np.asarray(data, np.uint8).tobytes().decode())


def on_process_0(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """fn(*args, **kwargs) computed on process 0 and broadcast, so every process acts on one decision.

  An exception raised there is raised on every process (a FileNotFoundError or ValueError as such).
  """
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # Broadcast first: the other processes wait for the decision.
  result, message = _broadcast_json([result, None if error is None else [type(error).__name__, str(error)]])
  if error is not None:
    raise error
  if message is not None:
    kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(message[0])
    raise kind(message[1]) if kind else RuntimeError(f"On process 0: {message[0]}: {message[1]}")
  return result


def _steps_on_disk(manager: ocp.CheckpointManager) -> list[int]:
  """The checkpoint steps there are now; no barrier, so process 0 may ask alone."""
  manager.reload()
  return sorted(manager.all_steps())


def steps_to_evaluate(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> list[int]:
  """Every checkpoint step, or only step (config.eval.step)."""
  all_steps = _steps_on_disk(manager)
  if not all_steps:
    raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(workdir)}: train first "
                            "(--mode=train) or pass the workdir of a trained run.")
  if step is not None and step not in all_steps:
    raise ValueError(f"config.eval.step={step} is not a checkpoint of {workdir}; there are {all_steps}.")
  return all_steps if step is None else [step]


def restore(manager: ocp.CheckpointManager, workdir: str, step: int, mesh: jax.sharding.Mesh
            ) -> tuple[Any, ...] | None:
  """load_run's (config, state, model, schedule) and the image shape, or None if step was deleted.

  Whether the step still exists is decided on process 0, before and after a failed restore, so every
  process skips it or none does.
  """
  if step not in on_process_0(_steps_on_disk, manager):
    logging.warning("Checkpoint %d of %s was deleted (training's max_to_keep?) before its turn; skipped.",
                    step, workdir)
    return None
  try:
    restored = (*run_lib.load_run(workdir, step, mesh=mesh), run_lib.image_shape(workdir, step))
    failure = None
  except Exception as e:  # pylint: disable=broad-except
    restored, failure = None, e  # Possibly a deletion mid-restore; process 0 decides below.
  failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
  if not failed.any():
    return restored
  if step not in on_process_0(_steps_on_disk, manager):
    logging.warning("Checkpoint %d of %s was deleted (training's max_to_keep?) while it was restored; "
                    "skipped.", step, workdir)
    return None
  if failure is not None:
    raise failure
  raise RuntimeError(f"Restoring checkpoint {step} of {workdir} failed on process(es) "
                     f"{np.flatnonzero(failed).tolist()}; see their logs.")


def sampler_inputs(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> tuple[Any, ...]:
  """What the eval sampler of a checkpoint is built from: equal inputs give the same compiled sampler."""
  options = dataclasses.replace(generate.SampleOptions.from_config(config), batch_size=config.eval.batch_size)
  model = json.dumps({"model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
                      "latent": config.latent.to_dict()}, sort_keys=True, default=str)
  return options, model, tuple(image_shape)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Evaluates the checkpoints of workdir not yet evaluated (or config.eval.step); returns the new records."""
  ev = config.eval
  validate_eval(ev, device_count=jax.device_count())
  config_check.validate_mesh(config.mesh, device_count=jax.device_count())
  sample_config = ml_collections.ConfigDict({**config.sample.to_dict(), "batch_size": ev.batch_size})
  config_check.validate_sample(sample_config, device_count=jax.device_count())
  if ev.num_samples < fid.STANDARD_NUM_SAMPLES:
    logging.warning("config.eval.num_samples=%d: FID on fewer than %d samples is biased upwards and not "
                    "comparable to the figures of papers.", ev.num_samples, fid.STANDARD_NUM_SAMPLES)
  manager = checkpoints.create_manager(workdir, read_only=True)  # On every process: Orbax syncs them.
  # Steps and skips are decided on process 0 alone: processes reading the workdir each on their own
  # could see different checkpoints or records while training saves beside eval.
  steps = on_process_0(steps_to_evaluate, manager, workdir, ev.step)
  reference_path = fid.reference_stats_path(config, workdir)
  if not os.path.exists(reference_path):
    raise FileNotFoundError(
        f"No reference statistics at {reference_path} (config.eval.fid_stats_path). Compute them once, "
        f"from every image of config.data.split={config.data.split!r} of {config.data.name!r}:\n"
        f"  python main.py --config=<your config> --workdir={workdir} --mode=fid_stats")
  reference = fid.load_stats(reference_path)
  mesh = train_lib.create_mesh(config.mesh)  # This run's mesh, whatever the checkpoints were trained on.
  extractor = inception.FeatureExtractor(inception.load_variables(ev.inception_path), mesh=mesh,
                                         batch_size=ev.batch_size)
  eval_dir = os.path.join(workdir, "eval")
  metrics_path = os.path.join(eval_dir, "metrics.jsonl")
  done = read_metrics(metrics_path) if jax.process_index() == 0 else []  # Only process 0's counts.
  writer = writers.MetricWriter(eval_dir)
  records = []
  sampler, built_from = None, None
  try:
    for step in steps:
      restored = restore(manager, workdir, step, mesh)
      if restored is None:
        continue
      trained, state, model, schedule, image_shape = restored
      trained = run_lib.with_command_line(trained, config, sections=("sample", "eval", "data"))
      if ev.nll and trained.latent.autoencoder is not None:
        raise ValueError("config.eval.nll=True: the likelihood of a latent diffusion model is that of "
                         "the latents, not of the images, and is not computed; pass "
                         "--config.eval.nll=False for FID and IS of the decoded images.")
      setting = settings(trained, step, schedule, reference_path)
      if on_process_0(evaluated, done, setting):
        logging.info("Checkpoint %d is already evaluated with these settings in %s; skipped.", step,
                     metrics_path)
        continue
      inputs = sampler_inputs(trained, image_shape)
      if inputs != built_from:  # One compiled sampler for checkpoints of the same model and settings.
        built_from = inputs
        sampler = generate.Sampler(model=model, schedule=schedule, options=built_from[0], mesh=mesh,
                                   image_shape=image_shape, num_classes=trained.model.num_classes,
                                   space=spaces.space_for_run(trained, image_shape),
                                   concat_channels=spaces.concat_channels(trained, image_shape))
      start = time.perf_counter()
      metrics, first = sample_fid_is(sampler, state.ema_params, extractor, num=ev.num_samples,
                                     seed=trained.sample.seed, reference=reference)
      metrics["fid_seconds"] = time.perf_counter() - start  # Sampling, Inception and the distance.
      if ev.nll:
        start = time.perf_counter()
        metrics.update(nll(trained, params=state.ema_params, model=model, schedule=schedule, mesh=mesh))
        metrics["nll_seconds"] = time.perf_counter() - start
      record = {**setting, **metrics, "num_devices": jax.device_count(),
                "inception_weights": os.path.abspath(os.path.expanduser(ev.inception_path)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
      tag = f"{setting['sampler']}_{setting['steps']}steps_w{setting['guidance_scale']:g}_n{ev.num_samples}"
      scalars = {f"fid/{tag}": metrics["fid"], f"inception_score/{tag}": metrics["inception_score"]}
      scalars.update({f"{k}/n{metrics['nll_images']}": metrics[k] for k in ("nll_ode_bpd", "nll_vlb_bpd")
                      if k in metrics})
      writer.write_image(step, f"samples/{tag}", writers.image_grid(first[:64]))
      publish(writer, metrics_path, step, record, scalars)
      records.append(record)
  finally:
    writer.close()
    manager.close()
  return records
