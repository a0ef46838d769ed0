"""FID, IS and --mode=eval / --mode=fid_stats: the maths against direct computations, and end to end on a
tiny run with a randomly initialised Inception file (the real code path, fake weights)."""

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from scipy import linalg

from configs import tiny
from evaluation import evaluate as evaluate_lib
from evaluation import fid
from evaluation import inception
from evaluation import run as run_lib
from input_pipeline import sources
from training import generate
from training import train as train_lib


def random_stats(rng, d, n=None):
  n = n or 3 * d
  features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_by_eigenvalues(mu1, s1, mu2, s2):
  """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): a symmetric route, independent of sqrtm(S1 S2)."""
  w, v = linalg.eigh(s1)
  root1 = (v * np.sqrt(np.maximum(w, 0))) @ v.T
  inner = linalg.eigvalsh(root1 @ s2 @ root1)
  trace_sqrt = np.sum(np.sqrt(np.maximum(inner, 0)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_frechet_distance_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  a, b = random_stats(rng, 64), random_stats(rng, 64)
  ours = fid.frechet_distance(*a, *b)
  np.testing.assert_allclose(ours, frechet_by_eigenvalues(*a, *b), rtol=1e-6)
  # pytorch-fid's formula, written out: |d|^2 + Tr S1 + Tr S2 - 2 Tr sqrtm(S1 S2).
  covmean = linalg.sqrtm(a[1] @ b[1]).real
  direct = np.sum((a[0] - b[0]) ** 2) + np.trace(a[1]) + np.trace(b[1]) - 2 * np.trace(covmean)
  np.testing.assert_allclose(ours, direct, rtol=1e-6)
  # Diagonal covariances: |d|^2 + sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
  np.testing.assert_allclose(fid.frechet_distance(np.zeros(8), np.diag(s1), np.ones(8), np.diag(s2)),
                             8 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rtol=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(200, 32)) @ rng.normal(size=(32, 32))
  mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  other = rng.normal(size=(200, 32)) @ rng.normal(size=(32, 32))
  assert fid.frechet_distance(mu, sigma, other.mean(axis=0), np.cov(other, rowvar=False)) > 1.0


def test_frechet_distance_of_rank_deficient_statistics_is_finite():
  rng = np.random.default_rng(2)
  a, b = random_stats(rng, 64, n=16), random_stats(rng, 64, n=16)  # Fewer samples than dimensions.
  value = fid.frechet_distance(*a, *b)
  assert np.isfinite(value)
  np.testing.assert_allclose(value, frechet_by_eigenvalues(*a, *b), rtol=1e-3)


def test_running_statistics_equal_numpy():
  rng = np.random.default_rng(3)
  features = 100.0 + rng.normal(size=(1000, 16)).astype(np.float32)  # A large mean: no cancellation.
  stats = fid.FeatureStats()
  for start in range(0, 1000, 96):
    stats.update(features[start:start + 96])
  mu, sigma = stats.mu_sigma()
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), atol=1e-10)


