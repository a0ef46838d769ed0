"""The digits FD (evaluation/digits_fd.py) of samples files or of a checkpoint; prints a table, writes JSON.

  python bench/digits_fd.py --npz runs/digits/samples/step1000_ddim_50steps_w1_seed0.npz
  python bench/digits_fd.py --workdir runs/digits --samplers ddim:50,dpmpp_2m:10,unipc:5,unipc3:8 \
    [--grid_file unipc:5=runs/digits/grids/unipc_5.json]

With --workdir each sampler:steps draws the images itself from the EMA parameters of the latest
checkpoint (seed 0, classes 0..9 in turn, as --mode=sample).

Quality against model calls (NFE, not steps: a Heun step costs 2 calls, its last 1): with --nfe every
sampler of --samplers (names; "all": every sampler of diffusion/samplers.py) runs at the most steps
that fit in each budget, and each --students NAME=WORKDIR:SAMPLER:STEPS[,STEPS...] (a distilled
student, sampled at its own step counts) adds a row:

  python bench/digits_fd.py --workdir runs/digits --nfe 1,2,4,8,16,50 \
    [--students pd=runs/digits_pd:ddim:1,2,4 cm=runs/digits_cm:SAMPLER:1,2,4]
 A .npz must hold at least as many images
as the metric's floor set (449 at 16x16; --config.sample.num=449 or more). The floor is the score of
held-out real digits; lower is better, the floor is the best a generator can expect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from diffusion import grids  # pylint: disable=wrong-import-position
from diffusion import samplers  # pylint: disable=wrong-import-position
from evaluation import digits_fd  # pylint: disable=wrong-import-position
from evaluation import run as run_lib  # pylint: disable=wrong-import-position


def score_workdir(metric: digits_fd.DigitsFD, workdir: str, runs: list[tuple[str, int]], *,
                  grid_files: dict[tuple[str, int], str], seed: int = 0, batch_size: int = 150) -> list[dict]:
  """The FD of `metric.num` images drawn by each (sampler, steps) from the latest checkpoint of workdir."""
  config, state, model, schedule = run_lib.load_run(workdir)
  shape = run_lib.image_shape(workdir, int(state.step))
  rows = []
  for name, steps in runs:
    grid_file = grid_files.get((name, steps))
    timesteps = grids.read_grid_file(grid_file, steps=steps) if grid_file else None
    sampler = run_lib.make_sampler(config, model, schedule, image_shape=shape, sampler=name, steps=steps,
                                   grid=None, timesteps=timesteps, batch_size=batch_size)
    start = time.perf_counter()
    images, _ = sampler.sample(state.ema_params, seed=seed, num=metric.num)
    rows.append({"sampler": name, "steps": steps, "nfe": samplers.num_evaluations(name, steps),
                 "grid": "file" if grid_file else samplers.default_grid(name, schedule),
                 "grid_file": grid_file, "fd": metric.score(images), "checkpoint_step": int(state.step),
                 "seconds": time.perf_counter() - start})
    print(f"{name:12s} {steps:5d} {rows[-1]['grid']:9s} FD {rows[-1]['fd']:8.2f}", flush=True)
  return rows


def parse_student(spec: str) -> tuple[str, str, str, list[int]]:
  """(name, workdir, sampler, steps) of --students NAME=WORKDIR:SAMPLER:STEPS[,STEPS...]."""
  try:
    name, rest = spec.split("=", 1)
    workdir, sampler, steps = rest.rsplit(":", 2)
    steps_list = [int(s) for s in steps.split(",")]
  except ValueError:
    raise ValueError(f"--students {spec!r} is not NAME=WORKDIR:SAMPLER:STEPS[,STEPS...], "
                     "e.g. pd=runs/digits_pd:ddim:1,2,4.") from None
  samplers.get_sampler(sampler)
  if not os.path.isdir(workdir):
    raise ValueError(f"--students {spec!r}: the workdir {workdir!r} does not exist.")
  return name, workdir, sampler, steps_list


def nfe_table(metric: digits_fd.DigitsFD, workdir: str, *, names: list[str], budgets: list[int],
              students: list[tuple[str, str, str, list[int]]]) -> dict:
  """FD of each sampler at the most steps within each NFE budget; each student at its own steps."""
  runs = sorted({(n, samplers.max_steps(n, b)) for n in names for b in budgets},
                key=lambda run: (names.index(run[0]), run[1]))
  rows = {(r["sampler"], r["steps"]): r for r in score_workdir(metric, workdir, runs, grid_files={})}
  table = {"budgets": budgets, "teacher": {
      n: {str(b): rows[(n, samplers.max_steps(n, b))] for b in budgets} for n in names}, "students": {}}
  for name, student_dir, sampler, steps_list in students:
    student_rows = score_workdir(metric, student_dir, [(sampler, s) for s in steps_list], grid_files={})
    table["students"][name] = {"workdir": student_dir, "sampler": sampler, "rows": student_rows}
  return table


def _cell(row: dict, budget: int) -> str:
  """A row's FD, with its NFE in brackets where its steps take fewer calls than the budget."""
  return (f"({row['nfe']}) " if row["nfe"] < budget else "") + f"{row['fd']:.2f}"


