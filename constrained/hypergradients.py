"""Hypergradients through a constrained inner problem, by the core's solvers on the KKT map.

With w = [y, mu_A, nu] and Phi = w - eta grad_w L (see ``constrained.kkt``), the adjoint solves
eta K v = grad_w E and the result is grad_x E + (d_x Phi)^T v = grad_x E - (d_x grad_w L)^T K^-1 grad_w E.
For a QP lower level (g = 1/2 y'Qy + (c + Bx)'y, p = Gy - h - Ex, q = Ay - b - Fx) this is
grad_x E - B'v_y + E_A'v_mu + F'v_nu with K v = grad_w E.

Two ways to apply K, both solved by the core's linear solvers ([`hypergrad.SOLVERS`][hypergrad.SOLVERS]):

- matrix-free: [`hypergrad.hypergradient`][hypergrad.hypergradient] on the map, one Hessian-vector product (a VJP
  through Phi) per iteration; memory O(size of w). Used for large systems.
- materialized: K is built once (``torch.func``), after which a product is one dense mat-vec, and
  "dense" is one LU solve with a condition estimate (the core's dense solver checks singularity by an
  SVD, about ten times the cost of the LU). Much faster for small and medium systems.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

import hypergrad
from hypergrad import tensor_list as tl

from .errors import NotConvergedWarning
from .kkt import KKTMap, KKTReport, kkt_map
from .problem import ConstrainedProblem

SOLVERS = ("auto", "dense", "minres", "cg", "cg_normaleq")


@dataclass
class ConstrainedResult:
    """The result of [`constrained.hypergradient`][constrained.hypergradient].

    ``grads`` (one per hparam), the adjoint ``v`` (w-shaped), the KKT ``report``, the solver used,
    its ``iterations``, final ``residual`` and ``converged`` flag."""
    grads: List[Tensor]
    v: List[Tensor]
    report: KKTReport
    solver: str
    iterations: int
    residual: float
    converged: bool


def pick_solver(solver: str, n: int, licq: bool, dense_max: int) -> str:
    """"auto": a dense solve up to ``dense_max`` unknowns, MINRES above or when LICQ fails (K singular)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS} (the KKT system is symmetric "
                         "indefinite, so fixed-point and Neumann iterations diverge)")
    if solver != "auto":
        return solver
    return "dense" if (n <= dense_max and licq) else "minres"


def solve_adjoint(w: List[Tensor], hparams: Sequence[Tensor], fp_map, loss_w, solver: str, *, K: Optional[int],
                  tol: float, rtol: float, v0, set_grad: bool) -> hypergrad.HypergradResult:
    """One call to the core; ``K`` defaults to 10 x (number of unknowns) + 100 Krylov iterations; ``v0``
    is used only when its shapes match ``w``. Warns when the solve stopped above the tolerance."""
    n = sum(t.numel() for t in w)
    res = hypergrad.hypergradient(w, list(hparams), fp_map, loss_w, solver=solver, K=10 * n + 100 if K is None
                                  else K, tol=tol, rtol=rtol, v0=_usable_v0(v0, w), set_grad=set_grad)
    _warn_unconverged(res.solver, res.iterations, res.residual, res.converged)
    return res


def materialize_kkt(km: KKTMap, hparams: Sequence[Tensor]) -> Optional[Tensor]:
    """K = [[H, J^T], [J, 0]] with H = d^2 L / dy^2 by ``torch.func`` (reverse over reverse, vectorized)
    and J = d[p_A; q]/dy from the KKT analysis. None when the problem's callables do not support
    ``torch.func`` transforms (the matrix-free path is used then)."""
    x = [h.detach() for h in hparams]
    y = [t.detach() for t in km.w[:km.n_params]]
    rest = [t.detach() for t in km.w[km.n_params:]]

    def lagrangian_y(yf: Tensor) -> Tensor:
        return km.lagrangian(tl.unflatten(yf, y) + rest, x)

    if km.problem.hessian is not None:
        H = supplied_hessian(km, y, x, lagrangian_y)
    else:
        try:
            H = torch.func.jacrev(torch.func.grad(lagrangian_y))(tl.flatten(y))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            return None
    n, r = H.shape[0], km.J.shape[0]
    K = H.new_zeros(n + r, n + r)
    K[:n, :n] = 0.5 * (H + H.T)
    K[n:, :n] = km.J
    K[:n, n:] = km.J.T
    return K


