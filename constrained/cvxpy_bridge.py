"""Primal-dual pairs from cvxpy (one problem) and cvxpylayers (batches), in the order of ``ineq``/``eq``.

The Lagrangian is always  g + sum_c dual_c . c.expr  for ``expr <= 0`` (Inequality, NonPos) and
``expr == 0`` (Equality, Zero) alike: cvxpy stores ``a <= b`` and ``b >= a`` both as expr = a - b, so the
orientation is never parsed here. Each constraint's entries are flattened in C (row-major) order, like
``torch.reshape(-1)``; the torch-side ``ineq``/``eq`` must list them in that order.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from .errors import CvxpyProblemError, InaccurateSolveError, InnerSolveError, KKTError, ModelMismatchError
from .kkt import KKTReport, analyze
from .model_check import check_derivatives as check_derivatives_fn
from .problem import ConstrainedProblem

INEQ_TYPES = (cp.constraints.Inequality, cp.constraints.NonPos)
EQ_TYPES = (cp.constraints.Equality, cp.constraints.Zero)
DEFAULT_LAYER_ARGS: Dict[str, Any] = {"solve_method": "SCS", "eps": 1e-10, "max_iters": 200_000}
CVXPY_ERRORS = (cp.error.DCPError, cp.error.DGPError, cp.error.DPPError, cp.error.DQCPError, cp.error.ParameterError)
TIGHTER = ("tighten the solver's tolerances, e.g. solver='CLARABEL' with tol_gap_abs=tol_gap_rel=tol_feas=1e-10, "
           "'OSQP' or 'SCS' with eps_abs=eps_rel=1e-10 (and max_iter(s) raised)")


def _describe(problem: cp.Problem) -> str:
    text = " ".join(str(problem).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _cvxpy_error(e: Exception, problem: cp.Problem, doing: str) -> CvxpyProblemError:
    """A cvxpy DCPError/DPPError/ParameterError/... as a library error naming the problem and the fix."""
    hint = {"DCPError": "write it by the DCP rules (problem.is_dcp() must be True; minimize a convex objective)",
            "DPPError": "parameters must enter by the DPP rules (problem.is_dpp()): e.g. multiply a parameter only "
                        "by parameter-free expressions",
            "ParameterError": "give every cvxpy parameter a value (list it in parameters)"}.get(
        type(e).__name__, "check the problem's definition")
    said = " ".join(str(e).split())
    return CvxpyProblemError(f"cvxpy refused the problem while {doing} ({type(e).__name__}: {said}); problem: "
                             f"{_describe(problem)}; {hint}")


@dataclass
class CvxpySolution:
    """The result of [`solve_cvxpy`][constrained.solve_cvxpy]: a primal-dual solution as torch tensors.

    ``params`` (one tensor per cvxpy variable), ``mu``/``nu`` (duals of ``ineq``/``eq``, flattened,
    None without such constraints), the cvxpy ``status`` and ``value``, and the KKT ``report`` of the
    torch-side problem at this solution (None when no torch problem was given)."""
    params: List[Tensor]
    mu: Optional[Tensor]
    nu: Optional[Tensor]
    status: str
    value: float
    report: Optional[KKTReport]


def split_constraints(problem: cp.Problem, ineq=None, eq=None) -> Tuple[list, list]:
    """The (ineq, eq) constraint lists: as given, or the problem's constraints by type, in order.

    Every constraint of ``problem`` must appear exactly once (otherwise the Lagrangian misses a term).

    Args:
        problem: the cvxpy problem.
        ineq: its ``expr <= 0`` constraints (Inequality, NonPos), in the order of the torch side's ``ineq``.
            With ``eq`` also None: the problem's inequality constraints in order; else None is no constraints.
        eq: its ``expr == 0`` constraints (Equality, Zero), in the order of the torch side's ``eq``. With
            ``ineq`` also None: the problem's equality constraints in order; else None is no constraints.

    Returns:
        ``(ineq, eq)``, two lists of cvxpy constraints.

    Raises:
        TypeError: a constraint in ``ineq`` or ``eq`` is not of its list's types.
        ValueError: a constraint is listed twice, a constraint of the problem is missing (SOC, PSD and NonNeg
            constraints are not supported), or a listed constraint is not in the problem.
    """
    if ineq is None and eq is None:
        ineq = [c for c in problem.constraints if isinstance(c, INEQ_TYPES)]
        eq = [c for c in problem.constraints if isinstance(c, EQ_TYPES)]
    ineq, eq = list(ineq or []), list(eq or [])
    for c in ineq:
        if not isinstance(c, INEQ_TYPES):
            raise TypeError(f"ineq constraint {c} is a {type(c).__name__}; only `expr <= 0` constraints "
                            "(Inequality, NonPos) are supported: write `a >= b` as `b <= a`")
    for c in eq:
        if not isinstance(c, EQ_TYPES):
            raise TypeError(f"eq constraint {c} is a {type(c).__name__}; only Equality/Zero are supported")
    ids = [c.id for c in ineq + eq]
    if len(set(ids)) != len(ids):
        raise ValueError("a constraint appears more than once in ineq/eq")
    own = {c.id for c in problem.constraints}
    missing = [str(c) for c in problem.constraints if c.id not in set(ids)]
    foreign = [str(c) for c in ineq + eq if c.id not in own]
    if missing or foreign:
        raise ValueError(f"ineq + eq must list each constraint of the problem once: missing {missing[:3]}, "
                         f"not in the problem {foreign[:3]} (SOC/PSD/NonNeg constraints are not supported)")
    return ineq, eq


def _flat(arrays: Sequence[Any], dtype, device) -> Optional[Tensor]:
    if not arrays:
        return None
    return torch.cat([torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1), dtype=dtype, device=device)
                      for a in arrays])


def _set_parameters(parameters: Sequence[cp.Parameter], values: Sequence[Tensor]) -> None:
    if len(parameters) != len(values):
        raise ValueError(f"{len(parameters)} cvxpy parameters but {len(values)} values")
    for i, (par, val) in enumerate(zip(parameters, values)):
        if not isinstance(val, Tensor):
            raise TypeError(f"values[{i}] must be a torch tensor, got {type(val).__name__}")
        if tuple(val.shape) != tuple(par.shape):
            raise ValueError(f"values[{i}] has shape {tuple(val.shape)} but parameter {par.name()} has shape "
                             f"{tuple(par.shape)}")
        try:
            par.value = val.detach().cpu().double().numpy()
        except ValueError as e:  # a value outside the parameter's declared set (nonneg=True, ...)
            raise CvxpyProblemError(f"values[{i}] cannot be the value of cvxpy parameter {par.name()}: {e} "
                                    "(pass a value in its declared set, or drop the attribute)") from e


_SIGN_ATTRIBUTES = ("nonneg", "nonpos", "pos", "neg", "boolean", "integer", "PSD", "NSD", "bounds")


def _check_variables(variables: Sequence[cp.Variable]) -> None:
    """Variables declared with a constraint-like attribute (``nonneg=True``, ``bounds=``...) hide that
    constraint from ``problem.constraints``: it has no dual there, so the KKT map would silently miss it
    whenever it is active. Reject them with the fix."""
    for i, var in enumerate(variables):
        found = [a for a in _SIGN_ATTRIBUTES if var.attributes.get(a) not in (None, False)]
        if found:
            raise CvxpyProblemError(
                f"variables[{i}] ({var.name()}) is declared with {found[0]}=...: that bound is not among the "
                "problem's constraints, so it has no dual and the KKT map cannot include it (its hypergradient "
                f"would be wrong whenever the bound is active). Declare cp.Variable({var.shape}) and write the bound "
                "as an explicit constraint (e.g. y >= 0) in the cvxpy problem and in the torch model's ineq")


def solve_cvxpy(problem: cp.Problem, parameters: Sequence[cp.Parameter], values: Sequence[Tensor],
                variables: Sequence[cp.Variable], *, ineq=None, eq=None,
                torch_problem: Optional[ConstrainedProblem] = None, hparams: Optional[Sequence[Tensor]] = None,
                check_tol: float = 1e-5, check_derivatives: bool = True, solver: Optional[str] = "CLARABEL",
                **solve_kwargs) -> CvxpySolution:
    """Solve ``problem`` with ``parameters`` set to ``values``; return the primal solution and the duals.

    Raises [`InnerSolveError`][constrained.InnerSolveError] (with ``.status``) unless cvxpy reports an optimal solution.
    With ``torch_problem``, checks it against the cvxpy problem at the solution and ``hparams`` (default:
    ``values``; otherwise ``values`` should be computed from ``hparams`` with autograd): its ``ineq``/``eq``
    must equal the cvxpy constraints' ``expr`` values, and (``check_derivatives``) its autograd derivatives
    in y and x must match central differences of the cvxpy expressions (see ``constrained.model_check``),
    else [`ModelMismatchError`][constrained.ModelMismatchError]. Then (y, mu, nu) must be a KKT point of it to relative
    tolerance ``check_tol``, else [`InaccurateSolveError`][constrained.InaccurateSolveError] (the models agree: the
    solve is inaccurate). cvxpy's own refusals (DCPError, DPPError, ...) raise
    [`CvxpyProblemError`][constrained.CvxpyProblemError].

    Args:
        problem: the cvxpy problem (DCP; its variables without sign or bound attributes).
        parameters: its cvxpy parameters, in the order of ``values``.
        values: one tensor per parameter (its shape).
        variables: the cvxpy variables returned as ``params``, in this order.
        ineq: the inequality constraints in the order of ``mu`` (default: the problem's, by type and order).
        eq: the equality constraints in the order of ``nu`` (default: likewise).
        torch_problem: the torch model of the same problem, to check at the solution.
        hparams: the torch-side hparams of ``torch_problem`` (default: ``values``).
        check_tol: the relative tolerance of the model and KKT checks.
        check_derivatives: also compare the models' derivatives in y and x.
        solver: the cvxpy solver's name.
        **solve_kwargs: more arguments of ``problem.solve``.
    """
    ineq, eq = split_constraints(problem, ineq, eq)
    _check_variables(variables)
    _set_parameters(parameters, values)
    ref = values[0] if values else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float64
    device = ref.device if ref is not None else torch.device("cpu")
    try:
        problem.solve(solver=solver, **solve_kwargs)
    except cp.error.SolverError as e:
        raise InnerSolveError(f"cvxpy's solver failed: {e}", "solver_error") from e
    except CVXPY_ERRORS as e:
        raise _cvxpy_error(e, problem, "solving it") from e
    status = problem.status
    if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise InnerSolveError(f"the inner problem has status {status!r} (no solution to differentiate)", status)
    if status == cp.OPTIMAL_INACCURATE:
        warnings.warn("cvxpy returned 'optimal_inaccurate'; the KKT check decides whether it is usable",
                      RuntimeWarning, stacklevel=2)
    params = [torch.as_tensor(np.asarray(v.value, dtype=np.float64), dtype=dtype, device=device).reshape(v.shape)
              for v in variables]
    mu = _flat([c.dual_value for c in ineq], dtype, device)
    nu = _flat([c.dual_value for c in eq], dtype, device)
    report = None
    if torch_problem is not None:
        report = check_model(torch_problem, problem, parameters, values, variables, params, mu, nu, ineq=ineq, eq=eq,
                             hparams=hparams, tol=check_tol, derivatives=check_derivatives)
    return CvxpySolution(params, mu, nu, status, float(problem.value), report)


def check_values(torch_problem: ConstrainedProblem, params, hparams, p_cvx, q_cvx, tol: float) -> None:
    """The torch constraints must equal cvxpy's ``expr`` values at the solution."""
    with torch.no_grad():
        x = [h.detach() for h in hparams]
        for name, fn, cvx in (("ineq", torch_problem.p, p_cvx), ("eq", torch_problem.q, q_cvx)):
            mine = fn(params, x)
            n_mine, n_cvx = (0 if mine is None else mine.numel()), (0 if cvx is None else cvx.numel())
            if n_mine != n_cvx:
                raise ModelMismatchError(f"torch {name} has {n_mine} entries but the cvxpy {name} constraints "
                                         f"have {n_cvx}")
            if n_mine:
                gap = (mine - cvx).abs()
                if float(gap.max()) > tol * max(1.0, float(cvx.abs().max())):
                    i = int(gap.argmax())
                    raise ModelMismatchError(
                        f"torch {name}[{i}] = {float(mine[i]):.6g} but the cvxpy constraint's expr = "
                        f"{float(cvx[i]):.6g} at the cvxpy solution: check the sign (p <= 0), the order of "
                        "the constraints and their C-order flattening")


def check_model(torch_problem: ConstrainedProblem, problem: cp.Problem, parameters, values, variables, params,
                mu=None, nu=None, *, ineq=None, eq=None, hparams=None, tol: float = 1e-5,
                derivatives: bool = True) -> KKTReport:
    """Check ``torch_problem`` against the cvxpy ``problem`` at a primal-dual point; returns its KKT report.

    Compares constraint values, derivatives in y and x (``constrained.model_check``), then the KKT
    conditions. A disagreement of the models raises [`ModelMismatchError`][constrained.ModelMismatchError];
    a KKT failure of agreeing models [`InaccurateSolveError`][constrained.InaccurateSolveError].

    Args:
        torch_problem: the torch model.
        problem: the cvxpy problem.
        parameters: its cvxpy parameters.
        values: their values (tensors).
        variables: its cvxpy variables, in the order of ``params``.
        params: the primal point y, one tensor per variable.
        mu: the duals of ``ineq``, flattened.
        nu: the duals of ``eq``, flattened.
        ineq: the inequality constraints in the order of ``mu`` (default: the problem's, by type and order).
        eq: the equality constraints in the order of ``nu`` (default: likewise).
        hparams: the torch-side hparams (default: ``values``).
        tol: the relative tolerance of the checks.
        derivatives: also compare the derivatives in y and x.
    """
    ineq, eq = split_constraints(problem, ineq, eq)
    _check_variables(variables)
    _set_parameters(parameters, values)
    for var, t in zip(variables, params):
        var.value = t.detach().cpu().double().numpy().reshape(var.shape)
    dtype, device = params[0].dtype, params[0].device
    p_cvx = _flat([c.expr.value for c in ineq], dtype, device)
    q_cvx = _flat([c.expr.value for c in eq], dtype, device)
    x = list(values if hparams is None else hparams)
    check_values(torch_problem, params, x, p_cvx, q_cvx, tol)
    identity = hparams is None or (len(values) == len(hparams) and all(a is b for a, b in zip(values, hparams)))

    def compare():
        if derivatives:
            check_derivatives_fn(torch_problem, problem, parameters, values, variables, ineq, eq, params, x, tol,
                                 identity=identity)

    try:
        report, _, _ = analyze(torch_problem, params, x, mu, nu, kkt_tol=tol, warn=False)
    except KKTError as e:
        try:
            compare()
        except ModelMismatchError as mismatch:
            raise ModelMismatchError(f"the cvxpy solution is not a KKT point of the torch problem ({e}), and the "
                                     f"models disagree: {mismatch}") from e
        raise _inaccurate(e, problem, tol, derivatives) from e
    compare()
    return report


def _inaccurate(e: KKTError, problem: cp.Problem, tol: float, compared: bool) -> InaccurateSolveError:
    stats = getattr(problem, "solver_stats", None)
    solver = getattr(stats, "solver_name", None) or "the solver"
    measured = ", ".join(f"{k} {v:.2e}" for k, v in e.residuals.items())
    agree = "in values and derivatives" if compared else "in values (derivatives not compared)"
    return InaccurateSolveError(
        f"{solver}'s solution (status {problem.status!r}) is not a KKT point of the model to check_tol={tol:g}: "
        f"{e}. The torch model matches the cvxpy model {agree}, so the solve is inaccurate (measured KKT "
        f"residuals: {measured}): {TIGHTER}, or loosen check_tol", problem.status, e.residuals)


@dataclass
class LayerSolution:
    """What a [`DualLayer`][constrained.DualLayer] returns: the primal variables and the duals, batched.

    ``params`` (batch + variable shape each), ``mu`` (batch + (m,)), ``nu`` (batch + (k,)), all
    differentiable through cvxpylayers' own derivative (the reference)."""
    params: List[Tensor]
    mu: Optional[Tensor]
    nu: Optional[Tensor]


class DualLayer:
    """A ``CvxpyLayer`` returning the primal variables and the duals of ``ineq``/``eq``.

    cvxpylayers >= 1.2 returns a constraint's dual when given ``constraint.dual_variables[0]``. Calling the
    layer with the parameter values (optionally batched, and ``solver_args=``) returns a
    [`LayerSolution`][constrained.LayerSolution]. With ``torch_problem`` (whose hparams are the layer's
    parameter values), every solution (each batch element) is checked against the cvxpy model like
    [`solve_cvxpy`][constrained.solve_cvxpy] does.

    Args:
        problem: the cvxpy problem (DPP).
        parameters: its cvxpy parameters, in the order of the call's values.
        variables: the cvxpy variables returned as ``params``.
        ineq: the inequality constraints in the order of ``mu`` (default: the problem's, by type and order).
        eq: the equality constraints in the order of ``nu`` (default: likewise).
        solver_args: the layer's solver arguments (default: SCS at eps = 1e-10).
        torch_problem: the torch model to check every solution against.
        check_tol: the relative tolerance of those checks.
    """

    def __init__(self, problem: cp.Problem, parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable],
                 *, ineq=None, eq=None, solver_args: Optional[Dict[str, Any]] = None,
                 torch_problem: Optional[ConstrainedProblem] = None, check_tol: float = 1e-5):
        from cvxpylayers.torch import CvxpyLayer

        self.ineq, self.eq = split_constraints(problem, ineq, eq)
        self.problem, self.parameters, self.torch_problem, self.check_tol = problem, list(parameters), torch_problem, \
            check_tol
        self.variables = list(variables)
        _check_variables(self.variables)
        duals = [c.dual_variables[0] for c in self.ineq + self.eq]
        try:
            self.layer = CvxpyLayer(problem, parameters=list(parameters), variables=self.variables + duals,
                                    solver_args=dict(DEFAULT_LAYER_ARGS if solver_args is None else solver_args))
        except CVXPY_ERRORS as e:
            raise _cvxpy_error(e, problem, "building a CvxpyLayer") from e
        except ValueError as e:  # cvxpylayers: "Problem must be DPP." / "Problem must be DCP."
            if "DPP" not in str(e) and "DCP" not in str(e):
                raise
            kind = cp.error.DPPError if "DPP" in str(e) else cp.error.DCPError
            raise _cvxpy_error(kind(str(e)), problem, "building a CvxpyLayer") from e

    def __call__(self, *values: Tensor, solver_args: Optional[Dict[str, Any]] = None) -> LayerSolution:
        try:
            out = self.layer(*values, solver_args=solver_args)
        except Exception as e:  # diffcp/cvxpy raise their own SolverError types
            if "SolverError" not in type(e).__name__:
                raise
            status = next((s for s in ("infeasible", "unbounded") if s in str(e).lower()), "solver_error")
            raise InnerSolveError(f"cvxpylayers' solve failed: {e}", status) from e
        nv = len(self.variables)
        batch = tuple(out[0].shape[:out[0].dim() - len(self.variables[0].shape)])

        def cat(parts):
            return torch.cat([t.reshape(*batch, -1) for t in parts], dim=-1) if parts else None

        sol = LayerSolution(list(out[:nv]), cat(out[nv:nv + len(self.ineq)]), cat(out[nv + len(self.ineq):]))
        if self.torch_problem is not None:
            self.check(values, sol, batch)
        return sol

    def check(self, values: Sequence[Tensor], sol: LayerSolution, batch: Tuple[int, ...]) -> None:
        """[`check_model`][constrained.check_model] on each batch element of the solution ``sol``.

        A batched value in ``values`` has the batch shape ``batch`` in front of its parameter's shape.
        """
        n = int(np.prod(batch)) if batch else 1

        def element(t: Optional[Tensor], b: int, own_dims: int) -> Optional[Tensor]:
            if t is None or t.dim() == own_dims:  # unbatched (a value shared by the batch)
                return None if t is None else t.detach()
            return t.detach().reshape(n, *t.shape[t.dim() - own_dims:])[b]

        for b in range(n):
            vals = [element(v, b, len(p.shape)) for v, p in zip(values, self.parameters)]
            ys = [element(t, b, len(var.shape)) for t, var in zip(sol.params, self.variables)]
            check_model(self.torch_problem, self.problem, self.parameters, vals, self.variables, ys,
                        element(sol.mu, b, 1), element(sol.nu, b, 1), ineq=self.ineq, eq=self.eq,
                        tol=self.check_tol)
