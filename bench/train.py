"""Train-step speed: compile time, step time, images/s, memory, FLOPs and MFU; ours against a PyTorch peer.

Runs the real train step (training/train_step.py, jitted and donated as training/train.py does) on random
data, for each batch size and each variant of the model switches (VARIANTS: dtype, attention, remat).
With --peer, diffusers' UNet2DModel built like ours (bench/peer_torch.py, eager and torch.compile) runs
in a separate process, in rounds that alternate with ours, so the machine's noise falls on both; the
ratio is ours / peer in images/s (> 1: ours is faster). XLA:CPU settings (config.cpu: convolutions
through Eigen or YNNPACK, devices per host) are fixed per process, so --cpu_settings beyond the first
run ours in worker processes that alternate in the same way. Prints a table, writes
bench/results/<device>-<date>.json.

  python bench/train.py [--config configs/cifar10.py] [--batch_sizes 8,32] [--variants fp32,bf16]
                        [--cpu_settings config,xla_defaults] [--peer --peer_python /path/to/venv/bin/python]
                        [--meshes 8x1,2x4] [--quick] [--profile DIR]

--meshes runs each variant on each data x fsdp mesh (config.mesh, training/sharding.py) and reports the
train state's bytes per device; on a CPU, force 8 host devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from bench import flops as flops_lib
from training import sharding
from training import train as train_lib
from training import train_step as train_step_lib
from training import xla_cpu

# Dense (no sparsity) peak TFLOP/s per chip, by compute dtype; the first row whose key is in the
# device's device_kind applies. NVIDIA's float32 is TF32 on the tensor cores, which XLA uses for float32
# convolutions and matmuls on Ampere and later by default. Sources: NVIDIA H100 datasheet (SXM
# BF16 1,979 / TF32 989 TFLOPS with sparsity, half that dense; PCIe 1,513 / 756), H200 datasheet (as
# H100 SXM), A100 datasheet (BF16 312, TF32 156 dense); Cloud TPU docs, "Peak compute per chip (bf16)":
# v4 275, v5e 197, v5p 459, v6e 918 (TPU float32 matmuls run as bf16 passes at default precision).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
)

# The model switches measured on and off: overrides of config.model.
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "remat": {"remat": True},
    "bf16_remat": {"dtype": "bfloat16", "remat": True},
    "bf16_cudnn": {"dtype": "bfloat16", "attention": "cudnn"},
    "bf16_auto_attn": {"dtype": "bfloat16", "attention": None},
}
PEERS = {"peer_eager": [], "peer_compiled": ["--compile"]}

# XLA:CPU settings (config.cpu, training/xla_cpu.py), fixed per process: the first of --cpu_settings is
# this process's, each other one runs our step in a worker process of its own (bench/train.py --serve).
CPU_SETTINGS: dict[str, dict[str, Any]] = {
    "config": {},  # config.cpu as the config file sets it (main.py applies the same).
    "per_core": {"devices": 0},  # One device per core, data parallel.
    "xla_defaults": {"devices": 1, "ynn_convolutions": True},  # XLA:CPU's own: convolutions in YNNPACK.
}

RESULT_KEYS = ("name", "batch", "compile_s", "step_s", "step_s_p10", "step_s_p90", "images_per_s",
               "peak_memory_bytes", "peak_memory_kind", "flops", "tflops_per_s", "mfu", "ratio_vs",
               "mesh", "state_bytes_per_device")


def load_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file, e.g. configs/cifar10.py."""
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  info = {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
          "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return info


def device_tag() -> str:
  """A file-name-safe device name: 'cpu', 'nvidia-h100-80gb-hbm3', 'tpu-v5-lite'."""
  device = jax.devices()[0]
  kind = device.platform if device.platform == "cpu" else device.device_kind
  return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")


def peak_tflops(dtype: str) -> float | None:
  """The device's dense peak for dtype, or None (CPU, or a device not in PEAK_TFLOPS)."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  for key, peaks in PEAK_TFLOPS:
    if key in device.device_kind:
      return peaks[dtype]
  return None


def peak_memory() -> tuple[int, str]:
  """Device peak bytes in use where the backend reports it, else the process's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return peak_rss(), "process peak RSS"


def peak_rss() -> int:
  """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def cost_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program (per device), from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def xla_memory_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - donated aliases of a compiled program, per device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def peer_spec(config: ml_collections.ConfigDict, channels: int) -> dict[str, Any]:
  """The model description bench/peer_torch.py builds its UNet2DModel from."""
  m = config.model.unet
  return {"ch": m.ch, "ch_mult": list(m.ch_mult), "num_res_blocks": m.num_res_blocks,
          "attn_resolutions": list(m.attn_resolutions), "num_heads": m.num_heads,
          "dropout": m.dropout, "image_size": config.data.image_size, "channels": channels,
          "num_classes": config.model.num_classes, "scale_shift": m.scale_shift}


def parse_mesh(text: str) -> dict[str, int]:
  """'2x4' -> {"data": 2, "fsdp": 4} (config.mesh sizes; -1 = the rest)."""
  try:
    data, fsdp = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--meshes: {text!r} is not data x fsdp, e.g. 8x1 or 2x4.") from None
  return {"data": data, "fsdp": fsdp}


class OursTrain:
  """Our jitted, donated train step on a fixed random batch; run(n) times n synchronised steps.

  The state lies on config.mesh as in training (sharding.state_shardings), the batch over all devices.
  compile_only: nothing is allocated or run (state bytes and XLA's memory analysis of models too large
  to hold here).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, batch: int, channels: int = 3,
               compile_only: bool = False):
    self.batch = batch
    self.dtype = config.model.dtype
    mesh = sharding.create_mesh(config.mesh)
    self.mesh = f"{mesh.shape[sharding.DATA]}x{mesh.shape[sharding.FSDP]}"
    replicated, sharded = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
    model = models.create_model(config.model)
    schedule = train_lib.create_schedule(config.diffusion)
    tx, lr_fn = train_step_lib.create_optimizer(config.optim)
    size = config.data.image_size
    num_classes = config.model.num_classes
    init_rng, train_rng, data_rng = jax.random.split(jax.random.key(config.seed), 3)
    init = functools.partial(train_step_lib.init_state, model=model, tx=tx,
                             image_shape=(size, size, channels), num_classes=num_classes)
    shapes = jax.eval_shape(init, init_rng)
    state_shardings = sharding.state_shardings(shapes, mesh=mesh,
                                               fsdp_min_size=config.mesh.fsdp_min_size)
    if compile_only:
      self.state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_shardings)
      self.batch_data = {
          "image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32, sharding=sharded),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharded)}
    else:
      self.state = jax.jit(init, out_shardings=state_shardings)(init_rng)
      images = jax.random.normal(data_rng, (batch, size, size, channels))
      labels = jnp.zeros((batch,), jnp.int32)
      self.batch_data = jax.device_put({"image": images, "label": labels}, sharded)
    self.state_bytes = sharding.bytes_per_device(self.state)
    self.num_params = models.count_params(self.state.params)
    step = jax.jit(
        train_step_lib.make_train_step(
            model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
            hparams=train_step_lib.DiffusionHParams.from_config(config.diffusion),
            num_classes=num_classes, ema_decay=config.optim.ema_decay, rng=train_rng),
        in_shardings=(state_shardings, sharded), out_shardings=(state_shardings, replicated),
        donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(self.state, self.batch_data)
    self.trace_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    xla_flops = cost_flops(self.compiled)  # Per device: the batch is split over all of them.
    self.xla_flops = xla_flops and xla_flops * jax.device_count()
    # MFU's numerator: the step's matrix products and convolutions, counted from its jaxpr
    # (bench/flops.py); XLA's count leaves out what becomes a cuDNN or cuBLAS call on GPUs.
    self.flops = flops_lib.count_flops(step, self.state, self.batch_data)
    self.xla_memory = xla_memory_bytes(self.compiled)
    self.peak_memory = (None, "not run")
    if not compile_only:
      self.run(2)  # Warm-up.
      self.peak_memory = peak_memory()

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch_data)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    return times


class Worker:
  """A process that prints a JSON line of facts, then answers "run N" with the times of N steps.

  bench/peer_torch.py --serve (the peer, in a Python with torch and diffusers) and bench/train.py
  --serve (ours under other XLA:CPU settings) are workers.
  """

  def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 bufsize=1, env=env)
    self.info = self._read()
    self.error = self.info.get("error")
    self.compile_s = self.info.get("warmup_s")

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      return {"error": f"worker exited with status {self.proc.wait()}"}
    return json.loads(line)

  def run(self, n: int) -> list[float]:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    reply = self._read()
    if "error" in reply:
      raise RuntimeError(f"worker failed: {reply['error']}")
    self.info.update(reply)
    return reply["times"]

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()


