"""Hypergradients of fixed-point maps: one general entry point and hypertorch's functions over it.

Problem: min_lambda E(w(lambda), lambda) with w(lambda) = Phi(w(lambda), lambda). At the fixed point

    grad f = dE/dlambda + (dPhi/dlambda)^T v,    (I - dPhi/dw)^T v = dE/dw,

``v`` being the adjoint. Implicit methods differ only in how they solve for ``v``
(``hypergrad.linear_solvers``); each product with (dPhi/dw)^T is one vector-Jacobian product.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import FixedPointWarning, NotAFixedPointError
from .linear_solvers import SOLVERS, SolveInfo, _Contraction, _Monitor

#: relative fixed-point residual above which ``hypergradient`` warns by default (``fixed_point_tol=None``),
#: in float64; lower precisions warn above 1e5 eps (float32: 1.2e-2), where their own rounding reaches
FIXED_POINT_WARN_RTOL = 1e-3


def fixed_point_warn_rtol(dtype: torch.dtype) -> float:
    """The default warning level of the relative fixed-point residual for ``dtype``."""
    return min(0.1, max(FIXED_POINT_WARN_RTOL, 1e5 * torch.finfo(dtype).eps))

FpMap = Callable[[List[Tensor], List[Tensor]], List[Tensor]]
OuterLoss = Callable[[List[Tensor], List[Tensor]], Tensor]


@dataclass
class HypergradResult:
    """The result of [`hypergradient`][hypergrad.hypergradient]: the hypergradient, its adjoint and diagnostics.

    ``grads`` (one per hparam), the adjoint ``v`` (pass it back as ``v0`` to warm-start the next
    outer step), the solver's ``iterations`` (products with dPhi/dw^T), final ``residual``, ``converged``
    (of the adjoint solve), and the inner fixed-point residual ``fp_residual`` = ||Phi(w) - w|| with
    ``fp_residual_rel`` = max_i ||Phi_i(w) - w_i|| / max(||w_i||, ||Phi_i(w)||, 1e-3 S) over the params tensors i
    (S the largest of those scales; see ``fixed_point_residuals``).

    The hypergradient is exact only at a fixed point. For a map that contracts with factor rho,
    ``||w - w*|| <= ||Phi(w) - w|| / (1 - rho)``, and the error of the hypergradient is ``O(||w - w*||)`` (its
    constant: the Lipschitz constants of dE/dw and dPhi, times the norm of the adjoint)."""
    grads: List[Tensor]
    v: List[Tensor]
    iterations: int
    residual: float
    converged: bool
    solver: str
    fp_residual: float = float("nan")
    fp_residual_rel: float = float("nan")
    outer_loss: Optional[Tensor] = None  #: E(w, lambda) at the given params (detached; None when not evaluated)


class _FixedPointSystem:
    """The adjoint system (I - J^T) v = dE/dw with J = dPhi/dw at the given (w, lambda). Several params tensors
    reach a solver as one flat vector through the solvers' own ``one_vector``."""

    def __init__(self, params, hparams, fp_map: FpMap, stochastic: bool, create_graph: bool,
                 operator: Optional[Tensor] = None):
        self.params, self.hparams = params, hparams
        self.fp_map, self.stochastic, self.create_graph = fp_map, stochastic, create_graph
        self._mapped = None if stochastic else self.map()
        self._jvp_graph = None
        self.operator = operator
        if operator is not None:
            n = sum(p.numel() for p in self.params)
            if operator.shape != (n, n):
                raise ValueError(f"operator has shape {tuple(operator.shape)}; expected ({n}, {n}) for params with "
                                 f"{n} entries in all")
            self.matvec = lambda u: tl.unflatten(operator @ tl.flatten(u), u)
            self.rmatvec = lambda u: tl.unflatten(operator.T @ tl.flatten(u), u)
            self.matmat = lambda: operator

    def map(self) -> List[Tensor]:
        out = tl.check_like(self.fp_map(self.params, self.hparams), self.params, "fp_map(params, hparams)")
        if not any(t.requires_grad for t in out):
            raise ValueError("fp_map(params, hparams) returned tensors without a graph (detached, .data, or computed "
                             "under torch.no_grad()): the hypergradient needs dPhi/dw and dPhi/dlambda; build the "
                             "map's output from params and hparams with differentiable operations")
        return out

    def mapped(self) -> List[Tensor]:
        return self.map() if self.stochastic else self._mapped

    def residual(self) -> tuple:
        """(||Phi(w) - w||, max_i ||Phi_i(w) - w_i|| / max(||w_i||, ||Phi_i(w)||, 1e-3 S)) over the params
        tensors i (S the largest of those scales): a tensor far from its fixed point is not hidden by a larger
        converged one."""
        d, rel = fixed_point_residuals([p.detach() for p in self.params], [m.detach() for m in self.mapped()],
                                       tl.dots)
        a, r = torch.stack([d, rel]).tolist()
        return a, r

    def vjp(self, u, wrt) -> List[Tensor]:
        """(dPhi/d wrt)^T u (outputs without a graph, constant components of Phi, contribute zero)."""
        pairs = [(m, c) for m, c in zip(self.mapped(), u) if m.requires_grad]
        return tl.grad_or_zeros([m for m, _ in pairs], wrt, grad_outputs=[c for _, c in pairs], retain_graph=True,
                                create_graph=self.create_graph)

    def matvec(self, u) -> List[Tensor]:
        """(I - J^T) u."""
        return list(torch._foreach_sub(list(u), self.vjp(u, self.params)))  # one kernel for all tensors

    def matmat(self) -> Optional[Tensor]:
        """The dense operator (I - J^T) as an n x n matrix, by one batched VJP; None if unsupported."""
        if self.stochastic:
            return None
        flat = tl.flatten(self.params)
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        batch = [c.reshape(eye.shape[0], *p.shape) for c, p in
                 zip(torch.split(eye, [p.numel() for p in self.params], dim=1), self.params)]
        try:
            jt = torch.autograd.grad(self._mapped, self.params, grad_outputs=batch, retain_graph=True,
                                     create_graph=self.create_graph, allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            return None
        jt = [torch.zeros_like(b) if g is None else g for g, b in zip(jt, batch)]
        rows = torch.cat([g.reshape(eye.shape[0], -1) for g in jt], dim=1)  # row i = (J^T e_i)^T
        return eye - rows.T

    def rmatvec(self, u) -> List[Tensor]:
        """(I - J) u, by the double-VJP trick: J u = d/dd <J^T d, u>."""
        if self._jvp_graph is None or self.stochastic:
            dummy = [torch.zeros_like(p).requires_grad_(True) for p in self.params]
            pairs = [(m, d) for m, d in zip(self.mapped(), dummy) if m.requires_grad]
            self._jvp_graph = (dummy, tl.grad_or_zeros([m for m, _ in pairs], self.params,
                                                       grad_outputs=[d for _, d in pairs], retain_graph=True,
                                                       create_graph=True))
        dummy, jtd = self._jvp_graph
        pairs = [(j, c) for j, c in zip(jtd, u) if j.requires_grad]  # J^T d = 0: no graph
        if not pairs:
            return list(u)
        ju = tl.grad_or_zeros([j for j, _ in pairs], dummy, grad_outputs=[c for _, c in pairs], retain_graph=True,
                              create_graph=self.create_graph)
        return list(torch._foreach_sub(list(u), ju))


def _prepare(params, hparams, outer_loss: OuterLoss, create_graph: bool):
    """Validate inputs; detached leaf copies of params; outer gradients dE/dw, dE/dlambda; the outer loss."""
    params, hparams = tl.check_inputs(params, hparams)
    params = tl.detached_leaves(params)
    loss = tl.scalar_loss(outer_loss, params, hparams, "outer_loss(params, hparams)")
    g = tl.grad_or_zeros(loss, params + hparams, retain_graph=create_graph, create_graph=create_graph)
    g_w, g_h = g[:len(params)], g[len(params):]
    tl.assert_finite(g_w + g_h, "the gradient of outer_loss")
    return params, hparams, g_w, g_h, loss


def hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], fp_map: FpMap, outer_loss: OuterLoss,
                  solver: str = "cg", K: int = 100, tol: Optional[float] = None, rtol: Optional[float] = None,
                  v0: Optional[Sequence[Tensor]] = None, create_graph: bool = False, set_grad: bool = True,
                  stochastic: bool = False, operator: Optional[Tensor] = None,
                  fixed_point_tol: Optional[float] = None, **solver_options) -> HypergradResult:
    """Hypergradient at the fixed point ``params`` of ``fp_map``, solving for the adjoint with ``solver``.

    grad = dE/dlambda + (dPhi/dlambda)^T v, where (I - dPhi/dw)^T v = dE/dw.

    Args:
        params: the fixed point w (a list of tensors; not modified).
        hparams: lambda (a list of tensors).
        fp_map: Phi(params, hparams) -> list shaped like params.
        outer_loss: E(params, hparams) -> scalar.
        solver: "fixed_point", "neumann", "cg", "cg_normaleq", "minres", "gmres" or "dense".
        K: maximum number of iterations of the solver (a non-negative integer).
        tol: stop when the residual is <= max(tol, rtol * ||dE/dw||). Neither given: relative,
            ``rtol = default_rtol(dtype)`` (1e-10 in float64, 1.2e-5 in float32), so scaling the outer loss
            by c scales the result by c. One given: the other is 0. An absolute ``tol`` at or above a
            nonzero ||dE/dw|| is not taken as a solved system (the zero adjoint): a warning, and the
            default relative tolerance instead.
        rtol: the relative tolerance of the same rule (see ``tol``).
        v0: warm start for the adjoint (e.g. ``result.v`` of the previous outer step).
        create_graph: return the hypergradient with a graph whose derivatives are the exact higher
            derivatives of ``f(lambda) = E(w*(lambda), lambda)``: params enter as the implicit layer's
            solution ``w*(lambda)`` ([`custom_fixed_point`][hypergrad.custom_fixed_point]), so differentiating
            again also differentiates ``w*`` and the adjoint solve implicitly (each a linear solve with ``solver``). Not
            with ``stochastic`` or ``operator``.
        set_grad: add the result to ``hparam.grad``.
        stochastic: ``fp_map`` is random; re-evaluate it at every product.
        operator: optional explicit (I - dPhi/dw)^T as an n x n matrix (n = numel of all params), used
            for the solve instead of VJPs through ``fp_map`` (e.g. a materialized KKT matrix); ``fp_map``
            still gives dPhi/dlambda.
        fixed_point_tol: the largest accepted ``fp_residual_rel`` (see [`HypergradResult`][hypergrad.HypergradResult]):
            above it, [`NotAFixedPointError`][hypergrad.NotAFixedPointError]. None: a
            [`FixedPointWarning`][hypergrad.FixedPointWarning] above ``fixed_point_warn_rtol`` (1e-3 in float64, 1.2e-2
            in float32). ``math.inf``: no check.
        solver_options: passed to the solver (``check_every``, ``divergence_factor``, ``restart``); unknown
            names are an error listing the valid ones.
    """
    K = check_solver_call(solver, SOLVERS, K, solver_options)
    for name, flag in (("create_graph", create_graph), ("set_grad", set_grad), ("stochastic", stochastic)):
        tl.check_flag(flag, name)
    if create_graph:
        return _differentiable(params, hparams, fp_map, outer_loss, solver, K, tol, rtol, v0, set_grad, stochastic,
                               operator, fixed_point_tol, solver_options)
    with torch.enable_grad():
        params, hparams, g_w, g_h, loss = _prepare(params, hparams, outer_loss, create_graph)
        system = _FixedPointSystem(params, hparams, fp_map, stochastic, create_graph, operator)
        fp_abs, fp_rel = system.residual()
        check_fixed_point(fp_abs, fp_rel, fixed_point_tol, params[0].dtype)
        options = dict(maxiter=K, tol=tol, rtol=rtol, **solver_options)
        if solver == "cg" and stochastic:
            options.setdefault("check_symmetry", False)  # a different operator at every product
        if solver == "cg_normaleq":
            options["rmatvec"] = system.rmatvec
        if solver == "dense":
            options["matmat"] = system.matmat
        v, info = SOLVERS[solver](system.matvec, g_w, v0, **options)
        indirect = system.vjp(v, hparams)
        grads = [a + b for a, b in zip(g_h, indirect)]
    if not create_graph:
        grads = [g.detach() for g in grads]
        v = [t.detach() for t in v]
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return HypergradResult(grads, v, info.iterations, info.residual, info.converged, info.solver, fp_abs, fp_rel,
                           loss.detach())


