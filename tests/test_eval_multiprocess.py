"""--mode=eval on two processes (localhost, CPU devices, gloo) evaluates the steps process 0 chose.

Each process is given a different view of metrics.jsonl, as when a record is appended between their
reads; they must still evaluate the same checkpoints (else collectives mix parameters or hang). Pixels
stand in for the Inception features, which are not what is tested here (tests/test_eval.py runs them).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import tiny
from evaluation import evaluate
from evaluation import fid
from evaluation import inception
from tests.test_eval import PixelFeatures
from training import distributed
from training import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_config(stats_path):
  config = tiny.get_config()
  config.eval.fid_stats_path = stats_path
  config.eval.num_samples = 10
  config.eval.batch_size = 8
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_processes_evaluate_the_steps_process_0_chose(tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train(tiny.get_config(), workdir)  # Checkpoints at steps 2 and 4.
  stats_path = str(tmp_path / "stats.npz")
  fid.save_stats(stats_path, np.zeros(64), np.eye(64))  # The 8 x 8 pixels are the features.
  config = _eval_config(stats_path)
  metrics_path = os.path.join(workdir, "eval", "metrics.jsonl")
  os.makedirs(os.path.dirname(metrics_path))
  with open(metrics_path, "w") as f:  # Step 4 is done: process 0 evaluates step 2 only.
    schedule = train_lib.create_schedule(config.diffusion)
    f.write(json.dumps({**evaluate.settings(config, 4, schedule, stats_path), "fid": 1.0}) + "\n")

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT)
  processes = [subprocess.Popen([sys.executable, __file__, workdir, str(port), str(i), stats_path], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  evaluated = []
  for i, (p, out) in enumerate(zip(processes, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    evaluated.append(json.loads(out.split("EVALUATED ")[-1].splitlines()[0]))
  assert evaluated == [[2], [2]]  # Process 1 alone would have chosen step 4.
  assert [r["step"] for r in evaluate.read_metrics(metrics_path)] == [4, 2]


def _main(workdir, port, process_id, stats_path):
  """One process of the test: process 1 reads a metrics.jsonl in which step 2, not 4, is done."""
  distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                         process_id=int(process_id))
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jax-compilation-cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  inception.load_variables = lambda path: None
  inception.FeatureExtractor = PixelFeatures
  config = _eval_config(stats_path)
  if jax.process_index() == 1:
    schedule = train_lib.create_schedule(config.diffusion)
    done = [{**evaluate.settings(config, 2, schedule, stats_path), "fid": 1.0}]
    evaluate.read_metrics = lambda path: done
  records = evaluate.evaluate(config, workdir)
  print("EVALUATED", json.dumps([r["step"] for r in records]), flush=True)


if __name__ == "__main__":
  _main(*sys.argv[1:])
