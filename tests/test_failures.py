"""Failures end in one clear message: a checkpoint of another config, a damaged checkpoint, a bad workdir."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from evaluation import run as run_lib
from training import checkpoints
from training import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)  # Keys like "model.unet.ch".
  return config


def snapshot(workdir):
  """Every path under workdir with its size and modification time."""
  found = {}
  for directory, _, files in os.walk(workdir):
    found[directory] = None
    for name in files:
      stat = os.stat(os.path.join(directory, name))
      found[os.path.join(directory, name)] = (stat.st_size, stat.st_mtime_ns)
  return found


def final_params(workdir):
  manager = checkpoints.create_manager(workdir, read_only=True)
  target = train_lib.abstract_state(tiny.get_config(), image_shape=(8, 8, 1), mesh=train_lib.create_mesh())
  state, step = checkpoints.restore(manager, target)
  return jax.device_get(state.params), step


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("run4") / "run")
  train_lib.train(tiny_config(**{"training.num_steps": 4}), workdir)
  assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [2, 4]
  return workdir


@pytest.fixture(scope="module")
def resumed_from_2(run4, tmp_path_factory):
  """(final params, step) of run4 resumed from its step-2 checkpoint to step 6, never interrupted."""
  reference = copy_of(run4, tmp_path_factory.mktemp("resumed_from_2"), "reference")
  shutil.rmtree(os.path.join(reference, "checkpoints", "4"))
  train_lib.train(tiny_config(**{"training.num_steps": 6}), reference)
  return final_params(reference)


def copy_of(run4, tmp_path, name="run"):
  workdir = str(tmp_path / name)
  shutil.copytree(run4, workdir)
  return workdir


def largest_file(directory):
  return max((os.path.join(d, f) for d, _, names in os.walk(directory) for f in names), key=os.path.getsize)


def cut(path):
  """What a full disk or a lost node leaves: the file's first bytes only."""
  with open(path, "r+b") as f:
    f.truncate(16)


def test_changed_model_keys_are_listed_and_nothing_is_written(run4, tmp_path):
  workdir = copy_of(run4, tmp_path)
  before = snapshot(workdir)
  config = tiny_config(**{"training.num_steps": 6, "model.unet.ch": 16, "model.unet.num_res_blocks": 2,
                          "optim.grad_clip": 0.0})
  with pytest.raises(checkpoints.CheckpointError) as error:
    train_lib.train(config, workdir)
  message = str(error.value)
  assert "The checkpoint at step 4" in message
  assert "model.unet.ch: saved 8, now 16" in message and "model.unet.num_res_blocks: saved 1, now 2" in message
  assert "optim.grad_clip > 0: saved True, now False" in message
  assert "new --workdir" in message
  assert snapshot(workdir) == before  # Not even config.json.


def test_changed_resumable_keys_resume(run4, tmp_path):
  workdir = copy_of(run4, tmp_path)
  config = tiny_config(**{"training.num_steps": 6, "optim.learning_rate": 1e-4, "model.remat": True,
                          "sample.steps": 7})
  state = train_lib.train(config, workdir)
  assert int(state.step) == 6
  assert checkpoints.create_manager(workdir, read_only=True).latest_step() == 6


def test_state_keys_include_keys_added_later():
  saved = tiny.get_config().to_dict()
  current = tiny.get_config()
  current.diffusion.unlock()
  current.diffusion.model_time_scale = 1000.0  # A key the saved config does not have...
  mismatched, _ = checkpoints.compare_configs(saved, current.to_dict(), saved_image_shape=(8, 8, 1),
                                              image_shape=(8, 8, 3))
  # ...is state-defining (no default to compare with: saved None); and so are the image channels.
  assert mismatched["diffusion.model_time_scale"] == (None, 1000.0)
  assert list(mismatched.values())[-1] == ([8, 8, 1], [8, 8, 3])
  mismatched, changed = checkpoints.compare_configs(saved, saved, saved_image_shape=(8, 8, 1),
                                                    image_shape=(8, 8, 1))
  assert not mismatched and not changed


