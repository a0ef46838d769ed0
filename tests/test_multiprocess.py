"""Two processes on localhost (CPU devices, gloo collectives), the state fully sharded across both, train
like one data-parallel process."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import tiny
from training import checkpoints
from training import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--config.training.num_steps=3", "--config.training.checkpoint_every=3",
         "--config.training.log_every=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                           *STEPS, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _params(workdir):
  config = tiny.get_config()
  manager = checkpoints.create_manager(workdir, read_only=True)
  target = train_lib.abstract_state(config, image_shape=(8, 8, 1), mesh=train_lib.create_mesh())
  state, step = checkpoints.restore(manager, target)
  assert step == 3
  return jax.device_get(state.params)


def test_two_process_run_matches_one_process_run(tmp_path):
  port = _free_port()
  # data 1 x fsdp 4: every large weight, its EMA and Adam moments split over the 4 devices of both
  # processes (jax.make_mesh keeps each process's devices together, so with fsdp 2 the halves of a
  # weight would stay in one process); the batch still splits over all 4.
  fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=1024"]
  two = [_launch(tmp_path / "two", 2, [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                      f"--process_id={i}", *fsdp]) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in two]
  for i, (p, out) in enumerate(zip(two, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  assert "Mesh: data 1 x fsdp 4." in outs[0]
  one = _launch(tmp_path / "one", 4)
  out = one.communicate(timeout=600)[0]
  assert one.returncode == 0, out[-4000:]
  # A process's 2 devices hold less than the whole state, which one data-parallel device holds: the
  # weights are split across the processes (the figure is the same on every process; 0 logs it).
  state_bytes = lambda log: int(re.search(r"Train state: .* \((\d+) bytes\) per device", log).group(1))
  assert 2 * state_bytes(outs[0]) < state_bytes(out)
  # Only process 0 writes event files; each process saved its own data-iterator position.
  assert len(os.listdir(tmp_path / "two" / "train")) == 1
  data_dir = tmp_path / "two" / "checkpoints" / "3" / "data"
  assert sorted(os.listdir(data_dir))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]
  a, b = _params(str(tmp_path / "two")), _params(str(tmp_path / "one"))
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree.leaves(diffs)) < 1e-5
