"""Class-conditional CIFAR-10 for classifier-free guidance (Ho & Salimans 2022): labels dropped 10%."""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10  # Label 10 is the "null" class of the unconditional model.
  config.diffusion.p_uncond = 0.1  # Probability of training on the null label.
  config.sample.guidance_scale = 2.0  # w > 1 trades diversity for fidelity; w = 1 is plain conditional.
  config.sample.num = 100
  config.sample.batch_size = 100
  return config
