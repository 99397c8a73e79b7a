"""Hypergradients of a batch of independent inner problems (one per task) in one vectorized call.

Convention: every ``params`` tensor has a leading task dimension B; row b of ``fp_map(params, hparams)``
depends only on row b of the params (and on the hparams); ``outer_loss`` returns the B per-task losses.
Task b's adjoint solves (I - J_b^T) v_b = dE_b/dw_b. Because the tasks are independent, one VJP of the
batched map with the stacked cotangents gives every task's product, so the solvers below run all tasks
at once with per-task step sizes and per-task stopping: a task that has converged stops moving.

The hypergradient is that of sum_b E_b: hparams shared by all tasks (a meta-initialization, a shared
regularizer) get the sum of the per-task hypergradients (``per_task=True`` keeps them apart), per-task
hparams (leading dimension B) get one row per task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import BreakdownError, DivergenceError, NonFiniteError

BatchMatVec = Callable[[List[Tensor]], List[Tensor]]


@dataclass
class BatchedSolveInfo:
    """Per-task diagnostics, each a tensor of shape [B]: ``iterations`` (products the task needed),
    final ``residual`` norm, ``converged``."""
    solver: str
    iterations: Tensor
    residual: Tensor
    converged: Tensor


@dataclass
class BatchedHypergradResult:
    """``grads`` (one per hparam; summed over tasks for shared hparams unless ``per_task``), the
    adjoints ``v`` (leading dimension B: pass back as ``v0``), and per-task [B] diagnostics."""
    grads: List[Tensor]
    v: List[Tensor]
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    solver: str


def bdot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Per-task inner products <x_b, y_b>, shape [B]."""
    return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(xs, ys))


def baxpy(a: Tensor, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> List[Tensor]:
    """a_b * x_b + y_b for every task b (``a`` of shape [B])."""
    return [y + a.reshape(-1, *([1] * (x.dim() - 1))) * x for x, y in zip(xs, ys)]


class _TaskMonitor:
    """Per-task stopping rule (residual <= max(tol, rtol ||b_b||)) and safety checks, reading the
    device only every ``check_every`` iterations (every iteration on the CPU)."""

    def __init__(self, name: str, b: Sequence[Tensor], r0: Tensor, tol: float, rtol: float,
                 check_every: Optional[int], divergence_factor: float):
        if tol < 0 or rtol < 0:
            raise ValueError(f"tolerances must be >= 0, got tol={tol}, rtol={rtol}")
        self.name = name
        self.every = check_every or (1 if b[0].device.type == "cpu" else 10)
        self.threshold = torch.clamp(rtol * bdot(b, b).sqrt(), min=tol)
        self.r0 = r0
        self._raise_if_bad(0, r0, "the right-hand side or the starting point")
        self.limit = divergence_factor * torch.maximum(r0, self.threshold)

    def active(self, residual: Tensor) -> Tensor:
        return residual > self.threshold

    def check(self, it: int, residual: Tensor, active: Tensor, force: bool = False) -> bool:
        """True when every task has converged; raises on NaN/Inf or divergence (host read on checks)."""
        if not force and it % self.every != 0:
            return False
        self._raise_if_bad(it, residual, "the iterates")
        return not bool(active.any())

    def _raise_if_bad(self, it: int, residual: Tensor, what: str) -> None:
        bad = ~torch.isfinite(residual)
        if bool(bad.any()):
            raise NonFiniteError(f"{self.name}: NaN or Inf in {what} of task(s) {_tasks(bad)} after {it} iterations")
        if it > 0:
            grew = residual > self.limit
            if bool(grew.any()):
                raise DivergenceError(f"{self.name} diverges for task(s) {_tasks(grew)}: residual "
                                      f"{float(residual[grew].max()):.3e} after {it} iterations")


def _tasks(mask: Tensor, show: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:show])) + (f", ... ({len(idx)} in all)" if len(idx) > show else "")


def _start(matvec: BatchMatVec, b: Sequence[Tensor], x0):
    if x0 is None:
        return tl.zeros_like(b), list(b), 0
    x = [t.detach().clone() for t in tl.check_like(x0, b, "v0 (warm start)", "the adjoints")]
    return x, tl.sub(b, matvec(x)), 1


def _zero_where(mask: Tensor, a: Tensor) -> Tensor:
    return torch.where(mask, a, torch.zeros_like(a))


