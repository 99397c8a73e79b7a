"""constrained: hypergradients of constrained inner problems through the KKT fixed-point map.

    y*(x) = argmin_y g(x, y)  s.t.  p(x, y) <= 0,  q(x, y) = 0          (Xu & Zhu, AAAI 2023)

``hypergradient(problem, params, hparams, outer_loss, mu, nu)`` differentiates ``outer_loss`` through
y*(x) given a primal-dual solution (from [`solve_cvxpy`][constrained.solve_cvxpy], a
[`DualLayer`][constrained.DualLayer] batch, or any solver). Built on ``hypergrad``'s linear solvers (dense / MINRES for
the symmetric indefinite KKT matrix).
"""
from hypergrad._version import __version__
from .batch import BatchResult, batch_hypergradient
from .cvxpy_bridge import CvxpySolution, DualLayer, LayerSolution, check_model, solve_cvxpy, split_constraints
from .errors import (ConstrainedError, CvxpyProblemError, DegenerateConstraintError, DegenerateConstraintWarning,
                     InaccurateSolveError, InnerSolveError, KKTError, LICQWarning, ModelMismatchError,
                     NotConvergedWarning)
from .hypergradients import ConstrainedResult, hypergradient
from .kkt import KKTMap, KKTReport, analyze, kkt_map
from .problem import ConstrainedProblem

__all__ = [
    "ConstrainedProblem", "kkt_map", "analyze", "KKTMap", "KKTReport", "hypergradient", "ConstrainedResult",
    "batch_hypergradient", "BatchResult", "solve_cvxpy", "CvxpySolution", "DualLayer", "LayerSolution",
    "split_constraints", "check_model", "ConstrainedError", "CvxpyProblemError", "InaccurateSolveError",
    "InnerSolveError", "KKTError", "DegenerateConstraintError",
    "ModelMismatchError", "DegenerateConstraintWarning", "LICQWarning", "NotConvergedWarning",
]
