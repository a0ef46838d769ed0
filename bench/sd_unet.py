"""One forward pass of Stable Diffusion 1.5's UNet (models/sd_unet.py, 859,520,964 random parameters).

For 64x64x4 latents (512x512 images), a context of [B, 77, 768], batch 1 and 2 (2: one classifier-free
guidance step), in float32 and bfloat16 compute (parameters stay float32): compile time, the median
forward time, XLA's memory analysis of the compiled program per device (arguments, outputs,
temporaries: `jax.jit(...).lower(...).compile().memory_analysis()`), its FLOPs, and the process's or the
device's peak memory. With --peer, diffusers' UNet2DConditionModel of the same shapes (random weights,
torch.no_grad) runs in a Python with torch and diffusers, one process per row, after ours. Prints a
table, writes bench/results/<device>-<date>-sd_unet.json. The same command runs on a GPU.

  python bench/sd_unet.py [--batch_sizes 1,2] [--dtypes float32,bfloat16] [--steps 3] [--size 64]
                          [--peer --peer_python /path/to/venv/bin/python] [--quick] [--out PATH]

With --meshes 8x1,2x4 (data x fsdp; on a CPU the devices are forced host devices) it instead compiles,
without running, one guided DDIM step (the UNet on the doubled batch, parameters laid out by
training/sharding.py's rule) and one train step (loss, Adam, EMA: training/train_step.py) at global batch
--batch_sizes[0] per mesh, and reports XLA's memory analysis per device; writes
bench/results/<device>-<date>-sd_unet-meshes.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# SD 1.5's unet/config.json, in the arguments of models.SDUNet and of diffusers' UNet2DConditionModel.
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# --quick: a small model of the same layout, for a check that the bench runs (seconds).
QUICK = dict(SD15, block_out_channels=(32, 64), attention_head_dim=2, cross_attention_dim=16,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONTEXT_LENGTH = 77


def random_params(shapes: Any, seed: int = 0) -> Any:
  """Host parameters of these shapes: kernels N(0, 1 / fan_in), norm scales 1, biases 0.

  numpy, because compiling flax's initialisers for 859M parameters takes XLA longer than the forward.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(fan_in ** -0.5)
    return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def run_ours(args, spec: dict[str, Any], batch: int, dtype: str, params: Any) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from bench import train as bench_train  # pylint: disable=g-import-not-at-top
  from models import sd_unet  # pylint: disable=g-import-not-at-top

  model = sd_unet.SDUNet(**spec, dtype=jnp.dtype(dtype), attention=args.attention)
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((batch, args.size, args.size, 4), dtype=np.float32))
  t = jnp.full((batch,), 500.0)
  context = jnp.asarray(rng.standard_normal((batch, CONTEXT_LENGTH, spec["cross_attention_dim"]),
                                            dtype=np.float32))
  forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, {"context": c}))
  start = time.perf_counter()
  compiled = forward.lower(params, x, t, context).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times = []
  if args.steps:  # --steps 0: compile time and memory analysis only.
    compiled(params, x, t, context).block_until_ready()  # Warm-up.
    for _ in range(args.steps):
      start = time.perf_counter()
      out = compiled(params, x, t, context).block_until_ready()
      times.append(time.perf_counter() - start)
    assert bool(jnp.all(jnp.isfinite(out))), "the forward pass gave non-finite values"
  peak, peak_kind = bench_train.peak_memory()
  row = {"name": f"ours_{dtype}", "batch": batch, "compile_s": compile_s,
         "forward_s": float(np.median(times)) if times else None,
         "forward_s_min": float(np.min(times)) if times else None,
         "num_timed": len(times), "flops": flops_lib.count_flops(forward, params, x, t, context),
         "xla_flops": bench_train.cost_flops(compiled),
         "xla_memory_bytes": bench_train.xla_memory_bytes(compiled),
         "peak_memory_bytes": peak, "peak_memory_kind": peak_kind}
  if memory is not None:
    row.update({f"xla_{k}_bytes": int(getattr(memory, f"{k}_size_in_bytes"))
                for k in ("argument", "output", "temp", "generated_code")})
  return row


