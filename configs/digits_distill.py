"""Progressive distillation of the digits demo (configs/digits.py) down to 4, 2 and 1 DDIM steps.

One round per run, each with the previous round's workdir as teacher (README, "Progressive
distillation"); the first round's teacher steps 8 times:

  teacher=runs/digits
  for n in 4 2 1; do
    python main.py --config=configs/digits_distill.py --workdir=runs/digits_pd$n \
      --config.distill.teacher=$teacher --config.distill.student_steps=$n
    teacher=runs/digits_pd$n
  done
"""

from configs import digits


def get_config():
  config = digits.get_config()  # The teacher's model, process and data: the student starts from it.
  config.distill.method = "progressive"
  config.distill.teacher = "runs/digits"
  config.distill.student_steps = None  # Given per round on the command line: 32, 16, ..., 1.
  config.distill.weighting = "truncated_snr"

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 20
  config.optim.ema_decay = 0.99

  config.training.num_steps = 250  # One round: about 4 minutes on two CPU cores.
  config.training.log_every = 50
  config.training.sample_every = 250
  config.training.checkpoint_every = 125

  # How the student is sampled: DDIM on its own grid of student_steps steps, x0 not clipped. None
  # steps: --mode=sample takes the run's own (its student_steps).
  config.sample.sampler = "ddim"
  config.sample.grid = "trailing"
  config.sample.clip_x0 = False
  config.sample.steps = None
  return config