def _differentiable(params, hparams, fp_map, outer_loss, solver, K, tol, rtol, v0, set_grad, stochastic, operator,
                    fixed_point_tol, solver_options) -> HypergradResult:
    """``hypergradient(create_graph=True)``: the gradient of E(w*(lambda), lambda) by autograd through the
    implicit layer, with ``params`` taken as its solution (checked as a fixed point first)."""
    from .layer import custom_fixed_point
    if stochastic or operator is not None:
        raise ValueError("create_graph=True differentiates the map's exact derivatives again; it cannot be combined "
                         f"with {'stochastic=True' if stochastic else 'an explicit operator'}")
    with torch.enable_grad():
        params, hparams = tl.check_inputs(params, hparams)
        # the layer's forward checks params as a fixed point (check_fixed_point) and reports its residuals
        solve = custom_fixed_point(fp_map, fixed_point_tol=fixed_point_tol, backward_solver=solver, backward_maxiter=K,
                                   backward_tol=tol, backward_rtol=rtol, strict=False, warm_start=v0 is not None,
                                   backward_options=solver_options)(lambda w0, h: w0)
        if v0 is not None:
            solve.layer.adjoint = tl.check_like(v0, params, "v0 (warm start)")
        w = solve(params, hparams)
        fp_abs, fp_rel = solve.layer.forward_info.residual, solve.layer.forward_info.residual_rel
        loss = tl.scalar_loss(outer_loss, w, hparams, "outer_loss(params, hparams)")
        with warnings.catch_warnings():  # an unconverged adjoint is reported in the result, as without create_graph
            warnings.filterwarnings("ignore", message="the implicit layer's backward solve did not converge")
            grads = tl.grad_or_zeros(loss, hparams, retain_graph=True, create_graph=True)
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    info = solve.layer.backward_info
    if info is None:  # the outer loss does not depend on w: no adjoint solve ran
        info = SolveInfo(solver, 0, 0.0, True)
    v = solve.layer.adjoint if solve.layer.adjoint is not None else tl.zeros_like(params)
    return HypergradResult(grads, v, info.iterations, info.residual, info.converged, info.solver, fp_abs, fp_rel,
                           loss.detach())


