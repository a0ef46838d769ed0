"""Trains and samples diffusion models, and trains their KL autoencoders.

This file is intentionally kept short: the logic lives in libraries that can be imported in a notebook.

  python main.py --config=configs/digits.py --workdir=runs/digits
  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 --config.training.batch_size=256
"""

import logging as logging_std
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from training import distributed
from training import xla_cpu

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, event files and samples; rerun to resume.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "fid_stats", "eval", "encode"],
                  "train: train or resume in workdir; sample: draw config.sample.num images from its "
                  "latest (or config.sample.checkpoint_step) checkpoint into workdir/samples; fid_stats: "
                  "Inception statistics of config.data's split; eval: FID, IS (and NLL) of every "
                  "checkpoint not yet evaluated, into workdir/eval/metrics.jsonl (an autoencoder's: "
                  "PSNR, rFID, LPIPS of held-out reconstructions); encode: write the posteriors of "
                  "config.data.split under config.latent.autoencoder to config.latent.cache.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(SLURM and Cloud TPU pods are detected without it).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message is the whole story; any other exception also shows its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)


class _QuietLibraries(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; its warnings and errors still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before any JAX computation: XLA reads these when its CPU backend starts.
  applied = xla_cpu.configure_from_config(FLAGS.config, num_processes=FLAGS.num_processes or 1)
  if applied:
    logging.info("XLA:CPU settings from config.cpu: %s", applied)
  distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  distributed.quiet_other_processes()
  # Compiled programs persist across runs: a resumed or repeated run skips most compilation.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jax-compilation-cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  # One line: the config file and the overrides (the whole config goes to workdir/config.json and
  # beside each checkpoint; --verbosity=1 logs it here too).
  logging.info("Config %s with overrides %s", config_flags.get_config_filename(FLAGS["config"]),
               config_flags.get_override_values(FLAGS["config"]) or "none")
  logging.vlog(1, "Config:\n%s", FLAGS.config)
  # Imported after jax.distributed is initialised.
  from evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from evaluation import fid  # pylint: disable=g-import-not-at-top
  from training import checkpoints  # pylint: disable=g-import-not-at-top
  from training import latent_cache  # pylint: disable=g-import-not-at-top
  from training import sample  # pylint: disable=g-import-not-at-top
  from training import tasks  # pylint: disable=g-import-not-at-top
  from training import train  # pylint: disable=g-import-not-at-top

  modes = {"train": train.train, "sample": sample.sample, "fid_stats": fid.compute_reference_stats,
           "eval": evaluate.evaluate, "encode": latent_cache.encode_split}
  if FLAGS.config.model.name == "autoencoder":
    modes.update(tasks.AUTOENCODER_MODES)  # sample and eval reconstruct held-out images.
  try:
    checkpoints.check_workdir(FLAGS.workdir)
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)
  except EXPECTED_ERRORS as e:
    # A bad config, a checkpoint that does not fit, a missing or unreadable file, a bad workdir: the
    # message says what to do, so it is all that is printed (--verbosity=1 adds the traceback).
    logging.vlog(1, "Traceback:", exc_info=True)
    sys.stderr.write(f"Error: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
