"""scripts/slurm.sbatch on a throw-away single-node Slurm: two processes, preemption, requeue, resume.

The job's two tasks are signalled once they are up (job A: after the parameters are initialised; job B:
after it restored A's checkpoint) and before their first train step has run, so the step they stop at
never depends on how fast this machine is.
"""

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging

from configs import tiny
from tests import local_slurm
from training import checkpoints
from training import distributed
from training import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10  # Both signals come before a first step, so the run stops at step 1 or 2 of it.
OVERRIDES = [f"--config.training.num_steps={NUM_STEPS}", f"--config.training.checkpoint_every={NUM_STEPS}",
             "--config.training.log_every=1"]
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
# One CPU device per process (the conftest's 8 forced devices are for the in-process tests).
JOB_ENV = {"PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
TIMEOUT = 600  # Seconds for any one phase; a cold compilation cache on two busy cores takes minutes.


def _skip_reason() -> str | None:
  missing = local_slurm.missing_programs()
  if missing:
    return (f"Slurm and munge are not installed (missing {', '.join(missing)}); as root: "
            "apt-get install slurm-wlm munge, which .ci/run does.")
  if os.geteuid() != 0:
    return "The throw-away slurmd must run as root to launch jobs."
  return None


def _read(path: str) -> str:
  if not os.path.exists(path):
    return ""
  with open(path, errors="replace") as f:
    return f.read()


def _wait_for_line(slurm, job_id: int, path: str, pattern: str) -> re.Match:
  """Polls the job's output file until pattern matches; fails early if the job ends first."""
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    match = re.search(pattern, _read(path))
    if match:
      return match
    state = slurm.job(job_id).get("JobState")
    if state in FINISHED:
      pytest.fail(f"Job {job_id} is {state} before printing {pattern!r}:\n{_read(path)[-6000:]}")
    time.sleep(0.05)
  pytest.fail(f"No {pattern!r} from job {job_id} in {TIMEOUT} s:\n{_read(path)[-6000:]}")


def _scalar_steps(text: str) -> list[int]:
  return [int(s) for s in re.findall(r"\] step (\d+): loss=", text)]


def _preempted_steps(text: str) -> list[int]:
  return [int(s) for s in re.findall(r"Preempted at step (\d+): checkpoint saved", text)]


def _params(workdir: str):
  config = tiny.get_config()
  manager = checkpoints.create_manager(workdir, read_only=True)
  target = train_lib.abstract_state(config, image_shape=(8, 8, 1), mesh=train_lib.create_mesh())
  state, step = checkpoints.restore(manager, target)
  assert step == NUM_STEPS
  return jax.device_get(state.params)


def _checkpoint_steps(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_sbatch_trains_on_two_processes_survives_preemption_and_requeue(tmp_path):
  workdir = str(tmp_path / "run")
  job = [*CPU_JOB, f"--output={tmp_path}/job-%j.out", "scripts/slurm.sbatch", "configs/tiny.py",
         workdir, *OVERRIDES]
  with local_slurm.LocalSlurm(str(tmp_path / "slurm"), cpus=2) as slurm:
    # Job A: SIGTERM to both tasks (scancel -s TERM, as a time limit's warning does) once they run.
    a = slurm.sbatch(job, cwd=ROOT, env=JOB_ENV)
    out_a = str(tmp_path / f"job-{a}.out")
    _wait_for_line(slurm, a, out_a, r"Initialised [\d,]+ parameters")
    slurm.scancel("--signal=TERM", str(a))
    fields = slurm.wait_for(a, FINISHED, TIMEOUT)
    text = _read(out_a)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:]
    assert "process 0 of 2, 1 local and 2 global devices" in text
    assert "process 1 of 2, 1 local and 2 global devices" in text
    assert "process 0 of 2 reads 8 per batch of 16" in text  # One global batch of 16, half each.
    preempted = _preempted_steps(text)
    assert len(preempted) == 2 and preempted[0] == preempted[1], text[-6000:]
    p = preempted[0]
    assert 0 < p < NUM_STEPS
    # Only process 0 logs below WARNING: each step's scalar line appears once.
    assert _scalar_steps(text) == list(range(1, p + 1)), text[-6000:]
    assert _checkpoint_steps(workdir) == [p]
    data = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(p), "data")))
    assert [f for f in data if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
    assert len(os.listdir(os.path.join(workdir, "train"))) == 1  # One event file: process 0's.

    # Job B, the same command: resumes from p; `scontrol requeue` stops it (SIGTERM, then it waits
    # KillWait) and puts it back in the queue, and its second run resumes and finishes.
    b = slurm.sbatch(job, cwd=ROOT, env=JOB_ENV)
    out_b = str(tmp_path / f"job-{b}.out")
    _wait_for_line(slurm, b, out_b, rf"Resumed from the checkpoint at step {p} ")
    slurm.scontrol("requeue", str(b))
    fields = slurm.wait_for(b, ("PENDING", *FINISHED), TIMEOUT)
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "1", (fields, _read(out_b))
    slurm.scontrol("update", f"JobId={b}", "StartTime=now")  # Slurm holds a requeued job for 2 min.
    fields = slurm.wait_for(b, FINISHED, TIMEOUT)
    text = _read(out_b)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:]
    assert "(restart 0)" in text and "(restart 1)" in text  # --open-mode=append kept the first run.
    preempted = _preempted_steps(text)
    assert len(preempted) == 2 and preempted[0] == preempted[1], text[-6000:]
    q = preempted[0]
    assert p < q < NUM_STEPS
    assert f"Resumed from the checkpoint at step {q} " in text
    assert _scalar_steps(text) == list(range(p + 1, NUM_STEPS + 1)), text[-6000:]
    assert _checkpoint_steps(workdir) == [p, q, NUM_STEPS]
    assert len(os.listdir(os.path.join(workdir, "train"))) == 3  # A, B and B's restart: process 0.

  # The same run in one process with the same two devices, uninterrupted.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  reference = str(tmp_path / "reference")
  one = subprocess.run([sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={reference}",
                        *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                       check=False)
  assert one.returncode == 0, one.stderr[-6000:]
  a, b = _params(workdir), _params(reference)
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree.leaves(diffs)) < 1e-5
  print(f"Slurm job: preempted at step {p} by scancel -s TERM, at step {q} by scontrol requeue.")


@pytest.mark.parametrize("process_index,expected", [(0, logging.INFO), (1, logging.WARNING)])
def test_only_process_0_logs_info(monkeypatch, process_index, expected):
  before = logging.get_verbosity()
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: process_index)
  try:
    logging.set_verbosity(logging.INFO)
    distributed.quiet_other_processes()
    assert logging.get_verbosity() == expected
    logging.set_verbosity(logging.DEBUG)  # An explicit --verbosity=1 stays on every process.
    distributed.quiet_other_processes()
    assert logging.get_verbosity() == logging.DEBUG
  finally:
    logging.set_verbosity(before)