def fixed_point_residuals(params, mapped, dots, scale_floor: float = 0.0, floor_ratio: float = 1e-3):
    """(||Phi(w) - w||, the per-tensor relative residual of ``_FixedPointSystem.residual``); ``dots(xs, ys)``
    stacks the inner products per tensor along dim 0 (per task as a last dimension in the batched case).
    Every tensor counts at a scale of at least ``floor_ratio`` (1e-3) times the largest, and at least
    ``scale_floor`` (a forward solve passes eps times its starting scale, so a fixed point at 0 is reached).
    With ``dots=tl.dots`` (one system) the 3 n norms come from one multi-tensor kernel."""
    if dots is tl.dots and len({(t.dtype, t.device) for t in list(params) + list(mapped)}) == 1:
        n = len(params)
        d2, w2, m2 = torch.stack(torch._foreach_norm(list(torch._foreach_sub(list(mapped), list(params)))
                                                     + list(params) + list(mapped))).square().reshape(3, n)
    else:
        diff = [m - p for m, p in zip(mapped, params)]
        d2, w2, m2 = dots(diff, diff), dots(params, params), dots(mapped, mapped)
    scale = torch.maximum(w2, m2).sqrt()
    floor = (floor_ratio * scale.max(0).values).clamp_min(scale_floor)  # tensors 1000x smaller than the largest
    # (multipliers, momentum buffers at zero) count at that scale: their rounding-level residuals are no alarm
    rel = d2.sqrt() / torch.maximum(scale, floor)
    rel = torch.where(d2 == 0, torch.zeros_like(rel), rel)  # 0/0: a zero tensor that maps to zero (NaN stays NaN)
    return d2.sum(0).sqrt(), rel.max(0).values


