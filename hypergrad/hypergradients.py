"""Hypergradients of fixed-point maps: one general entry point and hypertorch's functions over it.

Problem: min_lambda E(w(lambda), lambda) with w(lambda) = Phi(w(lambda), lambda). At the fixed point

    grad f = dE/dlambda + (dPhi/dlambda)^T v,    (I - dPhi/dw)^T v = dE/dw,

``v`` being the adjoint. Implicit methods differ only in how they solve for ``v``
(:mod:`hypergrad.linear_solvers`); each product with (dPhi/dw)^T is one vector-Jacobian product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import tensor_list as tl
from .linear_solvers import SOLVERS

FpMap = Callable[[List[Tensor], List[Tensor]], List[Tensor]]
OuterLoss = Callable[[List[Tensor], List[Tensor]], Tensor]


@dataclass
class HypergradResult:
    """``grads`` (one per hparam), the adjoint ``v`` (pass it back as ``v0`` to warm-start the next
    outer step), the solver's ``iterations`` (products with dPhi/dw^T), final ``residual``, ``converged``."""
    grads: List[Tensor]
    v: List[Tensor]
    iterations: int
    residual: float
    converged: bool
    solver: str


class _FixedPointSystem:
    """The adjoint system (I - J^T) v = dE/dw with J = dPhi/dw at the given (w, lambda)."""

    def __init__(self, params, hparams, fp_map: FpMap, stochastic: bool, create_graph: bool,
                 operator: Optional[Tensor] = None):
        self.params, self.hparams, self.fp_map = params, hparams, fp_map
        self.stochastic, self.create_graph = stochastic, create_graph
        self._mapped = None if stochastic else self.map()
        self._jvp_graph = None
        self.operator = operator
        if operator is not None:
            n = sum(p.numel() for p in params)
            if operator.shape != (n, n):
                raise ValueError(f"operator has shape {tuple(operator.shape)}; expected ({n}, {n}) for params with "
                                 f"{n} entries in all")
            self.matvec = lambda u: tl.unflatten(operator @ tl.flatten(u), u)
            self.rmatvec = lambda u: tl.unflatten(operator.T @ tl.flatten(u), u)
            self.matmat = lambda: operator

    def map(self) -> List[Tensor]:
        out = self.fp_map(self.params, self.hparams)
        return tl.check_like(out, self.params, "fp_map(params, hparams)")

    def mapped(self) -> List[Tensor]:
        return self.map() if self.stochastic else self._mapped

    def vjp(self, u, wrt) -> List[Tensor]:
        """(dPhi/d wrt)^T u."""
        return tl.grad_or_zeros(self.mapped(), wrt, grad_outputs=u, retain_graph=True,
                                create_graph=self.create_graph)

    def matvec(self, u) -> List[Tensor]:
        """(I - J^T) u."""
        return tl.sub(u, self.vjp(u, self.params))

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
            self._jvp_graph = (dummy, tl.grad_or_zeros(self.mapped(), self.params, grad_outputs=dummy,
                                                       retain_graph=True, create_graph=True))
        dummy, jtd = self._jvp_graph
        return tl.sub(u, tl.grad_or_zeros(jtd, dummy, grad_outputs=u, retain_graph=True,
                                          create_graph=self.create_graph))


def _prepare(params, hparams, outer_loss: OuterLoss, create_graph: bool):
    """Validate inputs; detached leaf copies of params; outer gradients dE/dw, dE/dlambda."""
    params, hparams = tl.check_inputs(params, hparams)
    params = tl.detached_leaves(params)
    loss = tl.scalar_loss(outer_loss, params, hparams, "outer_loss(params, hparams)")
    g = tl.grad_or_zeros(loss, params + hparams, retain_graph=create_graph, create_graph=create_graph)
    g_w, g_h = g[:len(params)], g[len(params):]
    tl.assert_finite(g_w + g_h, "the gradient of outer_loss")
    return params, hparams, g_w, g_h


def hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], fp_map: FpMap, outer_loss: OuterLoss,
                  solver: str = "cg", K: int = 100, tol: float = 1e-10, rtol: float = 0.0,
                  v0: Optional[Sequence[Tensor]] = None, create_graph: bool = False, set_grad: bool = True,
                  stochastic: bool = False, operator: Optional[Tensor] = None,
                  **solver_options) -> HypergradResult:
    """Hypergradient at the fixed point ``params`` of ``fp_map``, solving for the adjoint with ``solver``.

    grad = dE/dlambda + (dPhi/dlambda)^T v, where (I - dPhi/dw)^T v = dE/dw.

    Args:
        solver: "fixed_point", "neumann", "cg", "cg_normaleq", "minres", "gmres" or "dense".
        K: maximum number of iterations of the solver.
        tol, rtol: stop when the residual is <= max(tol, rtol * ||dE/dw||).
        v0: warm start for the adjoint (e.g. ``result.v`` of the previous outer step).
        create_graph: keep the graph so the hypergradient can be differentiated again w.r.t. hparams
            (at the given params, which are treated as constants).
        set_grad: add the result to ``hparam.grad``.
        stochastic: ``fp_map`` is random; re-evaluate it at every product.
        operator: optional explicit (I - dPhi/dw)^T as an n x n matrix (n = numel of all params), used
            for the solve instead of VJPs through ``fp_map`` (e.g. a materialized KKT matrix); ``fp_map``
            still gives dPhi/dlambda.
        solver_options: passed to the solver (``check_every``, ``divergence_factor``, ``restart``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    if not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be a non-negative int, got {K!r}")
    with torch.enable_grad():
        params, hparams, g_w, g_h = _prepare(params, hparams, outer_loss, create_graph)
        system = _FixedPointSystem(params, hparams, fp_map, stochastic, create_graph, operator)
        options = dict(maxiter=K, tol=tol, rtol=rtol, **solver_options)
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
    return HypergradResult(grads, v, info.iterations, info.residual, info.converged, info.solver)


def _implicit(solver: str):
    """A hypertorch-style function (params, hparams, K, fp_map, outer_loss, tol, set_grad) -> grads."""

    def method(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True, stochastic=False):
        return hypergradient(params, hparams, fp_map, outer_loss, solver=solver, K=K, tol=tol,
                             set_grad=set_grad, stochastic=stochastic).grads

    method.__name__ = method.__qualname__ = solver
    method.__doc__ = (f"Hypergradient with the adjoint solved by {solver!r}, at most K iterations, stopping "
                      f"when the residual norm is < tol (hypertorch's signature). Returns one tensor per "
                      f"hparam and, with set_grad, adds it to hparam.grad. See :func:`hypergradient`.")
    return method


fixed_point = _implicit("fixed_point")
CG = _implicit("cg")
minres = _implicit("minres")
gmres = _implicit("gmres")


def CG_normaleq(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True):
    """CG on the normal equations (I - J)(I - J^T) v = (I - J) dE/dw; any nonsingular map."""
    return hypergradient(params, hparams, fp_map, outer_loss, solver="cg_normaleq", K=K, tol=tol,
                         set_grad=set_grad).grads


def neumann(params, hparams, K, fp_map, outer_loss, tol=1e-10, set_grad=True):
    """Neumann series v = sum_{i<=K} (J^T)^i dE/dw; equals ``fixed_point`` with K + 1 steps."""
    return hypergradient(params, hparams, fp_map, outer_loss, solver="neumann", K=K, tol=tol,
                         set_grad=set_grad).grads


cg = CG
cg_normaleq = CG_normaleq


def reverse_unroll(params, hparams, outer_loss, set_grad=True):
    """Backpropagate through the inner solver's graph: ``params`` must depend on ``hparams``."""
    params = tl.as_tensor_list(params, "params")
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
    loss = tl.scalar_loss(outer_loss, params, hparams, "outer_loss(params, hparams)")
    grads = tl.grad_or_zeros(loss, hparams, retain_graph=True)
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return grads


def reverse(params_history, hparams, update_map_history, outer_loss, set_grad=True, *, tol=None):
    """Reverse mode by recomputing each inner update from the stored iterates (memory O(one step)).

    ``params_history`` = [w_0, ..., w_T] and ``update_map_history`` = [Phi_1, ..., Phi_T] with
    w_t = Phi_t(w_{t-1}, lambda). Passing only the last k iterates and maps gives truncated reverse.
    ``tol`` is accepted (and ignored) for older hypertorch code.
    """
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
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
    """Backpropagate through a closed-form solution ``opt_params_f(hparams) -> params``."""
    hparams = tl.as_tensor_list(hparams, "hparams")
    tl.check_hparams(hparams)
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
    """
    if (fp_map is None) == (inner_loss is None):
        raise ValueError("stoch_AID needs exactly one of fp_map or inner_loss")
    if J_inner != 1 and not stoch_inner:
        raise ValueError("J_inner > 1 only makes sense with stoch_inner=True")
    if J_outer != 1 and not stoch_outer:
        raise ValueError("J_outer > 1 only makes sense with stoch_outer=True")
    with torch.enable_grad():
        params, hparams, g_w, g_h = _prepare(params, hparams, outer_loss, False)
        for _ in range(J_outer - 1):
            _, _, gw1, gh1 = _prepare(params, hparams, outer_loss, False)
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
        for i in range(K):
            jtv = system.vjp(v, params)
            # gradient of the quadratic whose minimizer is the adjoint: (I - J^T) v - g, or H v - g
            step = [a - j - g if inner_loss is None else -j - g for a, j, g in zip(v, jtv, g_w)]
            for t, s in zip(v, step):
                t.grad = s.detach()
            optim.step()
            if scheduler is not None:
                scheduler.step()
            if verbose and (K < 5 or i % max(K // 5, 1) == 0 or i == K - 1):
                print(f"k={i}: linsys residual = {float(tl.norm(step)):.3e}")
        tl.assert_finite(v, "stoch_AID's adjoint (the linear system diverged)")
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
    """(dE/dparams, dE/dhparams) of an evaluated outer loss, zeros where unused."""
    return (tl.grad_or_zeros(outer_loss, params, retain_graph=True),
            tl.grad_or_zeros(outer_loss, hparams, retain_graph=retain_graph))


def grad_unused_zero(output, inputs, grad_outputs=None, retain_graph=False, create_graph=False):
    """torch.autograd.grad with zeros for unused inputs (a tuple, as in hypertorch)."""
    return tuple(tl.grad_or_zeros(output, inputs, grad_outputs, retain_graph, create_graph))


cat_list_to_tensor = tl.flatten
update_tensor_grads = tl.accumulate_grads