def test_inception_score_matches_the_improved_gan_formula():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(103, inception.NUM_LOGITS)) * 3
  score = fid.InceptionScore(103, splits=10)
  for start in range(0, 103, 16):  # Batches straddle the splits.
    score.update(logits[start:start + 16])
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  splits = []
  for i in range(10):
    part = p[i * 103 // 10:(i + 1) * 103 // 10]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    splits.append(np.exp(np.mean(np.sum(kl, axis=1))))
  np.testing.assert_allclose(score.result(), (np.mean(splits), np.std(splits)), rtol=1e-10)


def test_inception_score_refuses_fewer_images_than_splits():
  with pytest.raises(ValueError, match="needs at least 10 images, got 9"):
    fid.InceptionScore(9)  # Else an empty split and a NaN score.
  config = tiny.get_config()
  config.eval.batch_size = 8
  config.eval.num_samples = 9
  with pytest.raises(ValueError, match=r"config\.eval\.num_samples=9 must be an integer >= 10"):
    evaluate_lib.validate_eval(config.eval, device_count=8)
  config.eval.num_samples = 10
  evaluate_lib.validate_eval(config.eval, device_count=8)


def test_state_dict_conversion_inverts_the_torch_layout():
  variables = inception.random_variables(seed=1)
  torch_names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  state_dict = {}
  for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
    collection, *module, leaf = [p.key for p in path]
    name = ".".join(module)
    if leaf == "kernel" and module[-1] == "conv":
      state_dict[f"{name}.weight"] = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel":
      state_dict[f"{name}.weight"] = value.T
    else:
      state_dict[f"{name}.{torch_names[leaf]}"] = value
    if leaf == "var":
      state_dict[f"{name}.num_batches_tracked"] = np.array(0)
  converted = inception.convert_state_dict(state_dict)
  jax.tree.map(np.testing.assert_array_equal, converted, variables)
  state_dict["Mixed_5b.branch1x1.conv.weight"] = state_dict["Mixed_5b.branch1x1.conv.weight"][:3]
  with pytest.raises(ValueError, match="Mixed_5b/branch1x1/conv/kernel has shape"):
    inception.convert_state_dict(state_dict)


def test_missing_inception_file_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inception.load_variables(str(tmp_path / "none.npz"))
  message = str(e.value)
  assert "config.eval.inception_path" in message and inception.FID_WEIGHTS_URL in message
  assert "python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth" in message


# ----------------------------------------------------------------------------------------------------
# End to end on a tiny run.


class FewDigits(sources.DigitsSource):
  def __len__(self):
    return 20


def open_few_digits(*, split, data_dir, image_size):
  info = sources.open_digits(split=split, data_dir=data_dir, image_size=image_size)
  return dataclasses.replace(info, source=FewDigits(image_size))


class PixelFeatures:
  """Stands in for inception.FeatureExtractor where Inception is not under test.

  The pixels are the features (so 8 x 8 images need reference statistics of dimension 64) and, repeated,
  the logits.
  """

  def __init__(self, variables, *, mesh, batch_size):
    del variables, mesh
    self.batch_size = batch_size

  def __call__(self, images):
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    logits = np.tile(pixels, (1, inception.NUM_LOGITS // pixels.shape[1] + 1))[:, :inception.NUM_LOGITS]
    return {"pool3": pixels, "logits_unbiased": logits}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4, a random Inception file and an eval config."""
  patch = pytest.MonkeyPatch()
  patch.setitem(sources.SOURCES, "few_digits", open_few_digits)
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.mesh.fsdp_min_size = 64  # Saved with the checkpoints: on an fsdp mesh the tiny weights split.
  train_lib.train(config, workdir)
  inception_path = str(tmp_path_factory.mktemp("weights") / "random_inception.npz")
  inception.save_variables(inception_path, inception.random_variables(seed=0))
  config.data.name = "few_digits"  # 20 reference images, so reading them all is quick.
  config.eval.inception_path = inception_path
  config.eval.num_samples = 16
  config.eval.batch_size = 8
  config.eval.nll = True
  config.eval.nll_num = 8
  yield workdir, config
  patch.undo()


def test_reference_stats_of_every_image(run):
  workdir, config = run
  path = fid.compute_reference_stats(config, workdir)
  assert path == os.path.join(workdir, "eval", "fid_stats_few_digits_train_8.npz")
  with np.load(path) as f:
    assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["num"]) == 20
    mu, sigma = f["mu"], f["sigma"]
  images, _ = run_lib.DatasetImages(config.data).read(0, 20)
  assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  features = inception.FeatureExtractor(inception.load_variables(config.eval.inception_path), mesh=mesh,
                                        batch_size=8)(images)["pool3"].astype(np.float64)
  np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)


def test_eval_writes_metrics_and_skips_what_is_done(run, caplog, monkeypatch):
  workdir, config = run
  path = fid.compute_reference_stats(config, workdir)
  config = config.copy_and_resolve_references()
  config.mesh.update(data=2, fsdp=4)  # Evaluated on the mesh of config.mesh, the weights split on fsdp.
  seen = []
  sample_fid_is = evaluate_lib.sample_fid_is
  monkeypatch.setattr(evaluate_lib, "sample_fid_is", lambda sampler, params, *a, **k: (
      seen.append(params), sample_fid_is(sampler, params, *a, **k))[1])
  with pytest.raises(ValueError, match=r"config\.eval\.step=3 is not a checkpoint"):
    evaluate_lib.evaluate(_with(config, step=3), workdir)
  # An earlier run finished step 2 and was interrupted (its record is in metrics.jsonl): only 4 is left.
  metrics_path = os.path.join(workdir, "eval", "metrics.jsonl")
  schedule = train_lib.create_schedule(config.diffusion)
  with open(metrics_path, "a") as f:
    f.write(json.dumps({**evaluate_lib.settings(config, 2, schedule, path), "fid": 1.0}) + "\n")
    f.write('{"step": 4, "torn')  # A line cut off by a kill mid-write.

  caplog.set_level(logging.WARNING)
  records = evaluate_lib.evaluate(config, workdir)
  assert any("fewer than 50000 samples" in r.getMessage() for r in caplog.records)
  assert [r["step"] for r in records] == [4]
  assert evaluate_lib.evaluate(config, workdir) == []  # Nothing left to do.
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(seen[0])]
  assert dict(seen[0]["conv_in"]["kernel"].sharding.mesh.shape) == {"data": 2, "fsdp": 4}
  assert sum("fsdp" in spec for spec in specs) >= 3  # The large kernels, as sharding.fsdp_dim says.

  written = evaluate_lib.read_metrics(metrics_path)
  assert [r["step"] for r in written] == [2, 4]
  r = written[1]
  assert r["num_samples"] == 16 and r["batch_size"] == 8 and r["sampler"] == "ddim" and r["steps"] == 4
  assert r["grid"] == "trailing"
  assert r["eta"] == 0.0 and r["guidance_scale"] == 1.0 and r["seed"] == 0
  assert np.isfinite(r["fid"]) and r["fid"] > 0
  assert 1.0 <= r["inception_score"] <= inception.NUM_LOGITS
  assert r["nll_images"] == 8 and r["nll_ode_divergence"] == "rademacher"
  assert 0 < r["nll_ode_bpd"] < 100 and 0 < r["nll_vlb_bpd"] < 100 and r["nll_ode_nfe"] > 10
  steps, values = run_lib.read_scalars(os.path.join(workdir, "eval"), "fid/ddim_4steps_w1_n16")
  assert list(steps) == [4] and np.isclose(values[0], r["fid"], rtol=1e-6)  # TensorBoard names N, sampler, steps.

  # Figures are reused only for the same settings (a run that also computed NLL covers one without).
  assert evaluate_lib.evaluated(written, evaluate_lib.settings(config, 4, schedule, path))
  assert evaluate_lib.evaluated(written, evaluate_lib.settings(_with(config, nll=False), 4, schedule, path))
  for other in (_with(config, sampler="dpmpp_2m"), _with(config, num_samples=32), _with(config, nll_num=4),
                _with(config, batch_size=16)):  # The chunks' seeds, and so the images, depend on it.
    assert not evaluate_lib.evaluated(written, evaluate_lib.settings(other, 4, schedule, path))


def test_eval_without_reference_stats_says_how_to_make_them(run, tmp_path):
  workdir, config = run
  config = _with(config, fid_stats_path=str(tmp_path / "missing.npz"))
  with pytest.raises(FileNotFoundError, match="--mode=fid_stats"):
    evaluate_lib.evaluate(config, workdir)


def test_eval_beside_training_skips_deleted_checkpoints(run, tmp_path, monkeypatch, caplog):
  """Training's max_to_keep deletes checkpoints while eval runs: those are skipped, the others evaluated."""
  workdir, config = run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  checkpoint_dir = os.path.join(copy, "checkpoints")
  for step in (6, 8):
    shutil.copytree(os.path.join(checkpoint_dir, "4"), os.path.join(checkpoint_dir, str(step)))
  stats_path = str(tmp_path / "stats.npz")
  fid.save_stats(stats_path, np.zeros(64), np.eye(64))
  config = _with(config, nll=False, num_samples=10, fid_stats_path=stats_path)
  monkeypatch.setattr(inception, "load_variables", lambda path: None)
  monkeypatch.setattr(inception, "FeatureExtractor", PixelFeatures)

  load_run = run_lib.load_run
  def load_run_beside_training(workdir, step=None, **kwargs):
    if step == 2:  # Deleted while it is restored.
      shutil.rmtree(os.path.join(checkpoint_dir, "2"))
    restored = load_run(workdir, step, **kwargs)
    if step == 4:  # Deleted while 4 is evaluated, after the steps were listed.
      shutil.rmtree(os.path.join(checkpoint_dir, "6"))
    return restored

  built = []
  class CountedSampler(generate.Sampler):
    def __init__(self, **kwargs):
      built.append(kwargs["image_shape"])
      super().__init__(**kwargs)

  monkeypatch.setattr(run_lib, "load_run", load_run_beside_training)
  monkeypatch.setattr(generate, "Sampler", CountedSampler)
  caplog.set_level(logging.WARNING)
  records = evaluate_lib.evaluate(config, copy)
  assert [r["step"] for r in records] == [4, 8]
  assert [r["step"] for r in evaluate_lib.read_metrics(os.path.join(copy, "eval", "metrics.jsonl"))] == [4, 8]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("Checkpoint 2 " in w and "while it was restored" in w for w in warnings), warnings
  assert any("Checkpoint 6 " in w and "before its turn" in w for w in warnings), warnings
  assert built == [(8, 8, 1)]  # One sampler for both checkpoints: they share model and settings.
  assert records[0]["fid"] == records[1]["fid"]  # 8 is a copy of 4: the same images from the same seeds.


def test_eval_sampler_inputs_change_only_with_the_model_or_settings():
  config = tiny.get_config()
  config.eval.batch_size = 16
  inputs = evaluate_lib.sampler_inputs(config, (8, 8, 1))
  assert inputs[0].batch_size == 16 and inputs[0].steps == 4
  same = config.copy_and_resolve_references()
  same.training.num_steps = 100  # Not part of what samples.
  assert evaluate_lib.sampler_inputs(same, (8, 8, 1)) == inputs
  for key, value in (("model.unet.ch", 16), ("diffusion.prediction", "v"), ("sample.steps", 8)):
    other = config.copy_and_resolve_references()
    other.update_from_flattened_dict({key: value})
    assert evaluate_lib.sampler_inputs(other, (8, 8, 1)) != inputs, key
  assert evaluate_lib.sampler_inputs(config, (16, 16, 1)) != inputs


def test_load_run_restores_the_latest_checkpoint(run):
  workdir, _ = run
  config, state, model, schedule = run_lib.load_run(workdir)
  assert int(state.step) == 4 and config.data.name == "digits" and schedule.num_timesteps == 1000
  assert run_lib.image_shape(workdir) == (8, 8, 1)
  per_module = run_lib.params_per_module(state.ema_params)
  assert len(per_module) > 5 and sum(per_module.values()) == run_lib.models.count_params(state.ema_params)
  steps, losses = run_lib.read_scalars(os.path.join(workdir, "train"), "loss")
  assert list(steps) == [2, 4] and np.all(np.isfinite(losses))


def _with(config, *, sampler=None, **eval_overrides):
  config = config.copy_and_resolve_references()
  for key, value in eval_overrides.items():
    config.eval[key] = value
  if sampler:
    config.sample.sampler = sampler
  return config