_SOLVE_ARGS = {"matvec", "b", "x0", "maxiter", "tol", "rtol", "batched", "rmatvec", "matmat"}


def check_solver_call(solver: str, solvers: dict, K, options: dict) -> int:
    """Validate a solver name, K (returned as an int) and the extra solver options against the solver's
    signature; the errors list the valid choices."""
    if solver not in solvers:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(solvers)}")
    K = tl.check_count(K, "K")
    fn = solvers[solver]
    valid = sorted(set(inspect.signature(fn).parameters) - _SOLVE_ARGS) if options else []
    for name in options:
        if name == "maxiter":
            raise TypeError("maxiter is set by K (the maximum number of iterations): pass K=... instead")
        if name not in valid:
            raise TypeError(f"unknown option {name!r} for solver {solver!r}; its options are {valid}")
    return K


def check_fixed_point(fp_abs, fp_rel, fixed_point_tol: Optional[float], dtype: torch.dtype = torch.float64) -> None:
    """Raise (``fixed_point_tol`` given) or warn (None) when params are far from a fixed point."""
    if fixed_point_tol is not None and (isinstance(fixed_point_tol, bool) or not fixed_point_tol >= 0):
        raise ValueError(f"fixed_point_tol must be a number >= 0 (math.inf: no check), got {fixed_point_tol!r}")
    worst = max(fp_rel) if isinstance(fp_rel, (list, tuple)) else float(fp_rel)
    if not math.isfinite(worst):
        raise tl.NonFiniteError("fp_map(params, hparams) contains NaN or Inf")
    msg = (f"params are not a fixed point of fp_map: ||Phi(w) - w|| = {max(fp_abs) if isinstance(fp_abs, (list, tuple)) else fp_abs:.3e}, "
           f"{worst:.3e} relative to ||w||; the implicit hypergradient is exact only at a fixed point (its error "
           "grows like ||Phi(w) - w|| / (1 - rho), rho the contraction factor): run the inner solver longer")
    if fixed_point_tol is not None:
        if worst > fixed_point_tol:
            raise NotAFixedPointError(f"{msg} (fixed_point_tol={fixed_point_tol:g})")
    elif worst > fixed_point_warn_rtol(dtype):  # a fixed text: shown once per call site, not every step
        warnings.warn(f"params are not a fixed point of fp_map: ||Phi(w) - w|| / ||w|| > {fixed_point_warn_rtol(dtype):g} "
                      "(the result's fp_residual_rel has the value); the implicit hypergradient is exact only at a "
                      "fixed point (its error grows like ||Phi(w) - w|| / (1 - rho), rho the contraction factor): run "
                      "the inner solver longer, or pass fixed_point_tol=math.inf to accept it", FixedPointWarning,
                      stacklevel=3)


