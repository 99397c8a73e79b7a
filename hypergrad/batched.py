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

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import NonFiniteError
from .hypergradients import check_fixed_point, check_solver_call, fixed_point_residuals
from .linear_solvers import SOLVERS, SolveInfo, baxpy, bdot  # noqa: F401 (bdot, baxpy: public)
from .linear_solvers import _systems as _tasks

BatchMatVec = Callable[[List[Tensor]], List[Tensor]]

BATCHED_SOLVERS: Dict[str, Callable] = {name: functools.partial(SOLVERS[name], batched=True)
                                        for name in ("cg", "fixed_point", "neumann")}
"""The solvers of [`batched_hypergradient`][hypergrad.batched_hypergradient] by name.

"cg", "fixed_point" and "neumann", each the core's over rows (``batched=True``), with per-task [B]
diagnostics."""
BatchedSolveInfo = SolveInfo
"""The [`SolveInfo`][hypergrad.SolveInfo] of a batched solve (the same class).

``iterations``, ``residual`` and ``converged`` are tensors of shape [B], one entry per task."""


@dataclass
class BatchedHypergradResult:
    """The result of [`batched_hypergradient`][hypergrad.batched_hypergradient].

    ``grads`` (one per hparam; summed over tasks for shared hparams unless ``per_task``), the
    adjoints ``v`` (leading dimension B: pass back as ``v0``), per-task [B] diagnostics of the adjoint
    solve, and per-task inner fixed-point residuals ``fp_residual`` = ||Phi_b(w) - w_b|| (absolute) and
    ``fp_residual_rel`` (per tensor, as [`hypergrad.HypergradResult`][hypergrad.HypergradResult]'s)."""
    grads: List[Tensor]
    v: List[Tensor]
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    solver: str
    fp_residual: Optional[Tensor] = None
    fp_residual_rel: Optional[Tensor] = None


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
                          solver: str = "cg", K: int = 100, tol: Optional[float] = None,
                          rtol: Optional[float] = None, v0: Optional[Sequence[Tensor]] = None,
                          set_grad: bool = True, per_task: bool = False, check_tasks: bool = True,
                          fixed_point_tol: Optional[float] = None, **solver_options) -> BatchedHypergradResult:
    """Hypergradients of B independent fixed points ``params`` (leading dimension B) in one call.

    grad = sum_b [dE_b/dlambda + (dPhi_b/dlambda)^T v_b],  (I - dPhi_b/dw_b)^T v_b = dE_b/dw_b.

    Args:
        params: the B fixed points, every tensor with the leading task dimension B.
        hparams: shared by all tasks (any shape), or per task (leading dimension B).
        fp_map: batched map; row b of its output may depend only on row b of the params.
        outer_loss: returns the per-task losses, shape [B].
        solver: "cg", "fixed_point" or "neumann" (per-task convergence, see
            [`BATCHED_SOLVERS`][hypergrad.BATCHED_SOLVERS]).
        K: the iteration limit, as in [`hypergradient`][hypergrad.hypergradient] (each task stops on its own).
        tol: as in [`hypergradient`][hypergrad.hypergradient], applied per task.
        rtol: as in [`hypergradient`][hypergrad.hypergradient], applied per task.
        v0: warm start for the adjoints (leading dimension B, e.g. ``result.v`` of the previous call).
        set_grad: add the result (the sum over tasks) to ``hparam.grad``.
        fixed_point_tol: as in [`hypergradient`][hypergrad.hypergradient], checked per task.
        per_task: return every hparam's gradient per task, shape ``[B, *hparam.shape]`` (row b: task b's
            hypergradient), instead of the sum over tasks (B batched VJPs). ``set_grad`` adds the sum.
        check_tasks: reject maps that couple tasks (2 ceil(log2 B) probing VJPs, see ``_check_separable``).
        solver_options: ``check_every``, ``divergence_factor``.
    """
    if solver not in BATCHED_SOLVERS:
        raise ValueError(f"unknown batched solver {solver!r}; choose one of {sorted(BATCHED_SOLVERS)}")
    K = check_solver_call(solver, BATCHED_SOLVERS, K, solver_options)
    for name, flag in (("set_grad", set_grad), ("per_task", per_task), ("check_tasks", check_tasks)):
        tl.check_flag(flag, name)
    params, hparams = tl.check_inputs(params, hparams)
    B = _task_count(params)
    with torch.enable_grad():
        params = tl.detached_leaves(params)
        losses = _per_task_losses(outer_loss, params, hparams, B)
        g_w = tl.grad_or_zeros(losses.sum(), params, retain_graph=True)
        mapped = tl.check_like(fp_map(params, hparams), params, "fp_map(params, hparams)")
        matvec = lambda u: tl.sub(u, tl.grad_or_zeros(mapped, params, grad_outputs=u, retain_graph=True))
        if not any(m.requires_grad for m in mapped):
            raise ValueError("fp_map(params, hparams) returned tensors without a graph (detached, .data, or "
                             "computed under torch.no_grad()): build its output from params and hparams")
        fp_abs, fp_rel = _fp_residuals(mapped, params)
        check_fixed_point(fp_abs.tolist(), fp_rel.tolist(), fixed_point_tol, params[0].dtype)
        if check_tasks and B > 1:
            _check_separable(mapped, params)
            if per_task:  # per-task hypergradients also need E_b to depend on task b only (the sum does not)
                _check_separable([losses], params, "outer_loss")
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
    return BatchedHypergradResult(grads, v, info.iterations, info.residual, info.converged, info.solver,
                                  fp_abs, fp_rel)