def run_meshes(args, spec: dict[str, Any]) -> list[dict[str, Any]]:
  """Per-device bytes of the compiled sampling and train steps on each --meshes mesh (compile only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  from diffusion import guidance  # pylint: disable=g-import-not-at-top
  from diffusion import schedules  # pylint: disable=g-import-not-at-top
  from models import sd_unet  # pylint: disable=g-import-not-at-top
  from training import sharding  # pylint: disable=g-import-not-at-top
  from training import train_step as train_step_lib  # pylint: disable=g-import-not-at-top

  config = default_config.get_config()
  batch = int(args.batch_sizes.split(",")[0])
  model = sd_unet.SDUNet(**spec, dtype=jnp.dtype(args.dtypes.split(",")[0]), attention=args.attention)
  schedule = schedules.create_schedule(schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085,
                                       beta_end=0.012, model_time="index_from_zero")
  struct = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  dim = spec["cross_attention_dim"]
  params = jax.eval_shape(model.init, jax.random.key(0), struct((1, 8, 8, 4)), struct((1,)),
                          {"context": struct((1, 1, dim))})["params"]
  tx, lr_fn = train_step_lib.create_optimizer(config.optim)
  state = train_step_lib.TrainState(step=struct((), jnp.int32), params=params, ema_params=params,
                                    opt_state=jax.eval_shape(tx.init, params))
  step = train_step_lib.make_train_step(
      model=model, schedule=schedule, tx=tx, lr_fn=lr_fn,
      hparams=train_step_lib.DiffusionHParams.from_config(config.diffusion), num_classes=0,
      ema_decay=0.9999, rng=jax.random.key(0),
      condition=lambda frozen, b, rng: {"context": b["context"]})
  rows = []
  for mesh_text in args.meshes.split(","):
    data, fsdp = (int(n) for n in mesh_text.split("x"))
    mesh_config = ml_collections.ConfigDict({"data": data, "fsdp": fsdp})
    mesh = sharding.create_mesh(mesh_config)
    shardings = sharding.state_shardings(state, mesh=mesh, fsdp_min_size=config.mesh.fsdp_min_size)
    placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    batch_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
    on_batch = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    x = on_batch((batch, args.size, args.size, 4))
    context = on_batch((batch, CONTEXT_LENGTH, dim))

    def ddim_step(p, x, context, negative, scale):
      denoise = guidance.make_denoise_fn(
          lambda x, t, c: model.apply({"params": p}, x, t, c), schedule=schedule, prediction="eps",
          cond={"context": context}, uncond={"context": negative}, guidance_scale=scale)
      x0, eps = denoise(x, jnp.float32(0.5))
      alpha, sigma = schedule.alpha_sigma(jnp.float32(0.48))
      return alpha * x0 + sigma * eps

    programs = {
        "sample_step": jax.jit(ddim_step, out_shardings=batch_sharding).lower(
            placed.ema_params, x, context, context, jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)),
        "train_step": jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=0).lower(
            placed, {"image": x, "context": context}, None),
    }
    for name, lowered in programs.items():
      start = time.perf_counter()
      compiled = lowered.compile()
      memory = compiled.memory_analysis()
      row = {"name": name, "mesh": f"{data}x{fsdp}", "batch": batch, "dtype": args.dtypes.split(",")[0],
             "compile_s": time.perf_counter() - start,
             "state_bytes_per_device": sharding.bytes_per_device(placed if name == "train_step"
                                                                 else placed.ema_params)}
      if memory is not None:
        row.update({f"xla_{k}_bytes": int(getattr(memory, f"{k}_size_in_bytes"))
                    for k in ("argument", "output", "temp", "alias")})
      rows.append(row)
      print(json.dumps(row))
      del compiled
      gc.collect()
  return rows


def print_mesh_table(rows: list[dict[str, Any]], title: str) -> None:
  print(f"\n{title}")
  header = f"{'program':12s} {'mesh':>5s} {'batch':>5s} {'args MiB':>9s} {'temp MiB':>9s} {'out MiB':>8s} {'alias MiB':>9s}"
  print(header)
  print("-" * len(header))
  mib = lambda r, k: f"{r.get(f'xla_{k}_bytes', 0) / 2**20:9.0f}"
  for r in rows:
    print(f"{r['name']:12s} {r['mesh']:>5s} {r['batch']:5d} {mib(r, 'argument')} {mib(r, 'temp')} "
          f"{mib(r, 'output')[1:]} {mib(r, 'alias')}")


def run_peer(args, spec: dict[str, Any], batch: int, dtype: str) -> dict[str, Any]:
  """diffusers' UNet2DConditionModel, in --peer_python (a process per row); its JSON line."""
  cmd = [args.peer_python, os.path.abspath(__file__), "--serve_peer", "--batch", str(batch),
         "--dtype", dtype, "--steps", str(args.steps), "--size", str(args.size)]
  if args.quick:
    cmd.append("--quick")
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    return {"name": f"peer_{dtype}", "batch": batch, "error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_peer(args) -> None:
  """The peer's side: build, warm up, time; print one JSON line (needs torch and diffusers, not jax)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:  # PyPI's torchvision does not load beside some torch wheels; diffusers then must not import it.
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    sys.modules["torchvision"] = None
  import diffusers  # pylint: disable=g-import-not-at-top

  spec = QUICK if args.quick else SD15
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  unet = diffusers.UNet2DConditionModel(**spec).to(device, torch_dtype).eval()
  x = torch.randn(args.batch, 4, args.size, args.size, device=device, dtype=torch_dtype)
  t = torch.full((args.batch,), 500.0, device=device)
  context = torch.randn(args.batch, CONTEXT_LENGTH, spec["cross_attention_dim"], device=device,
                        dtype=torch_dtype)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  times = []
  with torch.no_grad():
    for i in range(args.steps + 1):  # The first is the warm-up.
      start = time.perf_counter()
      unet(x, t, encoder_hidden_states=context)
      sync()
      if i:
        times.append(time.perf_counter() - start)
  row = {"name": f"peer_{args.dtype}", "batch": args.batch, "compile_s": None,
         "forward_s": float(np.median(times)), "forward_s_min": float(np.min(times)),
         "num_timed": len(times), "torch": torch.__version__, "diffusers": diffusers.__version__,
         "params": sum(p.numel() for p in unet.parameters())}
  if device == "cuda":
    row.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
               peak_memory_kind="torch.cuda.max_memory_allocated")
  else:
    with open("/proc/self/status") as f:
      row.update(peak_memory_bytes=next(int(line.split()[1]) * 1024 for line in f
                                        if line.startswith("VmHWM")), peak_memory_kind="process peak RSS")
  print(json.dumps(row))


def print_table(rows: list[dict[str, Any]], title: str) -> None:
  print(f"\n{title}")
  header = (f"{'name':16s} {'batch':>5s} {'compile s':>9s} {'forward ms':>10s} {'XLA MiB':>8s} "
            f"{'(args':>7s} {'temp)':>7s} {'peak MiB':>8s} {'GFLOP':>8s} {'TFLOP/s':>8s}")
  print(header)
  print("-" * len(header))
  fmt = lambda v, spec: ("-" if v is None else format(v, spec)).rjust(int(spec.split(".")[0]))
  mib = lambda v: v and v / 2**20
  for r in rows:
    if "error" in r:
      print(f"{r['name']:16s} {r['batch']:5d} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
      continue
    flops, forward_s = r.get("flops"), r.get("forward_s")
    print(f"{r['name']:16s} {r['batch']:5d} {fmt(r.get('compile_s'), '9.1f')} "
          f"{fmt(forward_s and forward_s * 1e3, '10.1f')} "
          f"{fmt(mib(r.get('xla_memory_bytes')), '8.0f')} {fmt(mib(r.get('xla_argument_bytes')), '7.0f')} "
          f"{fmt(mib(r.get('xla_temp_bytes')), '7.0f')} {fmt(mib(r.get('peak_memory_bytes')), '8.0f')} "
          f"{fmt(flops and flops / 1e9, '8.1f')} {fmt(flops and forward_s and flops / forward_s / 1e12, '8.3f')}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", default="1,2", help="Batch sizes, comma-separated.")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="Compute dtypes, comma-separated.")
  parser.add_argument("--steps", type=int, default=3,
                      help="Timed forwards per row, after one warm-up (0: compile and memory only).")
  parser.add_argument("--size", type=int, default=64, help="Latent side (64: SD 1.5's 512x512 images).")
  parser.add_argument("--attention", default="xla", help="jax.nn.dot_product_attention implementation "
                      "('xla', 'cudnn' or 'none' for jax's choice).")
  parser.add_argument("--peer", action="store_true", help="Also run diffusers' UNet2DConditionModel.")
  parser.add_argument("--peer_python", default=None, help="Python with torch and diffusers "
                      "($PEER_PYTHON, else this one).")
  parser.add_argument("--quick", action="store_true", help="A small model at 16x16 latents (seconds).")
  parser.add_argument("--out", default=None,
                      help="JSON path (default bench/results/<device>-<date>-sd_unet.json).")
  parser.add_argument("--meshes", default=None, help="data x fsdp meshes, e.g. 8x1,2x4: compile the "
                      "sampling and train steps on each and report memory per device (nothing runs).")
  parser.add_argument("--serve_peer", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.attention == "none":
    args.attention = None
  if args.quick and args.size == 64:
    args.size = 16
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.serve_peer:
    serve_peer(args)
    return
  if args.meshes and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    sizes = [math.prod(int(n) for n in m.split("x")) for m in args.meshes.split(",")]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={max(sizes)}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from bench import train as bench_train  # pylint: disable=g-import-not-at-top
  from models import count_params  # pylint: disable=g-import-not-at-top
  from models import sd_unet  # pylint: disable=g-import-not-at-top

  spec = QUICK if args.quick else SD15
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  dtypes = args.dtypes.split(",")
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtypes: {dtype!r} is not one of float32, bfloat16.")
  if args.peer:
    args.peer_python = args.peer_python or bench_train.default_peer_python()
    if not args.peer_python:
      raise SystemExit("--peer needs a Python with torch and diffusers: --peer_python or $PEER_PYTHON.")
  results = {"bench": "sd_unet", "args": vars(args), "model": spec, "device": bench_train.device_info()}
  print(json.dumps(results["device"]))
  if args.meshes:
    results["rows"] = run_meshes(args, spec)
    print_mesh_table(results["rows"], f"SD UNet ({args.size}x{args.size}x4 latents), bytes per device, "
                     f"{results['device']['device_kind']}")
    print(f"wrote {bench_train.write_json(results, 'sd_unet-meshes', args.out)}")
    return

  model = sd_unet.SDUNet(**spec)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                          {"context": jnp.zeros((1, 1, spec["cross_attention_dim"]))})["params"]
  results["num_params"] = count_params(shapes)
  params = jax.device_put(random_params(shapes))
  rows = []
  for dtype in dtypes:
    for batch in batch_sizes:
      rows.append(run_ours(args, spec, batch, dtype, params))
      print(json.dumps(rows[-1]))
  del params
  gc.collect()
  if args.peer:
    for dtype in dtypes:
      for batch in batch_sizes:
        rows.append(run_peer(args, spec, batch, dtype))
        print(json.dumps(rows[-1]))
  results["rows"] = rows
  results["device"]["load_average_end"] = os.getloadavg()
  print_table(rows, f"SD UNet forward, {results['num_params']:,} parameters, {args.size}x{args.size}x4 "
              f"latents, context [B, {CONTEXT_LENGTH}, {spec['cross_attention_dim']}], "
              f"{results['device']['device_kind']}")
  path = bench_train.write_json(results, "sd_unet", args.out)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
