"""The PyTorch peer: diffusers' UNet2DModel built like our UNet, trained and sampled as ours is.

Runs in its own environment (requirements-bench.txt: torch, diffusers, numpy; no jax). The bench
harnesses (bench/train.py --peer, bench/sample.py --peer) start it with --serve and alternate with
ours: each request "run N" answers one JSON line with N timed steps, so both sides stay warm and the
machine's noise falls on both alike. Alone it prints one JSON line of results:

  python bench/peer_torch.py --mode train --batch 8 --steps 20 [--compile]
  python bench/peer_torch.py --mode sample --sampler dpmpp_2m --sample_steps 20 --batch 64
  python bench/peer_torch.py --mode convs < specs.json   # bench/convs.py's convolutions, one by one

The model is the google/ddpm-cifar10-32 configuration for our cifar10 config (35,746,307 parameters,
the same as ours); the train step is ours: eps MSE at t ~ U{0..T-1} of the linear schedule, Adam 2e-4
with linear warm-up, global-norm clip 1.0, EMA of the parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

try:  # A torchvision wheel built for another torch fails to load; diffusers then must not import it.
  import torchvision  # pylint: disable=unused-import
except Exception:  # pylint: disable=broad-except
  sys.modules["torchvision"] = None  # importlib.util.find_spec then reports it absent.
import diffusers  # pylint: disable=g-import-not-at-top,wrong-import-position

CIFAR10_MODEL = {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
                 "num_heads": 1, "dropout": 0.1, "image_size": 32, "channels": 3}


def num_groups(channels: int, max_groups: int = 32) -> int:
  """models/layers.py's GroupNorm group count, for the narrowest width (diffusers takes one count)."""
  upper = max(min(max_groups, channels // 2), 1)
  return next(g for g in range(upper, 0, -1) if channels % g == 0)


def create_unet(spec: dict) -> diffusers.UNet2DModel:
  """UNet2DModel with the widths, depths, attention levels and DDPM details of our UNet."""
  levels = len(spec["ch_mult"])
  widths = [spec["ch"] * m for m in spec["ch_mult"]]
  attn = [spec["image_size"] // 2**i in spec["attn_resolutions"] for i in range(levels)]
  head_dim = None if spec["num_heads"] == 1 else widths[0] // spec["num_heads"]
  return diffusers.UNet2DModel(
      sample_size=spec["image_size"], in_channels=spec["channels"], out_channels=spec["channels"],
      block_out_channels=widths, layers_per_block=spec["num_res_blocks"],
      down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, dropout=spec["dropout"],
      attention_head_dim=head_dim, norm_num_groups=num_groups(spec["ch"]), norm_eps=1e-6,
      act_fn="silu", time_embedding_type="positional",
      resnet_time_scale_shift="scale_shift" if spec.get("scale_shift") else "default",
      num_class_embeds=spec["num_classes"] + 1 if spec.get("num_classes") else None)


def linear_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
  betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
  return torch.cumprod(1 - betas, 0).float()


class Trainer:
  """One DDPM train step per call: noise, forward process, model, eps MSE, Adam, clip, EMA."""

  def __init__(self, spec: dict, *, batch: int, device: str, dtype: str, compile_model: bool,
               seed: int = 0):
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.model = create_unet(spec).to(self.device).train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.forward = torch.compile(self.model) if compile_model else self.model
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.Adam(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: min((k + 1) / 5000, 1.0))
    self.alphas_cumprod = linear_alphas_cumprod().to(self.device)
    self.autocast = dtype == "bfloat16"
    shape = (batch, spec["channels"], spec["image_size"], spec["image_size"])
    self.x0 = torch.randn(shape, device=self.device)
    self.num_classes = spec.get("num_classes", 0)

  def _labels(self, batch: int) -> torch.Tensor | None:
    return _random_labels(self.num_classes, batch, self.device)

  def step(self) -> torch.Tensor:
    x0 = self.x0
    t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
    noise = torch.randn_like(x0)
    abar = self.alphas_cumprod[t][:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      out = self.forward(x_t, t, class_labels=self._labels(x0.shape[0])).sample
    loss = torch.mean(torch.square(out.float() - noise))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.sched.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - 0.9999)
    return loss


def _random_labels(num_classes: int, batch: int, device: torch.device) -> torch.Tensor | None:
  return torch.randint(0, num_classes, (batch,), device=device) if num_classes else None


class Sampler:
  """diffusers' scheduler loop around the UNet: DPM-Solver++(2M) or DDPM ancestral."""

  def __init__(self, spec: dict, *, batch: int, device: str, dtype: str, compile_model: bool,
               sampler: str, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.model = create_unet(spec).to(self.device).eval()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.forward = torch.compile(self.model) if compile_model else self.model
    kwargs = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if sampler == "dpmpp_2m":
      self.scheduler = diffusers.DPMSolverMultistepScheduler(
          **kwargs, algorithm_type="dpmsolver++", solver_order=2)
    elif sampler == "ddpm":
      self.scheduler = diffusers.DDPMScheduler(**kwargs)
    else:
      raise ValueError(f"sampler={sampler!r} is not one of dpmpp_2m, ddpm.")
    self.steps = steps
    self.autocast = dtype == "bfloat16"
    self.shape = (batch, spec["channels"], spec["image_size"], spec["image_size"])
    self.num_classes = spec.get("num_classes", 0)

  @torch.inference_mode()
  def step(self) -> torch.Tensor:
    """One sampling run of a whole batch (the "step" the harness times)."""
    self.scheduler.set_timesteps(self.steps, device=self.device)
    x = torch.randn(self.shape, device=self.device)
    labels = _random_labels(self.num_classes, self.shape[0], self.device)
    for t in self.scheduler.timesteps:
      with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
        eps = self.forward(x, t, class_labels=labels).sample
      x = self.scheduler.step(eps.float(), t, x).prev_sample
    return x.clamp(-1, 1)


def _sync(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def timed_steps(runner, n: int, device: str) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    out = runner.step()
    if torch.is_tensor(out):
      out.item() if out.numel() == 1 else out.sum().item()  # Waits for the result, as ours does.
    _sync(device)
    times.append(time.perf_counter() - start)
  return times


def peak_memory_bytes(device: str) -> tuple[int, str]:
  if device.startswith("cuda"):
    return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
  with open("/proc/self/status") as f:  # VmHWM: unlike ru_maxrss, not inherited from the harness.
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")), "process peak RSS"


def time_convs(specs: list[dict], *, device: str, runs: int) -> list[dict]:
  """Median ms of forward, input gradient and weight gradient of each convolution alone (bench/convs.py).

  A spec is NHWC / HWIO shapes, strides and (low, high) padding per spatial axis, as our jaxpr has them.
  Uneven padding (a stride-2 downsampling's (0, 1)) is applied to the input first, as diffusers does.
  """
  results = []
  for spec in specs:
    n, h, w, cin = spec["lhs"]
    kh, kw, _, cout = spec["rhs"]
    (pt, pb), (pl, pr) = spec["padding"]
    x = torch.randn(n, cin, h + pt + pb, w + pl + pr, device=device)
    weight = torch.randn(cout, cin, kh, kw, device=device) * 0.05
    y = torch.nn.functional.conv2d(x, weight, stride=spec["strides"])
    g = torch.randn_like(y)
    grads = {"input_grad": [True, False, False], "weight_grad": [False, True, False]}

    def backward(mask):
      return torch.ops.aten.convolution_backward(g, x, weight, None, spec["strides"], [0, 0], [1, 1],
                                                 False, [0, 0], 1, mask)

    calls = {"forward": lambda: torch.nn.functional.conv2d(x, weight, stride=spec["strides"]),
             **{k: (lambda m=m: backward(m)) for k, m in grads.items()}}
    row = {}
    with torch.no_grad():
      for name, call in calls.items():
        call()
        times = []
        for _ in range(runs):
          _sync(device)
          start = time.perf_counter()
          call()
          _sync(device)
          times.append(time.perf_counter() - start)
        row[name] = float(np.median(times)) * 1e3
    results.append(row)
  return results


def build(args: argparse.Namespace):
  spec = json.loads(args.model) if args.model else CIFAR10_MODEL
  common = dict(batch=args.batch, device=args.device, dtype=args.dtype, compile_model=args.compile)
  if args.mode == "train":
    return Trainer(spec, **common)
  return Sampler(spec, **common, sampler=args.sampler, steps=args.sample_steps)


def describe(args: argparse.Namespace, runner, compile_s: float) -> dict:
  memory, memory_kind = peak_memory_bytes(args.device)
  return {"peer": "diffusers.UNet2DModel", "torch": torch.__version__, "diffusers": diffusers.__version__,
          "mode": args.mode, "compiled": args.compile, "dtype": args.dtype, "batch": args.batch,
          "device": args.device, "threads": torch.get_num_threads(), "params": runner.num_params,
          "warmup_s": compile_s, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=("train", "sample", "convs"), default="train",
                      help="convs: time the convolutions given as JSON on stdin (bench/convs.py).")
  parser.add_argument("--model", default="", help="JSON model spec (bench/train.py's peer_spec); cifar10 if empty.")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="Timed steps (alone; --serve takes them per request).")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--compile", action="store_true", help="torch.compile the UNet.")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: autocast (fp32 params, optimizer state and EMA).")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--sampler", choices=("dpmpp_2m", "ddpm"), default="dpmpp_2m")
  parser.add_argument("--sample_steps", type=int, default=20)
  parser.add_argument("--serve", action="store_true", help="Answer 'run N' / 'quit' lines on stdin.")
  args = parser.parse_args(argv)

  if args.device.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = True  # What XLA does for fp32 on Ampere and later.
    torch.backends.cudnn.allow_tf32 = True
  if args.mode == "convs":
    specs = json.loads(sys.stdin.read())
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "convs": time_convs(specs, device=args.device, runs=args.steps)}), flush=True)
    return
  try:
    runner = build(args)
    start = time.perf_counter()
    timed_steps(runner, args.warmup, args.device)  # torch.compile compiles here.
    compile_s = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    # torch.compile needs a C++ compiler and may fail on a machine; the harness reports the reason.
    print(json.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    sys.exit(1 if not args.serve else 0)
  info = describe(args, runner, compile_s)
  if not args.serve:
    times = timed_steps(runner, args.steps, args.device)
    info.update(describe(args, runner, compile_s), times=times, median_s=float(np.median(times)))
    print(json.dumps(info), flush=True)
    return
  print(json.dumps({"ready": True, **info}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    if cmd[0] == "run":
      times = timed_steps(runner, int(cmd[1]), args.device)
      print(json.dumps({"times": times, **describe(args, runner, compile_s)}), flush=True)
    else:
      print(json.dumps({"error": f"unknown request {line.strip()!r}"}), flush=True)


if __name__ == "__main__":
  main()
