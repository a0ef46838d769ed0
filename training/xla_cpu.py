"""XLA:CPU settings from `config.cpu`, applied before JAX starts its backends.

They touch only JAX's CPU backend (on a GPU or TPU host they change nothing the model runs on, and the
convolution flag is not set there), and a setting the user already made through XLA_FLAGS or
JAX_NUM_CPU_DEVICES wins over the config. Should a later jaxlib drop the flag, XLA stops at start-up
with "Unknown flag in XLA_FLAGS"; --config.cpu.ynn_convolutions=True leaves it out.

Measured with bench/train.py --cpu_settings on a 2-core AMD EPYC (cifar10 config, fp32, alternating with
the PyTorch peer; bench/results/cpu-2026-11-27*.json):
- Convolutions through Eigen instead of YNNPACK, XLA:CPU's default for them: at batch 32, 5.82 -> 5.11 s
  per step (ours / PyTorch eager 0.64 -> 0.74); at batch 8, 1.31 -> 1.16 s. YNNPACK's weight-gradient
  convolutions run at half the speed of Eigen's (16x16, 256 -> 256: 48 against 24 ms). Its matmul,
  elementwise and reduction fusions stay on: turning all of YNNPACK off made the step slower.
- One device per core (devices=0), each with its share of the batch, was within 5% of one device whose
  ops use both cores, either way in two runs (bench/results/cpu-2026-11-27-per-core.json: 4.52 against
  4.73 s), and took 18% more memory; so the default is one device.
"""

import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

# Removes convolutions from the ops XLA:CPU hands to YNNPACK (its dots and fusions stay there).
EIGEN_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MAX_AUTO_DEVICES = 8


def auto_device_count(*, batch_sizes: Sequence[int], cores: int, num_processes: int = 1) -> int:
  """The largest d <= min(cores, 8) such that every batch size splits over num_processes * d devices."""
  per_process = [b // num_processes for b in batch_sizes if b > 0 and b % num_processes == 0]
  if not per_process:
    return 1
  common = math.gcd(*per_process)
  return max(d for d in range(1, min(cores, MAX_AUTO_DEVICES) + 1) if common % d == 0)


def cpu_is_default_backend() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS starts with cpu, or no GPU/TPU plugin is installed.

  The convolution flag is only added then: a GPU or TPU host never runs the model on the CPU, and would
  otherwise depend on a flag of XLA:CPU that a later jaxlib might not know.
  """
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return (not plugins and importlib.util.find_spec("jax_plugins") is None
          and importlib.util.find_spec("libtpu") is None)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def validate(cpu: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad key of config.cpu."""
  if not isinstance(cpu.devices, int) or isinstance(cpu.devices, bool) or cpu.devices < 0:
    raise ValueError(f"config.cpu.devices={cpu.devices!r}: expected an int >= 0 (0 = one device per "
                     "core, as many as the batch sizes allow).")
  if not isinstance(cpu.ynn_convolutions, bool):
    raise ValueError(f"config.cpu.ynn_convolutions={cpu.ynn_convolutions!r} is not one of False, True.")


def configure(cpu: ml_collections.ConfigDict, *, batch_sizes: Sequence[int],
              num_processes: int = 1) -> dict[str, object]:
  """Applies config.cpu (devices, ynn_convolutions) to this process; returns what it set.

  Must run before the first JAX computation: XLA reads its flags once, when the CPU backend starts.
  """
  validate(cpu)
  if _backends_started():
    logging.warning("JAX's backends already started: config.cpu is not applied.")
    return {}
  applied: dict[str, object] = {}
  flags = os.environ.get("XLA_FLAGS", "")
  if (not cpu.ynn_convolutions and "xla_cpu_experimental_ynn_fusion_type" not in flags
      and cpu_is_default_backend()):
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
    applied["xla_flags"] = EIGEN_CONVOLUTIONS_FLAG
  user_set = ("xla_force_host_platform_device_count" in flags or "JAX_NUM_CPU_DEVICES" in os.environ
              or jax.config.jax_num_cpu_devices != -1)
  if not user_set:
    devices = cpu.devices or auto_device_count(batch_sizes=batch_sizes, cores=os.cpu_count() or 1,
                                               num_processes=num_processes)
    jax.config.update("jax_num_cpu_devices", devices)
    applied["num_cpu_devices"] = devices
  return applied


def configure_from_config(config: ml_collections.ConfigDict, *, num_processes: int = 1) -> dict[str, object]:
  """configure() with the batch sizes of every mode: training, sampling and evaluation."""
  sizes = [config.training.batch_size, config.sample.batch_size, config.eval.batch_size]
  return configure(config.cpu, batch_sizes=[b for b in sizes if isinstance(b, int)],
                   num_processes=num_processes)