def alternate(runners: dict[str, Any], *, steps: int, rounds: int) -> tuple[dict, list[dict]]:
  """Runs steps // rounds timed steps of each runner in turn, rounds times: all times, per-round medians."""
  per_round = max(steps // rounds, 1)
  times = {name: [] for name in runners}
  medians = []
  for _ in range(rounds):
    round_medians = {}
    for name, runner in runners.items():
      t = runner.run(per_round)
      times[name] += t
      round_medians[name] = float(np.median(t))
    medians.append(round_medians)
  return times, medians


def round_ratio(medians: list[dict], ours: str, peer: str) -> float:
  """Median over rounds of peer step time / our step time: ours / peer in images/s."""
  return float(np.median([m[peer] / m[ours] for m in medians]))


def summarise(name: str, batch: int, times: list[float], **extra) -> dict[str, Any]:
  step_s = float(np.median(times))
  row = {"name": name, "batch": batch, "step_s": step_s, "step_s_p10": float(np.percentile(times, 10)),
         "step_s_p90": float(np.percentile(times, 90)), "images_per_s": batch / step_s,
         "num_steps_timed": len(times), "ratio_vs": None, "ratio_p10_vs": None, **extra}
  flops = row.get("flops")
  row["tflops_per_s"] = flops / step_s / 1e12 if flops else None
  peak = row.pop("peak_tflops", None)
  row["peak_tflops"] = peak
  row["mfu"] = row["tflops_per_s"] / peak if peak and row["tflops_per_s"] else None
  return row


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], title: str) -> None:
  print(f"\n{title}")
  header = (f"{'name':20s} {'batch':>5s} {'mesh':>5s} {'compile s':>9s} {'step ms':>9s} {'img/s':>8s} "
            f"{'state MiB/dev':>13s} {'peak MiB':>8s} {'XLA MiB':>8s} {'GFLOP/step':>10s} {'TFLOP/s':>8s} "
            f"{'MFU':>6s}  ours/peer")
  print(header)
  print("-" * len(header))
  for r in rows:
    mem = r.get("peak_memory_bytes")
    xla = r.get("xla_memory_bytes")
    state = r.get("state_bytes_per_device")
    print(f"{r['name']:20s} {r['batch']:5d} {r.get('mesh') or '-':>5s} {_fmt(r.get('compile_s'), '9.1f')} "
          f"{r['step_s'] * 1e3:9.1f} {r['images_per_s']:8.1f} {_fmt(state and state / 2**20, '13.1f')} "
          f"{_fmt(mem and mem / 2**20, '8.0f')} "
          f"{_fmt(xla and xla / 2**20, '8.0f')} {_fmt(r.get('flops') and r['flops'] / 1e9, '10.1f')} "
          f"{_fmt(r.get('tflops_per_s'), '8.3f')} {_fmt(r.get('mfu'), '6.1%')}  {ratio_text(r)}")


