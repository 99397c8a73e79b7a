"""Implicit hypergradient (IGBM: CG / Neumann, Lorraine et al. 2020) through the core's solvers.

T lower steps (no graph) give y_T; then, at the *detached* y_T and with Phi(y, x) = y - s grad_y f(x, y),

    grad = grad_x F + (d_x Phi)^T v,    (I - d_y Phi)^T v = grad_y F,

i.e. grad_x F - grad2_xy f [grad2_yy f]^{-1} grad_y F, solved by ``hypergrad.hypergradient``. Detaching
y_T first means that a lower iterate coming from a tracked trajectory is not differentiated twice.

The formula is exact only at a fixed point y* = Phi(y*); with few lower steps it is approximate. The result
reports the inner residual ``fp_residual`` = ||Phi(y_T) - y_T|| (and ``fp_residual_rel``), which bounds how
far y_T is from y*: ||y_T - y*|| <= ||Phi(y_T) - y_T|| / (1 - rho) when Phi contracts with factor rho
(rho = max |1 - lr lambda_i| over the Hessian's eigenvalues). A diverging lower loop raises
[`hypergrad.DivergenceError`][hypergrad.DivergenceError].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

import hypergrad

from ._lower import Loss, SGDRule, _check_lr, check_int, check_lower, descend, grads_of, step_name
from .base import BilevelSolver, Objective, Result


@dataclass
class ImplicitResult(Result):
    """The result of [`implicit_hypergradient`][methods.implicit_hypergradient]: a [`Result`][methods.Result] and more.

    Plus the core solver's ``iterations`` (products with (d_y Phi)^T), ``residual``, ``converged``,
    the ``solver`` name and the adjoint ``v`` (a warm start for the next call)."""
    iterations: int
    residual: float
    converged: bool
    solver: str
    v: List[Tensor]


def implicit_hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], inner_loss: Loss,
                           outer_loss: Loss, steps: int, lr: float, *, solver: str = "cg", K: int = 10,
                           tol: float = 1e-10, rule: Optional[SGDRule] = None,
                           v0: Optional[Sequence[Tensor]] = None, set_grad: bool = True,
                           fixed_point_tol: Optional[float] = None, **solver_options) -> ImplicitResult:
    """The implicit hypergradient at y_T, after ``steps`` lower steps from ``params``, with Phi = y - lr grad_y f.

    grad = grad_x F - grad2_xy f [grad2_yy f]^-1 grad_y F at y_T, the adjoint solved by the core's ``solver``.
    ``fp_residual`` = ||Phi(y_T) - y_T|| = lr ||grad_y f(x, y_T)|| (the core's) says how approximate the
    result is.

    Args:
        params: the lower starting iterate y_0 (detached; with 0 steps it is taken as y*).
        hparams: the upper variables x.
        inner_loss: f(params, hparams).
        outer_loss: F(params, hparams).
        steps: the number T of lower steps (0: ``params`` is already y*).
        lr: the step of Phi (and of the lower steps when ``rule`` is None).
        solver: any of the core's solvers ([`hypergrad.SOLVERS`][hypergrad.SOLVERS]).
        K: the solver's iteration limit.
        tol: the solver's residual tolerance (absolute; float32 floors it at 100 eps relative).
        rule: the update of the lower steps (e.g. SGD with momentum); Phi is always plain gradient descent
            with step ``lr`` (its fixed points are the stationary points of f; ``lr`` cancels for an exact
            solve).
        v0: a warm start for the adjoint (e.g. the previous result's ``v``).
        set_grad: add the gradients to ``hparam.grad``.
        fixed_point_tol: the core's (None: warn when far from a fixed point; a float: raise
            [`hypergrad.NotAFixedPointError`][hypergrad.NotAFixedPointError] above that relative residual;
            ``math.inf``: accept).
        **solver_options: more options of the core's solver.
    """
    check_int(steps, "the number of lower steps (lower_loop)", 0)
    check_int(K, "k (solver iterations)", 0)
    _check_lr(lr, "ll_learning_rate")
    hparams, params = list(hparams), [p.detach() for p in params]
    rule = SGDRule.plain(lr, len(params)) if rule is None else rule
    losses: List[Tensor] = []

    def grad_fn(y, t, create_graph):
        f = inner_loss(y, hparams)
        losses.append(f.detach())
        return grads_of(f, y, create_graph=create_graph)

    y, _, norms, _ = descend(params, grad_fn, rule, range(steps), track=False)
    check_lower(losses, norms, step_name("ll_learning_rate", rule))
    y = [w.detach() for w in y]
    res = hypergradient_at(y, hparams, inner_loss, outer_loss, lr, solver=solver, K=K, tol=tol, v0=v0,
                           set_grad=set_grad, fixed_point_tol=fixed_point_tol, **solver_options)
    upper = res.outer_loss
    return ImplicitResult(res.grads, y, upper, float(norms[-1]) if norms else float("nan"),
                          res.fp_residual, res.fp_residual_rel,
                          res.iterations, res.residual, res.converged, res.solver, res.v)


def hypergradient_at(y: Sequence[Tensor], hparams: Sequence[Tensor], inner_loss: Loss, outer_loss: Loss,
                     lr: float, **options) -> hypergrad.HypergradResult:
    """The core call: fixed-point map Phi = y - lr grad_y f at the detached lower iterate ``y``."""
    y = [w.detach() for w in y]
    eps = torch.finfo(y[0].dtype).eps
    if "rtol" not in options and 100 * eps > 1e-10:  # an absolute tolerance float32 cannot reach: floor it
        options["rtol"] = 100 * eps                   # relatively (float64 keeps the absolute tolerance)
    return hypergrad.hypergradient(y, list(hparams), hypergrad.GradientDescent(inner_loss, lr), outer_loss,
                                   **options)


class Implicit(BilevelSolver):
    """Implicit gradients by CG or the Neumann series (reference: ``Implicit``).

    Per call: ``lower_loop`` lower steps (``ll_opt``'s SGD rule, else gradient descent with
    ``ll_learning_rate``), then at most ``k`` iterations of ``solver`` until the residual is below
    ``tolerance`` ([`implicit_hypergradient`][methods.implicit_hypergradient]).

    Approximate with few lower steps: the implicit formula is evaluated at y_T, not at y*;
    ``diagnostics["fp_residual"]`` = ||Phi(y_T) - y_T|| bounds the distance,
    ``||y_T - y*|| <= fp_residual / (1 - rho)`` for a contraction Phi with factor rho.

    Args:
        ul_objective: the upper objective, ``objective(state) -> scalar tensor``.
        ul_model: the upper ``nn.Module`` (x).
        ll_objective: the lower objective, ``objective(state) -> scalar tensor``.
        ll_model: the lower ``nn.Module`` (y).
        ll_learning_rate: the step of Phi = y - lr grad_y f (and of the lower steps without ``ll_opt``).
        k: the solver's iteration limit.
        tolerance: its residual tolerance.
        lower_loop: the lower steps per call.
        solver: any of the core's: "cg", "neumann", "fixed_point", "minres", "gmres", "dense", "cg_normaleq".
        ll_opt: a ``torch.optim.SGD`` over the lower parameters whose rule the lower steps follow.
        warm_start: copy the final lower iterate into the lower model after each call.
        warm_start_adjoint: start each adjoint solve from the previous call's.
        fixed_point_tol: the core's (None warns when the relative residual is large, a float raises above
            it, ``math.inf`` accepts); applies to every call.
    """

    def __init__(self, ul_objective: Objective, ul_model, ll_objective: Objective, ll_model,
                 ll_learning_rate: float, k: int, tolerance: float = 1e-10, *, lower_loop: int = 10,
                 solver: str = "cg", ll_opt: Optional[torch.optim.Optimizer] = None, warm_start: bool = True,
                 warm_start_adjoint: bool = False, fixed_point_tol: Optional[float] = None):
        _check_lr(ll_learning_rate, "ll_learning_rate")
        super().__init__(ul_objective, ul_model, ll_objective, ll_model, ll_opt=ll_opt, lower_loop=lower_loop,
                         lr=ll_learning_rate if ll_opt is None else None, warm_start=warm_start)
        if solver not in hypergrad.SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(hypergrad.SOLVERS)}")
        if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self.ll_learning_rate, self.k = float(ll_learning_rate), check_int(k, "k", 0)
        self.tolerance, self.solver = float(tolerance), solver
        self.warm_start_adjoint = bool(warm_start_adjoint)
        self.fixed_point_tol = fixed_point_tol

    def compute_gradients(self, ul_data, ul_target, ll_data, ll_target, **options) -> Tensor:
        """One outer step: lower steps, then the implicit upper gradient added to the upper ``.grad``.

        ``options`` override ``steps``/``solver``/``K``/``tol`` (or any other keyword) of
        [`implicit_hypergradient`][methods.implicit_hypergradient] for this call; returns the upper loss.
        """
        inner, outer = self.losses(ul_data, ul_target, ll_data, ll_target)
        kw = dict(solver=self.solver, K=self.k, tol=self.tolerance, rule=self.rule,
                  fixed_point_tol=self.fixed_point_tol)
        if self.warm_start_adjoint and self.last is not None:
            kw["v0"] = self.last.v
        kw.update(options)
        steps = kw.pop("steps", self.lower_loop)
        result = implicit_hypergradient(self._params, self._hparams, inner, outer, steps, self.ll_learning_rate,
                                        **kw)
        return self._finish(result, write_lower=self.warm_start)
