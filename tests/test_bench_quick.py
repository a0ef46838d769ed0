"""Each bench script's --quick runs end to end and writes its JSON, so the benches cannot rot.

Ours only, unless a Python with torch and diffusers is at hand ($PEER_PYTHON or this one): then the
PyTorch peer runs too. Nothing here asserts a time.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import train as bench_train  # pylint: disable=g-import-not-at-top
from training import xla_cpu  # pylint: disable=g-import-not-at-top

PEER_PYTHON = bench_train.default_peer_python()


def _run_quick(script: str, out: str, *extra: str, peer: bool = True) -> dict:
  env = dict(os.environ)
  # The benches measure the real devices: one CPU device here, not the tests' forced eight.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  cache = jax.config.jax_compilation_cache_dir  # The tests' compilation cache (conftest.py).
  if cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--quick", "--out", out, *extra]
  if PEER_PYTHON and peer:
    cmd += ["--peer", "--peer_python", PEER_PYTHON]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"wrote {out}" in proc.stdout
  with open(out) as f:
    return json.load(f)


def _check_row(row: dict, *, name: str, batch: int) -> None:
  assert row["name"] == name and row["batch"] == batch
  assert row["step_s_p10"] <= row["step_s_p90"]
  assert row["peak_memory_bytes"] > 0
  assert row["compile_s"] is not None


def test_train_quick(tmp_path):
  # The second CPU setting runs our step in a worker process, alternating with this one's.
  results = _run_quick("train.py", str(tmp_path / "train.json"), "--cpu_settings", "config,xla_defaults")
  assert results["bench"] == "train" and results["device"]["platform"] == "cpu"
  assert results["device"]["cpu_setting"]["xla_flags"] == xla_cpu.EIGEN_CONVOLUTIONS_FLAG
  rows = {r["name"]: r for r in results["rows"]}
  worker = rows["fp32@xla_defaults"]
  _check_row(worker, name="fp32@xla_defaults", batch=8)
  assert worker["cpu"]["ynn_convolutions"] is True and "xla_flags" not in worker["cpu"]
  assert worker["flops"] == pytest.approx(rows["fp32"]["flops"], rel=0.05)
  ours = rows["fp32"]
  _check_row(ours, name="fp32", batch=8)
  for key in bench_train.RESULT_KEYS:
    assert key in ours, key
  assert ours["images_per_s"] == pytest.approx(8 / ours["step_s"])
  assert ours["num_steps_timed"] == 4
  assert ours["flops"] > 1e6 and ours["tflops_per_s"] > 0
  assert ours["mfu"] is None  # No peak table entry for CPUs.
  assert ours["params"] > 1000 and ours["dtype"] == "float32"
  if PEER_PYTHON:
    _check_row(rows["peer_eager"], name="peer_eager", batch=8)
    assert abs(rows["peer_eager"]["params"] / ours["params"] - 1) < 0.01  # The same UNet.
    assert ours["ratio_vs"]["peer_eager"] > 0


def test_sample_quick(tmp_path):
  results = _run_quick("sample.py", str(tmp_path / "sample.json"))
  assert results["bench"] == "sample"
  ours = [r for r in results["rows"] if r["name"] == "fp32"]
  assert [(r["sampler"], r["sampler_steps"]) for r in ours] == [("dpmpp_2m", 3), ("ddpm", 4)]
  for row in ours:
    _check_row(row, name="fp32", batch=4)
    assert row["images_per_s"] == pytest.approx(4 / row["run_s"])
    assert row["step_ms_per_model_call"] == pytest.approx(row["run_s"] / row["sampler_steps"] * 1e3)
  if PEER_PYTHON:
    assert len([r for r in results["rows"] if r["name"] == "peer_eager"]) == 2


def test_convs_quick(tmp_path):
  results = _run_quick("convs.py", str(tmp_path / "convs.json"))
  rows = results["rows"]
  # tiny --quick: 12 convolutions of 4 shapes; only the first (on the images) needs no input gradient.
  assert sum(r["count"] for r in rows) == 12 and len(rows) == 4
  assert [r["input_grad_needed"] for r in rows] == [False, True, True, True]
  for row in rows:
    assert all(row["ours"][k] > 0 for k in ("forward", "input_grad", "weight_grad"))
  ours = results["totals"]["ours"]
  assert ours["convolutions_s"] == pytest.approx(
      sum(r["count"] * r["ours_step_ms"] for r in rows) / 1e3)
  assert ours["rest_s"] == pytest.approx(ours["step_s"] - ours["convolutions_s"])
  if PEER_PYTHON:
    assert all(r["peer"]["weight_grad"] > 0 for r in rows) and "step_s" in results["totals"]["peer"]


def test_peak_table_and_device_tag():
  # The first matching row applies: a PCIe H100 is not an SXM one, a v5 lite (v5e) not a v5p.
  kinds = {"NVIDIA H100 PCIe": 756.0, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4,
           "NVIDIA A100-SXM4-80GB": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0}
  for kind, peak in kinds.items():
    match = next(p for key, p in bench_train.PEAK_TFLOPS if key in kind)
    assert match["bfloat16"] == peak, kind
  assert bench_train.device_tag() == "cpu"
  assert bench_train.peak_tflops("bfloat16") is None  # CPU: MFU left blank.


def test_dropout_quick(tmp_path):
  results = _run_quick("dropout.py", str(tmp_path / "dropout.json"), peer=False)
  assert sum(s["count"] for s in results["shapes"]) > 0
  assert {r["name"] for r in results["rows"]} == {"bernoulli_32bit", "layers_16bit"}
  assert all(r["ms_per_step"] > 0 for r in results["rows"])


def test_optimizer_quick(tmp_path):
  results = _run_quick("optimizer.py", str(tmp_path / "optimizer.json"), peer=False)
  assert {r["name"] for r in results["rows"]} == {"select", "cond", "unguarded"}
  assert results["params"] > 0 and all(r["ms"] > 0 for r in results["rows"])