def batched_cg(matvec: BatchMatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10, rtol: float = 0.0,
               check_every: Optional[int] = None, divergence_factor: float = 1e6):
    """Conjugate gradient on B independent SPD systems at once (per-task alpha, beta and stopping).

    When every task's recurrence residual is below its tolerance, the true residuals b - A x are
    computed (one product) and the tasks that are not below restart from them, so ``converged``
    always refers to true residuals. p^T A p = 0 with a nonzero residual raises :class:`BreakdownError`.
    """
    x, r, its = _start(matvec, b, x0)
    rr = bdot(r, r)
    mon = _TaskMonitor("batched cg", b, rr.sqrt(), tol, rtol, check_every, divergence_factor)
    active = mon.active(rr.sqrt())
    task_its = torch.full_like(rr, its, dtype=torch.long)
    p, k, done, broke = r, 0, not bool(active.any()), torch.zeros_like(active)
    true_r = True  # r is b - A x computed directly (not the recurrence)
    while not done and k < maxiter:
        Ap = matvec(p)
        k += 1
        pAp = bdot(p, Ap)
        broke = broke | (active & (pAp == 0))
        alpha = _zero_where(active, rr / torch.where(active & (pAp != 0), pAp, torch.ones_like(pAp)))
        x, r, true_r = baxpy(alpha, p, x), baxpy(-alpha, Ap, r), False
        task_its += active
        rr_new = bdot(r, r)
        active = active & mon.active(rr_new.sqrt())
        if k % mon.every == 0 or k == maxiter:
            if bool(broke.any()):
                raise BreakdownError(f"batched cg broke down for task(s) {_tasks(broke)} at iteration {k}: "
                                     "p^T A p = 0 (an indefinite or singular system)")
            if mon.check(k, rr_new.sqrt(), active, force=True):  # every recurrence converged: confirm
                r, true_r = tl.sub(b, matvec(x)), True
                task_its += 1
                rr = bdot(r, r)
                active = mon.active(rr.sqrt())
                done, p = not bool(active.any()), r  # the unconverged restart from their true residual
                continue
        beta = _zero_where(active, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)))
        p, rr = baxpy(beta, p, r), rr_new
    if not true_r:  # out of iterations: report true residuals
        r = tl.sub(b, matvec(x))
        task_its += 1
        rr = bdot(r, r)
        mon.check(k, rr.sqrt(), active, force=True)
    res = rr.sqrt()
    return x, BatchedSolveInfo("cg", task_its, res, res <= mon.threshold)


def _richardson(name: str, neumann: bool):
    """Per-task fixed-point iteration x <- x + (b - A x) (residual: the last change), or the truncated
    Neumann series x = x0 + sum_{i<=K} (I - A)^i r0 (residual: the last term's norm)."""

    def solve(matvec: BatchMatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10, rtol: float = 0.0,
              check_every: Optional[int] = None, divergence_factor: float = 1e6):
        x, r, its = _start(matvec, b, x0)
        if neumann:
            x = tl.axpy(1.0, r, x)  # r is the series' current term
        res = bdot(r, r).sqrt()
        mon = _TaskMonitor(f"batched {name}", b, res, tol, rtol, check_every, divergence_factor)
        active = mon.active(res)
        task_its = torch.full_like(res, its, dtype=torch.long)
        for k in range(maxiter):
            if k % mon.every == 0 and not bool(active.any()):
                break
            if neumann:
                r = tl.sub(r, matvec(r))
            elif k > 0:  # the first residual is b (cold) or was computed by _start (warm)
                r = tl.sub(b, matvec(x))
            x = baxpy(active.to(res.dtype), r, x)
            if neumann or k > 0:
                task_its += active
            res = torch.where(active, bdot(r, r).sqrt(), res)
            active = active & mon.active(res)
            mon.check(k + 1, res, active, force=(k + 1 == maxiter))
        return x, BatchedSolveInfo(name, task_its, res, res <= mon.threshold)

    solve.__name__ = solve.__qualname__ = f"batched_{name}"
    solve.__doc__ = _richardson.__doc__
    return solve


batched_fixed_point = _richardson("fixed_point", neumann=False)
batched_neumann = _richardson("neumann", neumann=True)

BATCHED_SOLVERS: Dict[str, Callable] = {"cg": batched_cg, "fixed_point": batched_fixed_point,
                                        "neumann": batched_neumann}


def _task_count(params: Sequence[Tensor]) -> int:
    """The common leading dimension B of the params (the number of tasks)."""
    sizes = {p.shape[0] if p.dim() > 0 else None for p in params}
    if None in sizes or len(sizes) != 1:
        raise ValueError("batched params need one common leading task dimension; got shapes "
                         f"{[tuple(p.shape) for p in params]}")
    return sizes.pop()


def _per_task_losses(outer_loss, params, hparams, B: int) -> Tensor:
    losses = outer_loss(params, hparams)
    if not isinstance(losses, Tensor) or losses.shape != (B,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"batched outer_loss must return the {B} per-task losses (shape ({B},)), got {got}")
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise NonFiniteError(f"outer_loss is NaN or Inf for task(s) {_tasks(bad)}")
    return losses


