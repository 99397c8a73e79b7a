"""Hypergradients for a batch of inner problems, each with its own active set, by one masked KKT map.

Element b has w_b = [y_b, mu_b (all m multipliers), nu_b] and a 0/1 mask of its active inequalities.
The masked Lagrangian  L_b = g + sum_i (s_i mu_i p_i + (1 - s_i) mu_i^2 / 2) + nu^T q  (s = mask) gives
I - d_w Phi = eta K_b with the inactive multipliers decoupled on a unit diagonal, so the fixed-size map
over the whole batch is block diagonal with the same y-part as the dropped map of each element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from hypergrad import tensor_list as tl

from .hypergradients import SOLVERS, pick_solver, solve_adjoint
from .kkt import KKTReport, analyze
from .problem import ConstrainedProblem


@dataclass
class BatchResult:
    """The result of [`batch_hypergradient`][constrained.batch_hypergradient].

    ``grads`` (one per hparam), adjoint ``v``, one KKT report per element (``reports``), solver diagnostics.
    """
    grads: List[Tensor]
    v: List[Tensor]
    reports: List[KKTReport]
    solver: str
    iterations: int
    residual: float
    converged: bool


def _element(xs: Sequence[Tensor], batched: Sequence[bool], b: int) -> List[Tensor]:
    return [x[b] if bt else x for x, bt in zip(xs, batched)]


def batch_hypergradient(problem: ConstrainedProblem, params: Sequence[Tensor], hparams: Sequence[Tensor],
                        outer_loss: Callable, mu: Optional[Tensor] = None, nu: Optional[Tensor] = None,
                        solver: str = "auto", *, hparams_batched: Sequence[bool], K: Optional[int] = None,
                        tol: float = 0.0, rtol: Optional[float] = None, eta: float = 1.0, degenerate: str = "drop",
                        with_multipliers: bool = False, set_grad: bool = True, vectorize: bool = True,
                        dense_max: int = 1500, active_rtol: float = 1e-6, active_atol: float = 1e-12,
                        kkt_tol: Optional[float] = 1e-5) -> BatchResult:
    """Hypergradient of ``outer_loss(params, hparams)`` through B inner problems, each with its own active set.

    ``problem``'s callables describe one element; one masked KKT map covers the batch. The arguments not
    listed are those of [`constrained.hypergradient`][constrained.hypergradient].

    Args:
        params: the B solutions, ``params[i]`` of shape (B, ...).
        hparams: the outer variables, batched or shared (see ``hparams_batched``).
        outer_loss: a scalar over the whole batch; with ``with_multipliers`` it gets
            ``(params, hparams, mu, nu)``, batched.
        mu: the inequality multipliers, shape (B, m).
        nu: the equality multipliers, shape (B, k).
        hparams_batched: one flag per hparam: True when it has the batch as its first dimension, False when
            it is shared by all elements.
        vectorize: evaluate the elements with ``torch.func.vmap`` (a Python loop otherwise).
    """
    if solver not in SOLVERS:
        pick_solver(solver, 0, True, 0)
    if not (isinstance(eta, (int, float)) and eta > 0):
        raise ValueError(f"eta must be a positive scalar, got {eta!r}")
    params, hparams = tl.as_tensor_list(params, "params"), tl.as_tensor_list(hparams, "hparams")
    hb = list(hparams_batched)
    if len(hb) != len(hparams):
        raise ValueError(f"hparams_batched has {len(hb)} entries for {len(hparams)} hparams")
    if len(params) == 0 or params[0].dim() == 0:
        raise ValueError("params must be a non-empty list of tensors with a leading batch dimension")
    B = params[0].shape[0]
    for name, t in [(f"params[{i}]", p) for i, p in enumerate(params)] + \
                   [(f"hparams[{j}]", h) for j, h in enumerate(hparams) if hb[j]] + [("mu", mu), ("nu", nu)]:
        if t is not None and (t.dim() == 0 or t.shape[0] != B):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected batch size {B} in dimension 0")

    reports, mus, nus = [], [], []
    for b in range(B):
        rep, mu_b, nu_b = analyze(problem, _element(params, [True] * len(params), b), _element(hparams, hb, b),
                                  None if mu is None else mu[b], None if nu is None else nu[b],
                                  degenerate=degenerate, rtol=active_rtol, atol=active_atol, kkt_tol=kkt_tol)
        reports.append(rep)
        mus.append(mu_b)
        nus.append(nu_b)
    m, k, n_p = reports[0].n_ineq, reports[0].n_eq, len(params)
    mask = torch.zeros(B, m, dtype=params[0].dtype, device=params[0].device)
    for b, rep in enumerate(reports):
        mask[b, rep.active] = 1.0
    w = [t.detach().clone() for t in params] + ([torch.stack(mus)] if m else []) + ([torch.stack(nus)] if k else [])

    def unpack(w_):
        return list(w_[:n_p]), (w_[n_p] if m else None), (w_[-1] if k else None)

    def element_lagrangian(y, x, mu_, nu_, s):
        return problem.lagrangian(y, x, mu_, nu_, mask=s)

    def total_lagrangian(w_, hparams_):
        y, mu_, nu_ = unpack(w_)
        if vectorize:
            dims = ([0] * n_p, [0 if bt else None for bt in hb], 0 if m else None, 0 if k else None, 0)
            return torch.func.vmap(element_lagrangian, in_dims=dims)(y, list(hparams_), mu_, nu_, mask).sum()
        return sum(element_lagrangian(_element(y, [True] * n_p, b), _element(hparams_, hb, b),
                                      None if mu_ is None else mu_[b], None if nu_ is None else nu_[b], mask[b])
                   for b in range(B))

    def fp_map(w_, hparams_):
        with torch.enable_grad():
            wg = [t if t.requires_grad else t.detach().requires_grad_(True) for t in w_]
            grads = tl.grad_or_zeros(total_lagrangian(wg, hparams_), wg, create_graph=True)
        return [t - eta * g for t, g in zip(wg, grads)]

    def loss_w(w_, hparams_):
        y, mu_, nu_ = unpack(w_)
        return outer_loss(y, hparams_, mu_, nu_) if with_multipliers else outer_loss(y, hparams_)

    n = sum(t.numel() for t in w)
    name = pick_solver(solver, n, all(r.licq for r in reports), dense_max)
    if rtol is None:  # as constrained.hypergradient: reachable in float32 too
        rtol = max(1e-11, 100 * torch.finfo(w[0].dtype).eps)
    res = solve_adjoint(w, hparams, fp_map, loss_w, name, K=K, tol=tol, rtol=rtol, v0=None, set_grad=set_grad)
    return BatchResult(res.grads, res.v, reports, res.solver, res.iterations, res.residual, res.converged)