def _fp_residuals(mapped, params):
    """Per task: ||Phi_b(w) - w_b|| and the per-tensor relative residual (as
    [`HypergradResult`][hypergrad.HypergradResult])."""
    dots = lambda xs, ys: torch.stack([(x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(xs, ys)])
    return fixed_point_residuals([p.detach() for p in params], [m.detach() for m in mapped], dots)


def _check_separable(mapped, params, what: str = "fp_map") -> None:
    """Reject a map that couples any two tasks. For each bit j of the task index, a VJP with random
    cotangents on the tasks whose bit j is 1 must give exactly zero on the rows of the tasks whose bit j is 0,
    and vice versa: any pair of distinct tasks differs in some bit, so 2 ceil(log2 B) VJPs (one batched
    call) see every coupling (statistics over the task dimension, a shared normalization, a mixing matmul)."""
    B = params[0].shape[0]
    bits = max(1, math.ceil(math.log2(B)))
    idx = torch.arange(B, device="cpu")
    groups = torch.stack([((idx >> j) & 1) == side for j in range(bits) for side in (1, 0)])  # [P, B]
    gen = torch.Generator().manual_seed(0)  # the caller's random stream is not touched
    probes = []
    for m in mapped:
        w = torch.rand((groups.shape[0], *m.shape), generator=gen, dtype=torch.float64,
                       device="cpu") + 0.5
        mask = groups.reshape(*groups.shape, *([1] * (m.dim() - 1)))
        probes.append((w * mask).to(dtype=m.dtype, device=m.device))
    outs = [(m, pr) for m, pr in zip(mapped, probes) if m.requires_grad]
    try:
        got = torch.autograd.grad([m for m, _ in outs], params, grad_outputs=[pr for _, pr in outs],
                                  retain_graph=True, allow_unused=True, is_grads_batched=True)
    except RuntimeError:  # a map without vmap rules: one probe at a time
        got = [torch.stack(col) for col in zip(*[tl.grad_or_zeros([m for m, _ in outs], params,
                                                                   grad_outputs=[pr[i] for _, pr in outs])
                                                 for i in range(groups.shape[0])])]
    leaked = torch.zeros(B, dtype=torch.bool, device=params[0].device)
    for g in got:
        if g is None:
            continue
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))  # NaN: the solver reports it
        nonzero = (g != 0).reshape(g.shape[0], B, -1).any(-1)  # [P, B]
        leaked |= (nonzero & ~groups.to(nonzero.device)).any(0)
    if bool(leaked.any()):
        raise ValueError(f"{what} mixes tasks: the params of task(s) {_tasks(leaked)} change the outputs of other "
                         f"tasks; row b of {what}(params, hparams) must depend on row b of the params only (no "
                         "statistics over the task dimension, no mixing across rows); pass check_tasks=False only "
                         "if the coupling is intended and you solve the joint system another way")


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
