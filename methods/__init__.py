"""Whole bilevel solvers over the core's interface: Implicit, Dynamic (RAD, T-RAD, BDA, IAPTT-GM), BVFIM.

Each algorithm is a function (``implicit_hypergradient``, ``dynamic_hypergradient``, ``bvfim_hypergradient``,
in the modules ``methods.implicit``, ``methods.dynamic``, ``methods.bvfim``) of
``(params, hparams, inner_loss, outer_loss, ...)`` (the hypergrad
convention: y = params, x = hparams, losses of ``(params, hparams)``) returning a result with the
gradients and diagnostics; the classes are thin ``objective(state)`` / ``nn.Module`` adapters over them:

    solver = methods.Implicit(ul_objective, ul_model, ll_objective, ll_model, ll_learning_rate=0.1, k=20)
    for x_batch, y_batch, xv, yv in loader:
        ul_opt.zero_grad()
        loss = solver.compute_gradients(xv, yv, x_batch, y_batch)   # adds to ul_model's .grad
        ul_opt.step()

``methods.stochastic``: the minibatch solvers (SOBA, SABA, SRBA, AmIGO, StocBiO, MRBO, VRBO, F2SA, BOME) and
their deterministic counterparts (FullBatchImplicit, FullBatchRAD) over a [`FiniteSum`][methods.stochastic.FiniteSum]
oracle.
"""
from hypergrad._version import __version__
from ._lower import SGDRule
from .base import BilevelSolver, ModuleView, Result
from . import bvfim, dynamic, implicit  # the modules (the functions are named *_hypergradient)
from .bvfim import BVFIM, BVFIMResult, SlackResolutionError, bvfim_hypergradient
from .dynamic import Dynamic, DynamicResult, dynamic_hypergradient
from .implicit import Implicit, ImplicitResult, implicit_hypergradient
from . import stochastic  # noqa: E402  (after the modules it builds on)

__all__ = ["BilevelSolver", "ModuleView", "Result", "SGDRule",
           "Implicit", "ImplicitResult", "implicit_hypergradient",
           "Dynamic", "DynamicResult", "dynamic_hypergradient",
           "BVFIM", "BVFIMResult", "bvfim_hypergradient", "SlackResolutionError", "stochastic"]
