"""Exceptions and warnings of the constrained layer. Each names the constraint(s) or status at fault."""
from __future__ import annotations

from typing import Optional


class ConstrainedError(RuntimeError):
    """Base class of the failures the constrained layer detects."""


class InnerSolveError(ConstrainedError):
    """The inner solver did not return a solution (infeasible, unbounded, failed); ``status`` says which."""

    def __init__(self, message: str, status: Optional[str]):
        super().__init__(message)
        self.status = status


class InaccurateSolveError(InnerSolveError):
    """The solver returned a point that is not a KKT point to the tolerance: the solve is inaccurate.

    The torch model agrees with the cvxpy model (values and derivatives); ``residuals`` has the measured
    KKT residuals. Tighten the solver's tolerances."""

    def __init__(self, message: str, status: Optional[str], residuals: Optional[dict] = None):
        super().__init__(message, status)
        self.residuals = dict(residuals or {})


class CvxpyProblemError(ConstrainedError):
    """cvxpy refused the problem while building or solving it.

    Not DCP / DPP, a parameter value outside its declared set, ...; the message names the problem and the
    fix, the cvxpy error is the ``__cause__``."""


class KKTError(ConstrainedError):
    """The given primal-dual pair is not a KKT point, so the implicit function theorem does not apply.

    Stationarity, feasibility, the sign of the multipliers or complementarity fails beyond the tolerance.
    ``residuals``: the measured KKT residuals (stationarity, stationarity_rel, primal_feasibility, ...)."""

    def __init__(self, message: str, residuals: Optional[dict] = None):
        super().__init__(message)
        self.residuals = dict(residuals or {})


class DegenerateConstraintError(KKTError):
    """A constraint has multiplier and slack both ~0 (strict complementarity fails) under ``degenerate="error"``.

    The solution map has only one-sided derivatives there."""


class ModelMismatchError(ConstrainedError):
    """The torch definition of the inner problem disagrees with the cvxpy model it is checked against."""


class DegenerateConstraintWarning(UserWarning):
    """Degenerate constraints were found and handled by the ``degenerate=`` policy (a one-sided derivative)."""


class LICQWarning(UserWarning):
    """The gradients of the active and equality constraints are linearly dependent (LICQ fails).

    The multipliers are not unique and the KKT matrix is singular; the primal part of the derivative still
    is unique."""


class NotConvergedWarning(UserWarning):
    """The iterative solve for the adjoint stopped at its iteration limit above the tolerance."""
