"""jax.distributed set-up for multi-host runs: SLURM and Cloud TPU auto-detected, else explicit."""

from __future__ import annotations

import os

import jax
from absl import logging


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # A Cloud TPU pod slice (several hosts).


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Initialises jax.distributed when running on several processes; a no-op for one process.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) win; otherwise
  SLURM and Cloud TPU pods are detected by jax itself.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id "
                       "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID).")
    if num_processes == 1:
      return
    # Collectives between CPU devices of different processes (accelerators bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local and %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def quiet_other_processes() -> None:
  """Logs only warnings and errors on processes other than 0, so a job's output reads like one process's.

  Applies at absl's default verbosity (INFO); a --verbosity of debug or warning is left as set.
  """
  if (jax.distributed.is_initialized() and jax.process_index() != 0
      and logging.get_verbosity() == logging.INFO):
    logging.set_verbosity(logging.WARNING)