def _task_rows(B: int, vs: Sequence[Tensor]) -> List[Tensor]:
    """Cotangents for a batched VJP: entry c of the batch keeps only task c's row of each v."""
    eye = torch.eye(B, dtype=vs[0].dtype, device=vs[0].device)
    return [eye.reshape(B, B, *([1] * (v.dim() - 1))) * v.unsqueeze(0) for v in vs]


def batched_hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], fp_map, outer_loss,
                          solver: str = "cg", K: int = 100, tol: float = 1e-10, rtol: float = 0.0,
                          v0: Optional[Sequence[Tensor]] = None, set_grad: bool = True, per_task: bool = False,
                          check_tasks: bool = True, **solver_options) -> BatchedHypergradResult:
    """Hypergradients of B independent fixed points ``params`` (leading dimension B) in one call.

    grad = sum_b [dE_b/dlambda + (dPhi_b/dlambda)^T v_b],  (I - dPhi_b/dw_b)^T v_b = dE_b/dw_b.

    Args:
        fp_map: batched map; row b of its output may depend only on row b of the params.
        outer_loss: returns the per-task losses, shape [B].
        solver: "cg", "fixed_point" or "neumann" (per-task convergence, see :data:`BATCHED_SOLVERS`).
        K, tol, rtol, v0: as in :func:`hypergrad.hypergradient`, per task.
        per_task: return every hparam's gradient per task, shape [B, *hparam.shape] (row b: task b's
            hypergradient), instead of the sum over tasks (B batched VJPs). ``set_grad`` adds the sum.
        solver_options: ``check_every``, ``divergence_factor``.
    """
    if solver not in BATCHED_SOLVERS:
        raise ValueError(f"unknown batched solver {solver!r}; choose one of {sorted(BATCHED_SOLVERS)}")
    if not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be a non-negative int, got {K!r}")
    params, hparams = tl.check_inputs(params, hparams)
    B = _task_count(params)
    with torch.enable_grad():
        params = tl.detached_leaves(params)
        losses = _per_task_losses(outer_loss, params, hparams, B)
        g_w = tl.grad_or_zeros(losses.sum(), params, retain_graph=True)
        mapped = tl.check_like(fp_map(params, hparams), params, "fp_map(params, hparams)")
        matvec = lambda u: tl.sub(u, tl.grad_or_zeros(mapped, params, grad_outputs=u, retain_graph=True))
        if check_tasks and B > 1:
            _check_separable(mapped, params)
        v, info = BATCHED_SOLVERS[solver](matvec, g_w, v0, maxiter=K, tol=tol, rtol=rtol, **solver_options)
        if per_task:
            grads = _per_task_grads(losses, mapped, hparams, v, B)
        else:
            g_h = tl.grad_or_zeros(losses.sum(), hparams, retain_graph=True)
            grads = tl.axpy(1.0, tl.grad_or_zeros(mapped, hparams, grad_outputs=v, retain_graph=False), g_h)
    grads, v = [g.detach() for g in grads], [t.detach() for t in v]
    tl.assert_finite(grads, "the batched hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, [g.sum(0) for g in grads] if per_task else grads)
    return BatchedHypergradResult(grads, v, info.iterations, info.residual, info.converged, info.solver)


def _check_separable(mapped, params) -> None:
    """One VJP with a cotangent on task 0 only: the other tasks' rows must come back exactly zero, else
    Phi mixes tasks (e.g. a statistic over the task dimension) and the per-task systems are not independent."""
    probe = [torch.zeros_like(p) for p in params]
    for t in probe:
        t[0] = 1.0
    leaked = bdot(*2 * [tl.grad_or_zeros(mapped, params, grad_outputs=probe, retain_graph=True)])[1:]
    leaked = torch.where(torch.isfinite(leaked), leaked, torch.zeros_like(leaked))  # NaN: the solver reports it
    if bool((leaked != 0).any()):
        raise ValueError(f"fp_map mixes tasks: the outputs of task 0 depend on the params of task(s) "
                         f"{_tasks(torch.cat([leaked.new_zeros(1), leaked]) != 0)}; row b of fp_map(params, hparams) "
                         "must depend on row b of the params only (no statistics over the task dimension)")


def _per_task_grads(losses: Tensor, mapped, hparams, v, B: int) -> List[Tensor]:
    """[B, *h.shape] per shared hparam: row b = dE_b/dlambda + (dPhi_b/dlambda)^T v_b (batched VJPs)."""
    eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
    direct = torch.autograd.grad(losses, hparams, grad_outputs=eye, retain_graph=True, allow_unused=True,
                                 is_grads_batched=True)
    indirect = torch.autograd.grad(mapped, hparams, grad_outputs=_task_rows(B, v), allow_unused=True,
                                   is_grads_batched=True)
    out = []
    for d, i, h in zip(direct, indirect, hparams):
        g = sum(t for t in (d, i) if t is not None)
        out.append(torch.zeros(B, *h.shape, dtype=h.dtype, device=h.device) if isinstance(g, int) else g)
    return out