def _hypertorch_style(solver, params, hparams, K, fp_map, outer_loss, tol, set_grad, stochastic=False):
    """hypertorch's call: the general entry with an absolute ``tol``, returning only the grads."""
    return hypergradient(params, hparams, fp_map, outer_loss, solver=solver, K=K, tol=tol,
                         set_grad=tl.check_flag(set_grad, "set_grad"), stochastic=stochastic).grads


def fixed_point(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True, stochastic=False):
    """Hypergradient with the adjoint from the fixed-point iteration v <- (dPhi/dw)^T v + dE/dw (hypertorch's).

    Converges when Phi contracts (spectral radius of dPhi/dw below 1); a map that does not is a
    [`DivergenceError`][hypergrad.DivergenceError]. The checks and diagnostics of
    [`hypergradient`][hypergrad.hypergradient] (``solver="fixed_point"``) apply.

    Args:
        params: w, a fixed point of ``fp_map`` (tensors with ``requires_grad``).
        hparams: lambda (tensors with ``requires_grad``).
        K: the largest number of iterations (a non-negative int).
        fp_map: Phi, ``fp_map(params, hparams) -> list`` of tensors shaped like ``params``.
        outer_loss: E, ``outer_loss(params, hparams) -> scalar``.
        tol: stop when the residual norm is below this absolute tolerance (hypertorch's meaning; see the
            porting guide for its two guards).
        set_grad: add the result to ``hparam.grad``.
        stochastic: ``fp_map`` is random; re-evaluate it at every product.

    Returns:
        One tensor per hparam, dE/dlambda.
    """
    return _hypertorch_style("fixed_point", params, hparams, K, fp_map, outer_loss, tol, set_grad, stochastic)


def CG(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True, stochastic=False):
    """Hypergradient with the adjoint from conjugate gradient on (I - dPhi/dw)^T v = dE/dw (hypertorch's).

    For a symmetric positive definite I - dPhi/dw (gradient-descent maps of a convex inner loss); a
    non-symmetric one is a [`BreakdownError`][hypergrad.BreakdownError] naming gmres. Returns the latest CG
    iterate (hypertorch returns the one before). Arguments and result as in
    [`fixed_point`][hypergrad.fixed_point]; see [`hypergradient`][hypergrad.hypergradient] (``solver="cg"``).
    """
    return _hypertorch_style("cg", params, hparams, K, fp_map, outer_loss, tol, set_grad, stochastic)


def minres(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True, stochastic=False):
    """Hypergradient with the adjoint from MINRES on (I - dPhi/dw)^T v = dE/dw (symmetric, possibly indefinite).

    For KKT maps and non-convex inner losses. Arguments and result as in [`fixed_point`][hypergrad.fixed_point];
    see [`hypergradient`][hypergrad.hypergradient] (``solver="minres"``).
    """
    return _hypertorch_style("minres", params, hparams, K, fp_map, outer_loss, tol, set_grad, stochastic)


def gmres(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True, stochastic=False):
    """Hypergradient with the adjoint from GMRES on (I - dPhi/dw)^T v = dE/dw (any nonsingular operator).

    For momentum maps (`HeavyBall`, `Momentum`) and other non-symmetric ones. Arguments and result as in
    [`fixed_point`][hypergrad.fixed_point]; see [`hypergradient`][hypergrad.hypergradient] (``solver="gmres"``).
    """
    return _hypertorch_style("gmres", params, hparams, K, fp_map, outer_loss, tol, set_grad, stochastic)


def CG_normaleq(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True):
    """CG on the normal equations (I - J)(I - J^T) v = (I - J) dE/dw, J = dPhi/dw; any nonsingular map.

    It squares the condition number: prefer [`gmres`][hypergrad.gmres]. Arguments and result as in
    [`fixed_point`][hypergrad.fixed_point].
    """
    return _hypertorch_style("cg_normaleq", params, hparams, K, fp_map, outer_loss, tol, set_grad)


def neumann(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True):
    """Neumann series v = sum_{i<=K} (J^T)^i dE/dw, J = dPhi/dw; equals ``fixed_point`` with K + 1 steps.

    Arguments and result as in [`fixed_point`][hypergrad.fixed_point]; it stops when the last term's norm is
    below ``tol``.
    """
    return _hypertorch_style("neumann", params, hparams, K, fp_map, outer_loss, tol, set_grad)


cg = CG
"""[`CG`][hypergrad.CG] under its lower-case name."""
cg_normaleq = CG_normaleq
"""[`CG_normaleq`][hypergrad.CG_normaleq] under its lower-case name."""


