"""Every test runs on CPU with 8 forced host devices, so sharding is exercised everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import jax  # pylint: disable=g-import-not-at-top

# Compiled programs are cached across runs and clones (reruns are then mostly cache hits).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.expanduser("~/.cache/jax-compilation-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny class-conditional run (p_uncond 0.2) trained 2 steps: sampled, and a distillation teacher."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from training import train as train_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.model.num_classes = 10
  config.diffusion.p_uncond = 0.2
  config.training.num_steps = 2
  train_lib.train(config, workdir)
  return workdir