def print_nfe_table(table: dict, floor: float) -> None:
  budgets = table["budgets"]
  print(f"\ndigits FD (floor {floor:.2f}) against model calls (NFE); (k): the steps take k < NFE calls")
  print(f"{'sampler':22s}" + "".join(f"{b:>12d}" for b in budgets))
  for name, cells in table["teacher"].items():
    print(f"{name:22s}" + "".join(f"{_cell(cells[str(b)], b):>12s}" for b in budgets))
  for name, student in table["students"].items():
    by_nfe = {r["nfe"]: r for r in student["rows"]}
    label = f"{name} ({student['sampler']})"
    print(f"{label:22s}" + "".join(f"{_cell(by_nfe[b], b) if b in by_nfe else '':>12s}" for b in budgets))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--npz", nargs="*", default=[], help="samples files written by --mode=sample")
  parser.add_argument("--workdir", help="a trained digits workdir to draw samples from")
  parser.add_argument("--samplers", default=None,
                      help="sampler:steps,... for --workdir (default ddim:50); with --nfe sampler names "
                      "or 'all' (the default)")
  parser.add_argument("--nfe", help="NFE budgets, e.g. 1,2,4,8,16,50: the quality-vs-NFE table")
  parser.add_argument("--students", nargs="*", default=[],
                      help="with --nfe: NAME=WORKDIR:SAMPLER:STEPS[,STEPS...] rows of distilled students")
  parser.add_argument("--grid_file", nargs="*", default=[], help="sampler:steps=PATH: that run's grid file")
  parser.add_argument("--image_size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0, help="the classifier's seed")
  parser.add_argument("--cache_dir", default=digits_fd.DEFAULT_CACHE)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "digits_fd.json"))
  args = parser.parse_args(argv)
  if not args.npz and not args.workdir:
    parser.error("give --npz files or a --workdir")
  metric = digits_fd.DigitsFD.create(args.image_size, seed=args.seed, cache_dir=args.cache_dir)
  result = {"image_size": args.image_size, "classifier_seed": args.seed, "num": metric.num,
            "classifier_test_accuracy": metric.test_accuracy, "floor": metric.floor(), "rows": []}
  print(f"digits FD at {args.image_size}px on {metric.num} images; held-out accuracy "
        f"{metric.test_accuracy:.3f}; floor (held-out real digits) {result['floor']:.2f}")
  for path in args.npz:
    with np.load(path) as f:
      fd = metric.score(f["images"])
    result["rows"].append({"npz": path, "fd": fd})
    print(f"{path}: FD {fd:.2f}")
  if args.nfe:
    if not args.workdir:
      parser.error("--nfe needs --workdir")
    # "all": every sampler of a diffusion model (the consistency sampler draws only consistency models).
    names = ([n for n in samplers.SAMPLERS if n != "consistency"] if args.samplers in (None, "all")
             else args.samplers.split(","))
    for name in names:
      samplers.get_sampler(name)
    students = [parse_student(spec) for spec in args.students]
    result["workdir"] = args.workdir
    result["nfe_table"] = nfe_table(metric, args.workdir, names=names,
                                    budgets=[int(b) for b in args.nfe.split(",")], students=students)
    print_nfe_table(result["nfe_table"], result["floor"])
  elif args.workdir:
    runs = [(s.split(":")[0], int(s.split(":")[1])) for s in (args.samplers or "ddim:50").split(",")]
    grid_files = {}
    for item in args.grid_file:
      key, path = item.split("=", 1)
      grid_files[(key.split(":")[0], int(key.split(":")[1]))] = path
    result["workdir"] = args.workdir
    result["rows"] += score_workdir(metric, args.workdir, runs, grid_files=grid_files)
  result["devices"] = jax.device_count()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