def reverse_unroll(params, hparams, outer_loss, set_grad=True):
    """Backpropagate through the inner solver's graph: dE(w_T(lambda), lambda)/dlambda (hypertorch's).

    Args:
        params: w_T, the last inner iterate, with the graph of the inner steps back to ``hparams`` (without it, a
            ``ValueError``: the dependence would be dropped).
        hparams: lambda (tensors with ``requires_grad``).
        outer_loss: E, ``outer_loss(params, hparams) -> scalar``.
        set_grad: add the result to ``hparam.grad``.

    Returns:
        One tensor per hparam (zeros for one the loss does not reach).
    """
    params = tl.as_tensor_list(params, "params")
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
    tl.check_flag(set_grad, "set_grad")
    _check_depends(params, hparams)
    loss = tl.scalar_loss(outer_loss, params, hparams, "outer_loss(params, hparams)")
    grads = tl.grad_or_zeros(loss, hparams, retain_graph=True)
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return grads


def _check_depends(params, hparams) -> None:
    """``params`` must have an autograd graph that reaches at least one hparam (a breadth-first walk of
    the graph, stopping at the first hparam: the last inner step uses them, so this is quick)."""
    is_hparam = [any(p is h for h in hparams) for p in params]
    leaves = [i for i, p in enumerate(params) if p.grad_fn is None and p.requires_grad and not is_hparam[i]]
    if not leaves and any(is_hparam):
        return
    if leaves or not any(p.grad_fn is not None for p in params):
        which = f"params{leaves}" if leaves else "params"
        raise ValueError(f"reverse_unroll differentiates through the inner solver's graph, but {which} have none "
                         "(leaves, e.g. made by .detach().requires_grad_()): their dependence on the hparams would be "
                         "dropped. Keep the graph of the inner steps (create_graph=True), or use an implicit method "
                         "(hypergrad.cg, fixed_point) at a fixed point")
    targets = {id(h) for h in hparams}
    nodes = {id(h.grad_fn): None for h in hparams if h.grad_fn is not None}
    for fn in tl.walk_graph(params):
        if id(fn) in nodes or id(getattr(fn, "variable", None)) in targets:
            return
    raise ValueError("reverse_unroll: params do not depend on hparams (their graph never reaches an hparam): the "
                     "hypergradient would be only dE/dlambda. Build the inner iterates from the hparams without "
                     "detaching them, or use an implicit method at a fixed point")


def reverse(params_history, hparams, update_map_history, outer_loss, set_grad=True, *, tol=None):
    """Reverse mode by recomputing each inner update from the stored iterates (memory O(one step)).

    ``params_history`` = [w_0, ..., w_T] and ``update_map_history`` = [Phi_1, ..., Phi_T] with
    w_t = Phi_t(w_{t-1}, lambda). Passing only the last k iterates and maps gives truncated reverse.

    Args:
        params_history: the iterates [w_0, ..., w_T], each a list of tensors.
        hparams: lambda (tensors with ``requires_grad``).
        update_map_history: the maps [Phi_1, ..., Phi_T], exactly one fewer than the iterates (else a
            ``ValueError``).
        outer_loss: E, ``outer_loss(params, hparams) -> scalar``, at w_T.
        set_grad: add the result to ``hparam.grad``.
        tol: accepted and ignored, for older hypertorch code.

    Returns:
        One tensor per hparam.
    """
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
    tl.check_flag(set_grad, "set_grad")
    history = [tl.detached_leaves(tl.as_tensor_list(p, f"params_history[{i}]"))
               for i, p in enumerate(params_history)]
    if len(update_map_history) != len(history) - 1:
        raise ValueError(f"reverse needs one update map per step: {len(history)} iterates but "
                         f"{len(update_map_history)} maps (expected {len(history) - 1})")
    with torch.enable_grad():
        loss = tl.scalar_loss(outer_loss, history[-1], hparams, "outer_loss(params, hparams)")
        alpha = tl.grad_or_zeros(loss, history[-1], retain_graph=True)
        grads = tl.grad_or_zeros(loss, hparams, retain_graph=False)
        for t in range(len(update_map_history) - 1, -1, -1):
            mapped = tl.check_like(update_map_history[t](history[t], hparams), history[t],
                                   f"update_map_history[{t}](params, hparams)")
            alpha, g_t = tl.step_vjp(mapped, history[t], hparams, alpha)
            grads = [g + s for g, s in zip(grads, g_t)]
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return grads


