"""In-run A/B of the cifar10 UNet train step at batch 8, fp32: flax's nn.GroupNorm + SiLU and optax's chain + EMA (before), the fused GroupNorm + SiLU (models/layers.py), and that with the fused AdamW + EMA (training/adamw.py); with the PyTorch peer (eager), in alternating rounds.

  python bench/fused_ab.py STEPS ROUNDS OUT.json   (e.g. 16 8 bench/results/cpu-...-fused-ab-b8.json)
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json, sys, contextlib, numpy as np, flax.linen as nn
from bench import train as bt
from models import layers
from training import train_step as ts

class FlaxGroupNorm(nn.GroupNorm):
  silu: bool = False
  def __call__(self, x):
    y = super().__call__(x)
    return nn.silu(y) if self.silu else y

def flax_group_norm(channels, dtype, name=None, *, silu=False):
  return FlaxGroupNorm(num_groups=layers.num_groups(channels), epsilon=1e-6, dtype=dtype, name=name, silu=silu)

fused_create = ts.create_optimizer
def optax_create(c):
  tx, lr = fused_create(c)
  return tx.optax(), lr

@contextlib.contextmanager
def patched(gn, opt):
  old = layers.group_norm, ts.create_optimizer
  layers.group_norm, ts.create_optimizer = gn, opt
  try: yield
  finally: layers.group_norm, ts.create_optimizer = old

steps, rounds = int(sys.argv[1]), int(sys.argv[2])
base = bt.load_config("configs/cifar10.py")
cpu = bt.apply_cpu_setting("config", base, [8])
results = {"device": {**bt.device_info(), "cpu_setting": cpu}}
runners = {}
for name, gn, opt in (("before", flax_group_norm, optax_create), ("fused_gn", layers.group_norm, optax_create),
                      ("fused_gn_adam", layers.group_norm, fused_create)):
  with patched(gn, opt):
    runners[name] = bt.OursTrain(base, batch=8)
  print(name, "compiled", runners[name].compile_s, flush=True)
peer = bt.start_peer("/work/main/.venv-ref/bin/python", base, 3, batch=8, dtype="float32",
                     args=("--mode", "train", *bt.PEERS["peer_eager"]))
runners["peer_eager"] = peer
times, medians = bt.alternate(runners, steps=steps, rounds=rounds)
peer.close()
out = {"steps": steps, "rounds": rounds, "load_average_end": list(__import__("os").getloadavg()),
       "device": results["device"], "per_round_medians": medians,
       "median_step_s": {k: float(np.median(v)) for k, v in times.items()},
       "ratio_vs_peer": {k: bt.round_ratio(medians, k, "peer_eager") for k in runners if k != "peer_eager"},
       "speedup_vs_before": {k: float(np.median([m["before"] / m[k] for m in medians])) for k in runners}}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[3], "w"), indent=1)
