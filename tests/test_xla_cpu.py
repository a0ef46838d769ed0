"""config.cpu: the device split and the convolution flag reach XLA, and the user's own settings win.

Each case runs in a fresh process, since XLA reads its flags once, when the CPU backend starts (this
test process has started it already, with conftest's eight devices).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # pylint: disable=g-import-not-at-top
from training import xla_cpu  # pylint: disable=g-import-not-at-top

PROBE = """
import json, os, sys
import jax, jax.numpy as jnp, ml_collections
from training import xla_cpu
cpu = ml_collections.ConfigDict(json.loads(sys.argv[1]))
applied = xla_cpu.configure(cpu, batch_sizes=json.loads(sys.argv[2]))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
out = jax.jit(conv)(jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16)))  # XLA accepts the flags.
again = xla_cpu.configure(cpu, batch_sizes=[2])  # Backends started: nothing more is applied.
print(json.dumps({"applied": applied, "again": again, "devices": jax.device_count(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "sum": float(out.sum())}))
"""


def _probe(cpu: dict, batch_sizes: list[int], **env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env_overrides)
  proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cpu), json.dumps(batch_sizes)],
                        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_device_count_divides_every_batch():
  assert xla_cpu.auto_device_count(batch_sizes=[128, 64, 256], cores=2) == 2
  assert xla_cpu.auto_device_count(batch_sizes=[64, 100], cores=16) == 4  # gcd 4.
  assert xla_cpu.auto_device_count(batch_sizes=[96], cores=16) == 8  # At most 8.
  assert xla_cpu.auto_device_count(batch_sizes=[30], cores=4) == 3
  assert xla_cpu.auto_device_count(batch_sizes=[7], cores=2) == 1
  assert xla_cpu.auto_device_count(batch_sizes=[64], cores=4, num_processes=2) == 4  # 32 per process.
  assert xla_cpu.auto_device_count(batch_sizes=[], cores=4) == 1


def test_default_config_has_the_measured_defaults():
  cpu = default.get_config().cpu
  assert cpu.devices == 1 and cpu.ynn_convolutions is False
  xla_cpu.validate(cpu)
  cpu.devices = -2
  with pytest.raises(ValueError, match=r"config\.cpu\.devices=-2"):
    xla_cpu.validate(cpu)


def test_defaults_split_the_host_and_send_convolutions_to_eigen():
  out = _probe({"devices": 0, "ynn_convolutions": False}, [8, 4])
  cores = min(os.cpu_count(), 4)
  expected = max(d for d in range(1, cores + 1) if 4 % d == 0)
  assert out["devices"] == expected == out["applied"]["num_cpu_devices"]
  assert out["applied"]["xla_flags"] == xla_cpu.EIGEN_CONVOLUTIONS_FLAG == out["xla_flags"]
  # Ones through a 3x3 SAME convolution: 8 * 3 - 2 taps per row fall inside the 8x8 image.
  assert out["sum"] == 2 * 16 * 16 * (8 * 3 - 2) ** 2
  assert out["again"] == {}


def test_explicit_settings_and_xla_default_convolutions():
  out = _probe({"devices": 3, "ynn_convolutions": True}, [6])
  assert out["devices"] == 3 and "xla_flags" not in out["applied"]
  assert out["xla_flags"] == ""  # XLA:CPU's own default: YNNPACK runs the convolutions.


def test_no_convolution_flag_where_an_accelerator_computes(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)  # As if JAX had not started.
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  flags = "--xla_force_host_platform_device_count=8"  # The user's: the device count is left alone.
  monkeypatch.setenv("XLA_FLAGS", flags)
  cpu = default.get_config().cpu
  assert xla_cpu.configure(cpu, batch_sizes=[8]) == {} and os.environ["XLA_FLAGS"] == flags


def test_cpu_is_the_default_backend_by_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_cpu.cpu_is_default_backend()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not xla_cpu.cpu_is_default_backend()


def test_the_users_xla_flags_win():
  out = _probe({"devices": 0, "ynn_convolutions": False}, [8],
               XLA_FLAGS="--xla_force_host_platform_device_count=5 --xla_cpu_experimental_ynn_fusion_type=")
  assert out["devices"] == 5 and out["applied"] == {}
