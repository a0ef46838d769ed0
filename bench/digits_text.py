"""Checks the two-digit text toy (configs/digits_text.py): do samples show the digits their prompt names?

  python bench/digits_text.py --workdir=runs/digits_text [--repeats=2] [--guidance_scale=2]

Samples every ordered pair's prompt "a L left of a R" (100 prompts, --repeats seeds each) from the
run's latest EMA parameters, crops each canvas's left and right digit and classifies them with the MLP
of evaluation/digits_fd.py trained on the digits two_digits' "train" canvases are made of. Reports the
share of samples whose both digits match the prompt (chance 1 %), each side's accuracy, the share with
the two digits swapped, and the classifier's own both-digits accuracy on real "test" canvases (held-out
digit images): the ceiling. Prints a table, writes bench/results/<device>-<date>-digits-text.json and a
grid PNG, one prompt per row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from evaluation import digits_fd
from evaluation import run as run_lib
from input_pipeline import sources
from training import text as text_lib
from training import writers
# pylint: enable=g-import-not-at-top,wrong-import-position


def crops(canvases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(left digits, right digits), uint8 [n, S/2, S/2, 1], of two_digits canvases [n, S, S, 1]."""
  half = canvases.shape[1] // 2
  rows = canvases[:, half // 2:half // 2 + half]
  return rows[:, :, :half], rows[:, :, half:]


def classifier(half: int) -> tuple[dict, float]:
  """MLP params trained on the digit images of two_digits' "train" canvases, and its accuracy on the rest."""
  images, labels = digits_fd.digits(half)
  n = sources.TWO_DIGITS_TRAIN
  params = digits_fd.train_classifier(images[:n], labels[:n])
  return params, float(np.mean(classify(params, images[n:]) == labels[n:]))


def classify(params: dict, digits: np.ndarray) -> np.ndarray:
  logits, _ = digits_fd.Classifier().apply({"params": params}, digits_fd.to_model_input(digits))
  return np.argmax(np.asarray(logits), -1)


def both_match(params, canvases, left, right) -> dict[str, float]:
  """Shares of canvases whose left / right / both digits are (left, right), and with the two swapped."""
  a, b = crops(canvases)
  pa, pb = classify(params, a), classify(params, b)
  return {"both": float(np.mean((pa == left) & (pb == right))), "left": float(np.mean(pa == left)),
          "right": float(np.mean(pb == right)),
          "swapped": float(np.mean((pa == right) & (pb == left) & (left != right)))}


def labelled_grid(images: np.ndarray, prompts: list[str], *, cols: int, scale: int = 4) -> np.ndarray:
  """uint8 RGB grid: one row per prompt (written at its left), its cols samples beside it."""
  grid = writers.image_grid(images, cols=cols)
  grid = np.asarray(Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).convert("RGB")
                    .resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST))
  row = grid.shape[0] // len(prompts)
  canvas = Image.new("RGB", (grid.shape[1] + 140, grid.shape[0]), "white")
  canvas.paste(Image.fromarray(grid), (140, 0))
  draw = ImageDraw.Draw(canvas)
  for i, prompt in enumerate(prompts):
    draw.text((4, i * row + row // 2 - 5), prompt, fill="black")
  return np.asarray(canvas)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--repeats", type=int, default=2, help="Samples (seeds) per ordered pair.")
  parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the run's config.")
  parser.add_argument("--steps", type=int, default=None, help="Sampler steps; default: the run's config.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grid_prompts", type=int, default=10, help="Prompts (rows) of the grid PNG.")
  parser.add_argument("--grid_cols", type=int, default=8, help="Samples per prompt in the grid PNG.")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  config, state, model, schedule = run_lib.load_run(args.workdir)
  text = text_lib.create_conditioning(config)
  shape = run_lib.image_shape(args.workdir)
  overrides = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("steps", args.steps))
               if v is not None}
  sampler = run_lib.make_sampler(config, model, schedule, image_shape=shape, **overrides)

  def draw(prompts, seed):
    params, cond, null = text.sampling_inputs(state.ema_params, prompts)
    return sampler.sample(params, seed=seed, num=len(prompts), cond=cond, null=null)[0]

  pairs = np.array([(a, b) for a in range(10) for b in range(10)] * args.repeats)
  prompts = [sources.caption(int(a), int(b)) for a, b in pairs]
  start = time.perf_counter()
  images = draw(prompts, args.seed)
  seconds = time.perf_counter() - start

  params, digit_accuracy = classifier(shape[0] // 2)
  generated = both_match(params, images, pairs[:, 0], pairs[:, 1])
  test = sources.TwoDigitsSource(shape[0], "test")
  real = np.stack([test[i]["image"] for i in range(len(test))])
  real_labels = np.array([test[i]["label"] for i in range(len(test))])
  ceiling = both_match(params, real, real_labels // 10, real_labels % 10)

  rng = np.random.default_rng(args.seed)
  grid_pairs = pairs[rng.choice(100, args.grid_prompts, replace=False)]
  grid_prompts = [sources.caption(int(a), int(b)) for a, b in grid_pairs]
  grid_images = draw([p for p in grid_prompts for _ in range(args.grid_cols)], args.seed + 1)

  device = jax.devices()[0].platform
  stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"{device}-{datetime.date.today()}-digits-text")
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  writers.save_png(stem + ".png", labelled_grid(grid_images, grid_prompts, cols=args.grid_cols))
  options = sampler.options
  result = {"bench": "digits_text", "workdir": os.path.abspath(args.workdir), "step": int(state.step),
            "samples": len(images), "prompts": 100, "repeats": args.repeats, "sampler": options.sampler,
            "steps": options.steps, "guidance_scale": options.guidance_scale, "seed": args.seed,
            "sampling_s": seconds, "generated": generated, "ceiling_real_test_canvases": ceiling,
            "classifier_digit_accuracy": digit_accuracy, "chance_both": 0.01, "grid": stem + ".png",
            "device": device, "jax": jax.__version__, "load_average": list(os.getloadavg())}
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  print(f"{'':28s} {'both':>6s} {'left':>6s} {'right':>6s} {'swapped':>8s}")
  for name, r in ((f"samples (step {int(state.step)}, w={options.guidance_scale:g})", generated),
                  ("real test canvases", ceiling)):
    print(f"{name:28s} {r['both']:6.1%} {r['left']:6.1%} {r['right']:6.1%} {r['swapped']:8.1%}")
  print(f"chance (both) 1.0%; classifier digit accuracy {digit_accuracy:.1%}; "
        f"{len(images)} samples in {seconds:.1f} s")
  print(f"{stem}.json, {stem}.png")


if __name__ == "__main__":
  main()