@pytest.mark.parametrize("which", ["largest_file", "state/_METADATA"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(run4, resumed_from_2, tmp_path,
                                                                               which):
  damaged = copy_of(run4, tmp_path, "damaged")
  step4 = os.path.join(damaged, "checkpoints", "4")
  path = largest_file(step4) if which == "largest_file" else os.path.join(step4, which)
  cut(path)
  size = os.path.getsize(path)
  train_lib.train(tiny_config(**{"training.num_steps": 6}), damaged)
  moved = os.path.join(damaged, "checkpoints", "damaged", "4", os.path.relpath(path, step4))
  assert os.path.getsize(moved) == size  # Kept as it was, beside the checkpoints.
  assert checkpoints.create_manager(damaged, read_only=True).all_steps() == [2, 4, 6]
  a, step_a = resumed_from_2  # The same run, uninterrupted from step 2.
  b, step_b = final_params(damaged)
  assert step_a == step_b == 6
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree.leaves(diffs)) == 0.0


def test_load_run_falls_back_from_a_damaged_latest_but_not_from_a_requested_step(run4, tmp_path):
  workdir = copy_of(run4, tmp_path)
  cut(largest_file(os.path.join(workdir, "checkpoints", "4")))
  with pytest.raises(checkpoints.CheckpointError, match=r"The checkpoint at step 4 .* cannot be read: "
                     r"ValueError: OUT_OF_RANGE"):
    run_lib.load_run(workdir, 4)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # An explicit step is not moved.
  _, state, _, _ = run_lib.load_run(workdir)
  assert int(state.step) == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged", "4"))


def test_no_readable_checkpoint_is_one_error_and_nothing_is_moved(run4, tmp_path):
  workdir = copy_of(run4, tmp_path)
  for step in ("2", "4"):
    cut(largest_file(os.path.join(workdir, "checkpoints", step)))
  before = snapshot(workdir)
  with pytest.raises(checkpoints.CheckpointError, match=r"No checkpoint in .* can be read .*step 4: .*step 2: "):
    train_lib.train(tiny_config(**{"training.num_steps": 6}), workdir)
  assert snapshot(workdir) == before


def test_main_on_a_mismatched_workdir_prints_one_short_message(run4, tmp_path):
  workdir = copy_of(run4, tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.training.num_steps=6", "--config.model.unet.ch=16"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) <= 10, proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert lines[-3] == (f"Error: The checkpoint at step 4 in {workdir}/checkpoints was trained with a "
                       "different config; these keys define its state and must match:")
  assert lines[-2] == "  model.unet.ch: saved 8, now 16"


@pytest.mark.parametrize("make", ["file", "under_a_file", "not_writable"])
def test_bad_workdir_is_named_before_anything_compiles(tmp_path, monkeypatch, make):
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
  (tmp_path / "file").write_text("not a directory")
  workdir = {"file": tmp_path / "file", "under_a_file": tmp_path / "file" / "run",
             "not_writable": tmp_path / "locked" / "run"}[make]
  if make == "not_writable":
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("locked") else real_access(p, mode))
  expected = {"file": rf"{tmp_path}/file exists and is not a directory",
              "under_a_file": rf"cannot be created: {tmp_path}/file is a file",
              "not_writable": rf"cannot be created: {tmp_path}/locked is not writable"}[make]
  with pytest.raises(OSError, match=expected):
    train_lib.train(tiny_config(), str(workdir))
  assert not compiled


def test_data_position_restores_on_another_number_of_processes(tmp_path, monkeypatch):
  class Iterator:
    def __init__(self, step):
      self.state = {"step": step}

    def get_state(self):
      return dict(self.state)

    def set_state(self, state):
      self.state = dict(state)

  handler = checkpoints.DataIteratorHandler()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for i in range(2):  # What each process of a 2-process run writes at global step 7.
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    handler.save(tmp_path, checkpoints.DataIteratorSave(Iterator(7)))
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["process_0-of-2.json", "process_1-of-2.json"]
  restored = handler.restore(tmp_path, checkpoints.DataIteratorRestore(Iterator(0)))
  assert jax.process_count() == 1 and restored.get_state() == {"step": 7}
  (tmp_path / "process_1-of-2.json").write_text('{"step": 6}')
  with pytest.raises(ValueError, match="differ between processes"):
    handler.restore(tmp_path, checkpoints.DataIteratorRestore(Iterator(0)))