def exact(opt_params_f, hparams, outer_loss, set_grad=True):
    """Backpropagate through a closed-form solution: dE(w(lambda), lambda)/dlambda with w = ``opt_params_f(lambda)``.

    Args:
        opt_params_f: ``opt_params_f(hparams) -> params``, differentiable in ``hparams``.
        hparams: lambda (tensors with ``requires_grad``).
        outer_loss: E, ``outer_loss(params, hparams) -> scalar``.
        set_grad: add the result to ``hparam.grad``.

    Returns:
        One tensor per hparam.
    """
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
    tl.check_flag(set_grad, "set_grad")
    with torch.enable_grad():
        params = tl.as_tensor_list(opt_params_f(hparams), "opt_params_f(hparams)")
        return reverse_unroll(params, hparams, outer_loss, set_grad=set_grad)


def stoch_AID(params, hparams, outer_loss, K, J_inner=1, J_outer=1, fp_map=None, inner_loss=None,
              linsys_start=None, stoch_outer=False, stoch_inner=False, optim_build=None, opt_params=None,
              set_grad=True, verbose=True):
    """Stochastic implicit differentiation (hypertorch's signature and return ``(grads, v)``).

    Solves the adjoint system by K steps of a torch optimizer (default SGD with lr 1, i.e. the
    fixed-point iteration) on minibatch estimates; averages J_outer outer and J_inner inner samples.
    With ``inner_loss`` instead of ``fp_map`` the system is H v = dE/dw (H the inner Hessian).

    Args:
        params: w, the inner solution (a list of tensors; not modified).
        hparams: lambda (tensors with ``requires_grad``).
        outer_loss: E, ``outer_loss(params, hparams) -> scalar`` (a minibatch estimate with ``stoch_outer``).
        K: the number of steps of the adjoint optimizer (a non-negative int).
        J_inner: the number of evaluations of the map averaged in the (dPhi/dlambda)^T v term (at least 1); other than 1
            only with ``stoch_inner=True``.
        J_outer: the number of evaluations of ``outer_loss`` averaged in dE/dw and dE/dlambda (at least 1); other than 1
            only with ``stoch_outer=True``.
        fp_map: Phi, ``fp_map(params, hparams) -> list`` of tensors shaped like ``params``; used when given
            (also when ``inner_loss`` is given too, as in hypertorch).
        inner_loss: ``inner_loss(params, hparams) -> scalar``, used when ``fp_map`` is None: the map is
            Phi = -d inner_loss/dw and the system H v = dE/dw. One of ``fp_map`` and ``inner_loss`` is needed.
        linsys_start: the start of the adjoint v, shaped like ``params`` (copied, not modified); default dE/dw.
        stoch_outer: ``outer_loss`` is random (allows ``J_outer > 1``; the final check that the residual
            decreased is skipped).
        stoch_inner: the map (or ``inner_loss``) is random: re-evaluated at every product (allows
            ``J_inner > 1``; the final residual check is skipped).
        optim_build: ``optim_build(v, **opt_params) -> (optimizer, scheduler)`` for the list of tensors v;
            ``scheduler`` may be None, else its ``step()`` follows each optimizer step. Default
            ``torch.optim.SGD(v, lr=1.0)`` without a scheduler.
        opt_params: a dict of keyword arguments for ``optim_build`` (default none).
        set_grad: add the result to ``hparam.grad``.
        verbose: print the residual norm of the linear system every ``K // 5`` steps and at the last one
            (at every step when K < 5).

    Returns:
        ``(grads, v)``: one tensor per hparam, dE/dlambda (without a graph), and the adjoint v after the K
        steps (one tensor per param).
    """
    if fp_map is None and inner_loss is None:
        raise ValueError("stoch_AID needs fp_map or inner_loss")
    inner_loss = None if fp_map is not None else inner_loss  # both given: fp_map, as in hypertorch
    K = tl.check_count(K, "K")
    # at least one sample each: 0 would divide by zero, or silently drop the indirect term
    J_inner, J_outer = tl.check_count(J_inner, "J_inner", 1), tl.check_count(J_outer, "J_outer", 1)
    tl.check_flag(set_grad, "set_grad")
    if J_inner != 1 and not stoch_inner:
        raise ValueError("J_inner > 1 only makes sense with stoch_inner=True")
    if J_outer != 1 and not stoch_outer:
        raise ValueError("J_outer > 1 only makes sense with stoch_outer=True")
    with torch.enable_grad():
        params, hparams, g_w, g_h, _ = _prepare(params, hparams, outer_loss, False)
        for _ in range(J_outer - 1):
            _, _, gw1, gh1, _ = _prepare(params, hparams, outer_loss, False)
            g_w, g_h = tl.axpy(1.0, gw1, g_w), tl.axpy(1.0, gh1, g_h)
        g_w, g_h = tl.scale(1.0 / J_outer, g_w), tl.scale(1.0 / J_outer, g_h)
        if fp_map is None:  # Phi = -grad inner_loss: the system becomes H v = g (sign handled below)
            def fp_map(p, h):
                return [-g for g in torch.autograd.grad(inner_loss(p, h), p, create_graph=True)]
        system = _FixedPointSystem(params, hparams, fp_map, stoch_inner, False)
        v = [t.detach().clone() for t in (linsys_start if linsys_start is not None else g_w)]
        if optim_build is None:
            optim, scheduler = torch.optim.SGD(v, lr=1.0), None
        else:
            optim, scheduler = optim_build(v, **(opt_params or {}))
        rows = [t.detach().reshape(1, -1) for t in g_w]
        mon = None
        for i in range(K):
            jtv = system.vjp(v, params)
            # gradient of the quadratic whose minimizer is the adjoint: (I - J^T) v - g, or H v - g
            step = [a - j - g if inner_loss is None else -j - g for a, j, g in zip(v, jtv, g_w)]
            res = tl.norm(step).detach().reshape(1)
            if mon is None:  # the core's monitor and contraction rules, as in fixed_point
                hint = "; lower the adjoint optimizer's learning rate (optim_build) or check that the map contracts"
                mon = _Monitor("stoch_AID", rows, res, 0.0, 0.0, None, 1e6, cold=False, hint=hint)
                contraction = _Contraction(mon, "stoch_AID", hint, K, 1)
            elif mon.check_now(i, i == K - 1):
                mon.raise_if_bad(i, res)
                contraction.check(i, res, torch.zeros_like(res), True)
            for t, s in zip(v, step):
                t.grad = s.detach()
            optim.step()
            if scheduler is not None:
                scheduler.step()
            if verbose and (K < 5 or i % max(K // 5, 1) == 0 or i == K - 1):
                print(f"k={i}: linsys residual = {float(tl.norm(step)):.3e}")
        tl.assert_finite(v, "stoch_AID's adjoint (the linear system diverged)")
        if mon is not None and not (stoch_inner or stoch_outer):  # noisy estimates may end above their start
            contraction.check_end(K, res, torch.zeros_like(res, dtype=torch.bool))
        indirect = [torch.zeros_like(h) for h in hparams]
        for _ in range(J_inner):
            indirect = tl.axpy(1.0 / J_inner, system.vjp([t.detach() for t in v], hparams), indirect)
        grads = [a.detach() + b.detach() for a, b in zip(g_h, indirect)]
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return grads, v


# hypertorch's public utilities, for code that imports them from hypergrad.hypergradients
def get_outer_gradients(outer_loss, params, hparams, retain_graph=True):
    """(dE/dparams, dE/dhparams) of an evaluated outer loss, zeros where unused.

    Args:
        outer_loss: the outer loss E already evaluated (a scalar tensor with a graph), not a callable.
        params: the tensors of the first gradient (a sequence).
        hparams: the tensors of the second gradient (a sequence).
        retain_graph: keep the graph of ``outer_loss`` after the second gradient (it is always kept after
            the first).

    Returns:
        A pair of lists: dE/dparams (one tensor per param) and dE/dhparams (one per hparam), without a graph.
    """
    return (tl.grad_or_zeros(outer_loss, params, retain_graph=True),
            tl.grad_or_zeros(outer_loss, hparams, retain_graph=retain_graph))


def grad_unused_zero(output, inputs, grad_outputs=None, retain_graph=False, create_graph=False):
    """torch.autograd.grad with zeros for unused inputs (a tuple, as in hypertorch).

    Args:
        output: the tensor (or sequence of tensors) to differentiate.
        inputs: the sequence of tensors to differentiate with respect to.
        grad_outputs: the vector(s) of the vector-Jacobian product, as in ``torch.autograd.grad`` (None for
            a scalar ``output``).
        retain_graph: keep the graph after the call (passed to ``torch.autograd.grad``).
        create_graph: build a graph of the gradients, for higher derivatives (passed to ``torch.autograd.grad``).

    Returns:
        A tuple with one tensor per input: its gradient, or zeros where ``output`` does not depend on it.
    """
    return tuple(tl.grad_or_zeros(output, inputs, grad_outputs, retain_graph, create_graph))


cat_list_to_tensor = tl.flatten


def update_tensor_grads(hparams, grads):
    """hypertorch's helper: hparam.grad += grad for each pair, creating ``.grad`` where missing; a ``None`` grad
    (an hparam without a gradient) leaves ``.grad`` as it is, zeros where it was missing, as hypertorch does.

    Args:
        hparams: the tensors whose ``.grad`` is updated in place.
        grads: one tensor (shaped like its hparam) or None per hparam, paired in order.
    """
    for h, g in zip(hparams, grads):
        if g is not None:
            tl.accumulate_grads([h], [g])
        elif h.grad is None:
            h.grad = torch.zeros_like(h)
from ._hypertorch_helpers import CG_torch, cat_list_to_tensor, grd, jvp, list_dot  # noqa: E402,F401,F811

