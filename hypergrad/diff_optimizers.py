"""Alias module: older hypertorch code imports the inner optimizers from ``hypergrad.diff_optimizers``."""
from .inner_optimizers import *  # noqa: F401,F403
from .inner_optimizers import DifferentiableOptimizer, GradientDescent, HeavyBall, Momentum  # noqa: F401