def supplied_hessian(km: KKTMap, y: List[Tensor], x: List[Tensor], lagrangian_y) -> Tensor:
    """``problem.hessian`` at the KKT point (inactive multipliers zeroed), checked for shape, NaN and
    against one autodiff Hessian-vector product of the Lagrangian along a random direction."""
    _, mu_a, nu = km.unpack([t.detach() for t in km.w])
    mu = None if km.mu is None else torch.zeros_like(km.mu).index_put((km.report.active,), mu_a) \
        if mu_a is not None else torch.zeros_like(km.mu)
    yf = tl.flatten(y)
    n = yf.numel()
    H = km.problem.hessian(y, x, mu, nu)
    if not isinstance(H, Tensor) or H.shape != (n, n):
        raise ValueError(f"ConstrainedProblem.hessian must return a ({n}, {n}) tensor, got "
                         f"{tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__}")
    H = H.to(yf.dtype).detach()
    tl.assert_finite([H], "ConstrainedProblem.hessian")
    u = torch.randn(n, dtype=yf.dtype, device=yf.device, generator=torch.Generator(device=yf.device).manual_seed(0))
    _, Hu = torch.func.jvp(torch.func.grad(lagrangian_y), (yf,), (u,))
    gap = float(torch.linalg.norm(H @ u - Hu))
    if gap > 1e-6 * (float(torch.linalg.norm(Hu)) + float(torch.linalg.norm(H, ord=1)) * float(torch.linalg.norm(u))) + 1e-12:
        raise ValueError(f"ConstrainedProblem.hessian disagrees with the autodiff Hessian of the Lagrangian: "
                         f"||H u - (autodiff) H u|| = {gap:.3e} along a random u")
    return H


def solve_materialized(km: KKTMap, Kmat: Tensor, hparams: Sequence[Tensor], loss_w, solver: str, *,
                       K: Optional[int], tol: float, rtol: float, v0, set_grad: bool) -> hypergrad.HypergradResult:
    """The core's hypergradient with the operator I - dPhi/dw = eta K given as a dense matrix (no VJPs
    through Phi in the solve): "dense" is an LU solve, the Krylov solvers run on plain mat-vecs."""
    n = Kmat.shape[0]
    res = hypergrad.hypergradient(km.w, list(hparams), km.fp_map, loss_w, solver=solver,
                                  K=10 * n + 100 if K is None else K, tol=tol, rtol=rtol, v0=_usable_v0(v0, km.w),
                                  set_grad=set_grad, operator=km.eta * Kmat)
    _warn_unconverged(res.solver, res.iterations, res.residual, res.converged)
    return res


def _usable_v0(v0, w):
    """The warm start, or None when its shapes no longer match w (the active set changed)."""
    if v0 is None or len(v0) != len(w) or any(a.shape != b.shape for a, b in zip(v0, w)):
        return None
    return list(v0)


def _warn_unconverged(solver: str, iterations: int, residual: float, converged: bool) -> None:
    if not converged:
        warnings.warn(f"{solver} stopped after {iterations} iterations with residual {residual:.3e} above the "
                      f"tolerance; raise K or loosen tol/rtol", NotConvergedWarning, stacklevel=4)


def _loss_in_w(km: KKTMap, outer_loss: Callable, with_multipliers: bool):
    """The outer loss as a function of w: E(params) or E(params, mu, nu) with the inactive mu constant."""

    def loss_w(w, hparams):
        y, mu_a, nu = km.unpack(w)
        if not with_multipliers:
            return outer_loss(y, hparams)
        return outer_loss(y, hparams, km.full_mu(mu_a), nu)

    return loss_w


