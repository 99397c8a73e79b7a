"""hypertorch's module path for the inner optimizers and their step functions (see ``hypergrad.inner_optimizers``)."""
from .inner_optimizers import (DifferentiableOptimizer, GradientDescent, HeavyBall, Momentum,  # noqa: F401
                               gd_step, heavy_ball_step, torch_momentum_step)
