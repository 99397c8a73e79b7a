"""hypergrad: verified hypergradients of fixed-point maps, hypertorch-compatible.

    min_lambda E(w(lambda), lambda),   w(lambda) = Phi(w(lambda), lambda)

``hypergrad.cg(params, hparams, K, fp_map, outer_loss)`` returns dE/dlambda (and adds it to
``hparam.grad``); [`hypergradient`][hypergrad.hypergradient] is the general entry with a choice of solver and
diagnostics. [`FixedPointLayer`][hypergrad.FixedPointLayer] (and [`custom_root`][hypergrad.custom_root],
[`custom_fixed_point`][hypergrad.custom_fixed_point]) return w(lambda) as tensors in the caller's graph:
``loss.backward()``, ``torch.func`` transforms and every order of derivative are implicit.
"""
from .errors import (BreakdownError, ConvergenceError, DivergenceError, FixedPointWarning, HypergradError, NonFiniteError,
                     NotAFixedPointError, SingularSystemError)
from . import distributed
from .batched import BATCHED_SOLVERS, BatchedHypergradResult, BatchedSolveInfo, batched_hypergradient
from .checkpointed import (CheckpointedResult, NondeterministicMapError, checkpoint_steps,
                           checkpointed_hypergradient, reverse_checkpointed)
from .functional import functional, load_params, module_params, param_dict
from .hypergradients import (CG, CG_normaleq, HypergradResult, cg, cg_normaleq, exact, fixed_point, gmres,
                             get_outer_gradients, grad_unused_zero, cat_list_to_tensor, update_tensor_grads,
                             hypergradient, minres, neumann, reverse, reverse_unroll, stoch_AID)
from .inner_optimizers import (DifferentiableOptimizer, GradientDescent, HeavyBall, Momentum, gd_step,
                               heavy_ball_step, torch_momentum_step)
from ._hypertorch_helpers import grd, jvp, list_dot
from . import CG_torch, diff_optimizers, hypergradients, inner_optimizers, linear_solvers
from .linear_solvers import SOLVERS, SolveInfo, default_rtol
from .forward_solvers import FORWARD_SOLVERS, ForwardInfo, anderson, fixed_point_iteration
from .layer import FixedPointLayer, ImplicitLayer, custom_fixed_point, custom_root, fixed_point_solve

from ._version import __version__

__all__ = [
    "hypergradient", "HypergradResult", "SolveInfo", "SOLVERS",
    "batched_hypergradient", "BatchedHypergradResult", "BatchedSolveInfo", "BATCHED_SOLVERS",
    "reverse_unroll", "reverse", "fixed_point", "CG", "cg", "CG_normaleq", "cg_normaleq", "neumann",
    "minres", "gmres", "exact", "stoch_AID",
    "reverse_checkpointed", "checkpointed_hypergradient", "CheckpointedResult", "checkpoint_steps",
    "NondeterministicMapError",
    "DifferentiableOptimizer", "GradientDescent", "HeavyBall", "Momentum",
    "gd_step", "heavy_ball_step", "torch_momentum_step", "grd", "jvp", "list_dot", "CG_torch",
    "module_params", "param_dict", "functional", "load_params",
    "update_tensor_grads", "get_outer_gradients", "grad_unused_zero", "cat_list_to_tensor",
    "HypergradError", "NonFiniteError", "DivergenceError", "BreakdownError", "SingularSystemError",
    "NotAFixedPointError", "FixedPointWarning", "ConvergenceError", "default_rtol",
    "FixedPointLayer", "ImplicitLayer", "custom_fixed_point", "custom_root", "fixed_point_solve",
    "FORWARD_SOLVERS", "ForwardInfo", "anderson", "fixed_point_iteration",
]