def ratio_text(row: dict) -> str:
  """'eager 1.20x (p10 1.10x), ...': ours / each peer in images/s, median of rounds (fastest decile)."""
  p10 = row.get("ratio_p10_vs") or {}
  return ", ".join(f"{p.replace('peer_', '')} {v:.2f}x (p10 {p10[p]:.2f}x)"
                   for p, v in (row.get("ratio_vs") or {}).items())


def write_json(results: dict[str, Any], kind: str, out: str | None = None) -> str:
  date = datetime.date.today().isoformat()
  suffix = "" if kind == "train" else f"-{kind}"  # The train bench's is <device>-<date>.json.
  path = out or os.path.join(ROOT, "bench", "results", f"{device_tag()}-{date}{suffix}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  return path


def default_peer_python() -> str | None:
  """$PEER_PYTHON, else this Python if it has torch and diffusers, else None."""
  if os.environ.get("PEER_PYTHON"):
    return os.environ["PEER_PYTHON"]
  has = importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers")
  return sys.executable if has else None


def parse_args(argv=None, *, description: str = __doc__) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="Config file (path from the repo root).")
  parser.add_argument("--batch_sizes", default="8,32", help="Global batch sizes, comma-separated.")
  parser.add_argument("--variants", default="fp32,bf16",
                      help=f"Model switches to measure, comma-separated, from {', '.join(VARIANTS)}.")
  parser.add_argument("--steps", type=int, default=20, help="Timed steps per variant (after warm-up).")
  parser.add_argument("--rounds", type=int, default=4, help="Alternating rounds the steps are split into.")
  parser.add_argument("--peer", action="store_true", help="Also run the PyTorch peer (bench/peer_torch.py).")
  parser.add_argument("--peer_python", default=None,
                      help="Python with torch and diffusers for the peer; default $PEER_PYTHON or this one.")
  parser.add_argument("--peer_modes", default="peer_eager,peer_compiled",
                      help=f"Peer variants, from {', '.join(PEERS)}.")
  parser.add_argument("--peer_dtypes", default=None,
                      help="Peer compute dtypes (float32, bfloat16 = autocast); default: those of --variants.")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny config, batch 8, a few steps: seconds on a CPU (for tests).")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="Trace three steps of the first variant into DIR and print where the time goes.")
  parser.add_argument("--cpu_settings", default="config",
                      help=f"XLA:CPU settings, comma-separated, from {', '.join(CPU_SETTINGS)}; the first "
                           "is this process's, the others run in worker processes.")
  parser.add_argument("--meshes", default=None,
                      help="data x fsdp meshes to run each variant on, comma-separated, e.g. 8x1,2x4 "
                           "(config.mesh; -1 = the rest); default the config's mesh.")
  parser.add_argument("--compile_only", action="store_true",
                      help="Compile only (no state allocated, nothing timed): state bytes per device and "
                           "XLA's memory analysis, for models too large for this host.")
  parser.add_argument("--latent_shape", default=None, metavar="H,W,C",
                      help="Time the step on latents of this shape (a latent config's autoencoder is not "
                           "loaded: the batch is random anyway), e.g. 32,32,4 for 256px SD latents.")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>.json).")
  parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # Worker: --batch, --variant.
  parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def prepare(args, *, bench: str, cpu_setting: str, batch_sizes: list[int], cpu_devices: int | None = None,
            announce: bool = True) -> tuple[ml_collections.ConfigDict, int, str | None, dict[str, Any]]:
  """What every bench script does first: the config (one resolution level with --quick), the CPU setting
  (before JAX starts), the peer's Python, then the results dict with the device; prints the device."""
  base = load_config(args.config)
  if args.quick:  # One resolution level: the bench's code paths in a fraction of tiny's compile time.
    base.model.unet.ch_mult, base.model.unet.attn_resolutions = (1,), (base.data.image_size,)
  if cpu_devices is not None:
    base.cpu.devices = cpu_devices
  cpu = apply_cpu_setting(cpu_setting, base, batch_sizes)
  peer_python = (args.peer_python or default_peer_python()) if args.peer else None
  if args.peer and peer_python is None:
    raise SystemExit("--peer needs torch and diffusers: pass --peer_python (requirements-bench.txt).")
  channels = 1 if base.data.name == "digits" else 3
  if getattr(args, "latent_shape", None):
    height, width, channels = (int(v) for v in args.latent_shape.split(","))
    if height != width:
      raise SystemExit(f"--latent_shape={args.latent_shape}: latents must be square (H = W).")
    base.data.image_size = height
  elif base.get("latent") and base.latent.autoencoder is not None:
    raise SystemExit(f"{args.config} trains in an autoencoder's latent space: pass --latent_shape H,W,C.")
  results = {"bench": bench, "config": args.config, "args": vars(args),
             "device": {**device_info(), "cpu_setting": cpu},
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": []}
  if announce:
    print(json.dumps(results["device"]))
  return base, channels, peer_python, results


def check_cpu_setting(name: str) -> None:
  if name not in CPU_SETTINGS:
    raise SystemExit(f"--cpu_settings: {name!r} is not one of {', '.join(CPU_SETTINGS)}.")


def apply_cpu_setting(name: str, base: ml_collections.ConfigDict, batch_sizes: list[int]) -> dict:
  """Applies CPU_SETTINGS[name] over base.cpu to this process (before JAX starts); what was set."""
  check_cpu_setting(name)
  cpu = ml_collections.ConfigDict(base.cpu.to_dict())
  cpu.update(CPU_SETTINGS[name])
  return {"setting": name, **cpu.to_dict(), **xla_cpu.configure(cpu, batch_sizes=batch_sizes)}


def ours_facts(ours: "OursTrain", config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The table row's facts about one compiled variant of our step."""
  return dict(compile_s=ours.compile_s, trace_s=ours.trace_s, flops=ours.flops, xla_flops=ours.xla_flops,
              mesh=ours.mesh,
              state_bytes_per_device=ours.state_bytes,
              xla_memory_bytes=ours.xla_memory, peak_memory_bytes=ours.peak_memory[0],
              peak_memory_kind=ours.peak_memory[1] + " (running peak of this process)",
              params=ours.num_params, dtype=config.model.dtype,
              peak_tflops=(peak := peak_tflops(config.model.dtype)) and peak * jax.device_count(),
              model=config.model.to_dict(),
              devices=jax.device_count())


def variant_config(base: ml_collections.ConfigDict, name: str,
                   mesh: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.update(VARIANTS[name])
  if mesh:
    config.mesh.update(parse_mesh(mesh))
  return config


def serve(args, base, channels: int, cpu: dict) -> None:
  """Worker mode: our step for one batch and variant; JSON lines on stdout (see Worker)."""
  try:
    config = variant_config(base, args.variant, args.meshes)
    ours = OursTrain(config, batch=args.batch, channels=channels)
    facts = {**ours_facts(ours, config), "cpu": cpu}
  except Exception as e:  # pylint: disable=broad-except
    print(json.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return
  print(json.dumps(facts), flush=True)
  for line in sys.stdin:
    command = line.split()
    if command[:1] == ["run"]:
      print(json.dumps({"times": ours.run(int(command[1]))}), flush=True)
    elif command[:1] == ["quit"]:
      return


def start_ours(args, base, batch: int, channels: int, results: dict) -> tuple[dict, dict]:
  """Compiles our step for each variant and CPU setting: runners and their table rows.

  The first CPU setting's variants run in this process and are named after the variant; the others run
  in workers named "<variant>@<setting>". With --meshes, "/<data>x<fsdp>" is added. Failures go to
  variant_errors and the rest run on.
  """
  runners, rows = {}, {}
  settings = args.cpu_settings.split(",")
  meshes = args.meshes.split(",") if args.meshes else [None]
  for setting, mesh, name in ((s, m, n) for s in settings for m in meshes
                              for n in args.variants.split(",")):
    label = (name if setting == settings[0] else f"{name}@{setting}") + (f"/{mesh}" if mesh else "")
    try:
      if setting == settings[0]:
        config = variant_config(base, name, mesh)
        runner = OursTrain(config, batch=batch, channels=channels, compile_only=args.compile_only)
        facts = {**ours_facts(runner, config), "cpu": results["device"]["cpu_setting"]}
      else:
        runner = start_worker(args, setting, name, batch, mesh)
        facts = runner.info
        if runner.error:
          raise RuntimeError(runner.error)
    except Exception as e:  # pylint: disable=broad-except
      # E.g. cuDNN attention for a head size it lacks: recorded, and the other variants run on.
      print(f"batch {batch} {label}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
      results.setdefault("variant_errors", {})[f"{label}@{batch}"] = f"{type(e).__name__}: {e}"[:2000]
      continue
    runners[label] = runner
    rows[label] = {**facts, "cpu_setting": setting}
    print(f"batch {batch} {label}: compiled in {facts['compile_s']:.1f} s", flush=True)
  return runners, rows


def start_worker(args, setting: str, variant: str, batch: int, mesh: str | None = None) -> Worker:
  """Our step in a fresh process under another CPU setting (XLA reads its flags once per process)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f != xla_cpu.EIGEN_CONVOLUTIONS_FLAG)
  cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--config", args.config,
         "--batch", str(batch), "--variant", variant, "--cpu_settings", setting,
         "--batch_sizes", args.batch_sizes]
  if args.quick:
    cmd.append("--quick")
  if mesh:
    cmd += ["--meshes", mesh]
  if args.latent_shape:
    cmd += ["--latent_shape", args.latent_shape]
  return Worker(cmd, env=env)


def peer_device() -> str:
  """Where the peer runs: CUDA beside a JAX GPU, else the CPU."""
  return "cuda" if jax.devices()[0].platform == "gpu" else "cpu"


def start_peer(peer_python: str, base: ml_collections.ConfigDict, channels: int, *, batch: int, dtype: str,
               args: tuple[str, ...] = ("--mode", "train")) -> Worker:
  """bench/peer_torch.py --serve with the UNet of base, in peer_python."""
  return Worker([peer_python, os.path.join(ROOT, "bench", "peer_torch.py"), "--serve", *args,
                 "--batch", str(batch), "--model", json.dumps(peer_spec(base, channels)),
                 "--device", peer_device(), "--dtype", dtype])


def start_peers(args, base, batch: int, channels: int, peer_python: str, results: dict,
                extra_args: tuple[str, ...] = ("--mode", "train")) -> tuple[dict, dict]:
  """Starts a peer process per --peer_modes and --peer_dtypes; those that fail go to peer_errors."""
  peers, rows = {}, {}
  dtypes = (args.peer_dtypes.split(",") if args.peer_dtypes else
            sorted({VARIANTS[n].get("dtype", base.model.dtype) for n in args.variants.split(",")}))
  for mode in args.peer_modes.split(","):
    for dtype in dtypes:
      label = mode if len(dtypes) == 1 else f"{mode}_{'bf16' if dtype == 'bfloat16' else 'fp32'}"
      peer = start_peer(peer_python, base, channels, batch=batch, dtype=dtype,
                        args=(*extra_args, *PEERS[mode]))
      if peer.error:
        print(f"batch {batch} {label}: unavailable ({peer.error[:300]})", flush=True)
        results.setdefault("peer_errors", {})[label] = peer.error
        peer.close()
        continue
      peers[label] = peer
      rows[label] = dict(compile_s=peer.compile_s, params=peer.info["params"], dtype=dtype,
                         torch=peer.info.get("torch"), diffusers=peer.info.get("diffusers"),
                         threads=peer.info.get("threads"))
      print(f"batch {batch} {label}: ready, warm-up {peer.compile_s:.1f} s", flush=True)
  return peers, rows


def measure(runners: dict, peers: dict, rows: dict, *, batch: int, steps: int, rounds: int,
            **row_extra) -> list[dict]:
  """Alternates all runners, then one summary row each; ours get ratio_vs the peers of their dtype."""
  try:
    times, medians = alternate({**runners, **peers}, steps=steps, rounds=rounds)
  finally:
    for worker in [*runners.values(), *peers.values()]:
      if isinstance(worker, Worker):
        worker.close()
  table = []
  for name, extra in rows.items():
    if name in peers:
      extra.update(peak_memory_bytes=peers[name].info.get("peak_memory_bytes"),
                   peak_memory_kind=peers[name].info.get("peak_memory_kind"))
    row = summarise(name, batch, times[name], **extra, **row_extra)
    same = [p for p in peers if rows[p]["dtype"] == row["dtype"]]
    if name not in peers:
      row["ratio_vs"] = {p: round_ratio(medians, name, p) for p in same}  # Empty without a peer.
    if name not in peers and same:
      # Best-decile ratio: on a shared machine, the steps least disturbed by other processes.
      row["ratio_p10_vs"] = {p: float(np.percentile(times[p], 10) / np.percentile(times[name], 10))
                             for p in same}
      for p in same:
        if abs(rows[p]["params"] / row["params"] - 1) > 0.01:
          print(f"warning: {p} has {rows[p]['params']:,} parameters, ours {row['params']:,}")
    table.append(row)
  return table


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.quick:
    args.config, args.batch_sizes, args.steps, args.rounds = "configs/tiny.py", "8", 4, 2
    args.variants, args.peer_modes, args.peer_dtypes = "fp32", "peer_eager", "float32"
  for name in args.variants.split(","):
    if name not in VARIANTS:
      raise SystemExit(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}.")
  settings = args.cpu_settings.split(",")
  for name in settings:
    check_cpu_setting(name)
  # This process runs the first CPU setting.
  base, channels, peer_python, results = prepare(
      args, bench="train", cpu_setting=settings[0],
      batch_sizes=[int(b) for b in args.batch_sizes.split(",")], announce=not args.serve)
  if args.serve:
    serve(args, base, channels, results["device"]["cpu_setting"])
    return {}
  if peer_python and base.model.name != "unet":
    raise SystemExit(f"--peer: the PyTorch peer is the UNet; {args.config} has model {base.model.name!r}.")
  for mesh in (args.meshes or "").split(",") if args.meshes else []:
    try:
      sharding.mesh_shape(ml_collections.ConfigDict(parse_mesh(mesh)), device_count=jax.device_count())
    except ValueError as e:
      raise SystemExit(f"--meshes {mesh}: {e}") from None

  for batch in map(int, args.batch_sizes.split(",")):
    runners, rows = start_ours(args, base, batch, channels, results)
    if args.compile_only:
      results["rows"] += [{"name": name, "batch": batch, **row} for name, row in rows.items()]
      for name, row in rows.items():
        print(f"{name:20s} batch {batch} mesh {row['mesh']}: state {row['state_bytes_per_device'] / 2**20:.1f}"
              f" MiB per device, XLA memory analysis {row['xla_memory_bytes'] / 2**20:.1f} MiB per device")
      continue
    if args.profile and runners:
      results.setdefault("profile_ms_per_step", {})[batch] = profile_steps(
          next(iter(runners.values())), os.path.join(args.profile, f"batch{batch}"))
    peers = {}
    if peer_python:
      peers, peer_rows = start_peers(args, base, batch, channels, peer_python, results)
      rows.update(peer_rows)
    table = measure(runners, peers, rows, batch=batch, steps=args.steps, rounds=args.rounds)
    results["rows"] += table
    print_table(table, f"{args.config}, batch {batch} ({results['device']['device_kind']}; "
                       "ours/peer = images/s ratio, median over alternating rounds)")
  results["device"]["load_average_end"] = os.getloadavg()
  path = write_json(results, "train", args.out)
  print(f"\nwrote {path}")
  return results


def profile_steps(runner: OursTrain, directory: str, steps: int = 3) -> dict[str, float]:
  """A jax.profiler trace of a few steps (TensorBoard's profile plugin or Perfetto reads it), summarised."""
  with jax.profiler.trace(directory):
    runner.run(steps)
  print(f"profile of {steps} steps written under {directory}")
  paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
  summary = summarise_trace(max(paths, key=os.path.getmtime), runner.compiled.as_text(), steps)
  total = sum(summary.values()) or 1.0
  print("op time per step (summed over threads) by kind; convolutions that XLA:CPU hands to Eigen are "
        "not named in the trace (bench/convs.py times them):")
  for kind, ms in sorted(summary.items(), key=lambda kv: -kv[1]):
    print(f"  {kind:28s} {ms:9.1f} ms {ms / total:6.1%}")
  return summary


def summarise_trace(path: str, hlo_text: str, steps: int) -> dict[str, float]:
  """ms per step by kind of HLO op, for trace events named after the program's instructions (XLA:CPU).

  Kinds: convolutions forward, input gradient, weight gradient (XLA:CPU runs it as a convolution whose
  window is the whole image), dots, reductions (GroupNorm statistics, softmax), transposes and copies
  (mostly layout changes around the backward convolutions), other elementwise fusions. Convolutions run
  by YNNPACK are named; those run by Eigen (config.cpu.ynn_convolutions=False) are not.
  """
  instructions = dict(re.findall(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.M))
  bodies = dict(re.findall(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo_text, re.M | re.S))

  def kind(name: str) -> str:
    rest = instructions[name]
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    text = rest + "\n" + (bodies.get(called.group(1), "") if called else "")
    ops = set(re.findall(r"\b(convolution|dot|reduce|transpose|copy)\(", text))
    if "convolution" in ops:
      window = re.search(r"window=\{size=(\d+)x", text)
      if window and int(window.group(1)) > 3:
        return "conv weight-grad"
      return "conv input-grad" if "transpose(jvp" in text else "conv forward"
    for op, label in (("dot", "dot"), ("reduce", "reduce"), ("transpose", "transpose/copy"),
                      ("copy", "transpose/copy")):
      if op in ops:
        return label
    return "elementwise"

  totals: dict[str, float] = {}
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in instructions:
          k = kind(event.name)
          totals[k] = totals.get(k, 0.0) + event.duration_ns / 1e6 / steps
  return totals


if __name__ == "__main__":
  main()
