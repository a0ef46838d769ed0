"""Ho et al. 2020's CIFAR-10 setup: 35.7M-parameter UNet, linear betas, T = 1000, 800k steps."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True
  # The defaults are the paper's: UNet ch 128, mult (1, 2, 2, 2), 2 res blocks, attention at 16x16,
  # dropout 0.1; linear betas 1e-4 -> 0.02 over T = 1000, eps prediction, the "simple" loss; Adam 2e-4
  # with 5000 warm-up steps, gradient clip 1.0, batch 128, EMA 0.9999, 800k steps.
  return config