def hypergradient(problem: ConstrainedProblem, params: Sequence[Tensor], hparams: Sequence[Tensor],
                  outer_loss: Callable, mu: Optional[Tensor] = None, nu: Optional[Tensor] = None,
                  solver: str = "auto", *, K: Optional[int] = None, tol: float = 0.0, rtol: Optional[float] = None,
                  eta: float = 1.0, degenerate: str = "drop", with_multipliers: bool = False,
                  set_grad: bool = True, v0: Optional[Sequence[Tensor]] = None, dense_max: int = 1500,
                  materialize: Optional[bool] = None,
                  active_rtol: float = 1e-6, active_atol: float = 1e-12,
                  kkt_tol: Optional[float] = 1e-5) -> ConstrainedResult:
    """Hypergradient of ``outer_loss(params, hparams)`` through  params = argmin g s.t. p <= 0, q = 0.

    Args:
        problem: the inner problem; ``params`` (with ``mu``, ``nu``) must be its KKT point at ``hparams``.
        params: the inner solution y (a list of tensors).
        hparams: the outer variables x (a list of tensors).
        outer_loss: ``outer_loss(params, hparams) -> scalar`` (with ``with_multipliers``: also ``mu``, ``nu``).
        mu: one multiplier per entry of ``problem.ineq`` (all of them).
        nu: one multiplier per entry of ``problem.eq``.
        solver: "auto" (dense up to ``dense_max`` unknowns, else MINRES), "dense", "minres", "cg",
            "cg_normaleq". CG may break down on the indefinite KKT matrix: it then raises, never NaN.
        K: iteration limit of the Krylov solve (None: 10 x the number of unknowns + 100).
        tol: absolute part of its stopping rule, residual <= max(tol, rtol ||grad_w E||).
        rtol: relative part of the same rule (None: max(1e-11, 100 eps of the dtype), reachable in
            float32 too).
        with_multipliers: call ``outer_loss(params, hparams, mu, nu)`` with the full-length multipliers
            (differentiated through the active ones; the inactive ones are constants: locally zero).
        eta: see [`kkt_map`][constrained.kkt_map].
        degenerate: see [`kkt_map`][constrained.kkt_map].
        active_rtol: ``rtol`` of [`kkt_map`][constrained.kkt_map].
        active_atol: ``atol`` of [`kkt_map`][constrained.kkt_map].
        kkt_tol: see [`kkt_map`][constrained.kkt_map].
        set_grad: add the result to ``hparam.grad``.
        v0: warm start for the adjoint (e.g. ``result.v`` of the previous outer step); ignored when its
            shapes no longer match w (the active set changed).
        dense_max: the most unknowns for which "auto" picks the dense solve and K is materialized.
        materialize: build the KKT matrix K once as a dense matrix (default: when it has at most
            ``dense_max`` rows and the callables support ``torch.func``); False: matrix-free
            Hessian-vector products.
    """
    if solver not in SOLVERS:
        pick_solver(solver, 0, True, 0)  # raises the error naming the choices
    if rtol is None:
        rtol = max(1e-11, 100 * torch.finfo(params[0].dtype).eps)
    km = kkt_map(problem, params, hparams, mu, nu, eta=eta, degenerate=degenerate, rtol=active_rtol,
                 atol=active_atol, kkt_tol=kkt_tol)
    n = sum(t.numel() for t in km.w)
    name = pick_solver(solver, n, km.report.licq, dense_max)
    loss_w = _loss_in_w(km, outer_loss, with_multipliers)
    Kmat = materialize_kkt(km, hparams) if (materialize or (materialize is None and n <= dense_max)) else None
    if Kmat is not None:
        res = solve_materialized(km, Kmat, hparams, loss_w, name, K=K, tol=tol, rtol=rtol, v0=v0,
                                 set_grad=set_grad)
    else:
        res = solve_adjoint(km.w, hparams, km.fp_map, loss_w, name, K=K, tol=tol, rtol=rtol, v0=v0,
                            set_grad=set_grad)
    return ConstrainedResult(res.grads, res.v, km.report, res.solver, res.iterations, res.residual, res.converged)
