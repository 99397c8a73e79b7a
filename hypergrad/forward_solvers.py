"""Forward solvers for the fixed point w* = Phi(w*) of a map on lists of tensors (no graph).

Every solver has the signature ``solve(fp, w0, *, maxiter, tol, rtol, ...) -> (w, ForwardInfo)``, ``fp``
mapping a list of tensors to a list of the same shapes. Stopping rule: ||Phi(w) - w|| <= tol, or for every
tensor i ||Phi_i(w) - w_i|| <= rtol max(||w_i||, ||Phi_i(w)||, r S, eps S0), with S the largest tensor's
scale, r = min(1e-3, 100 eps / rtol) (2.2e-4 in float64 at the default rtol: a tensor smaller than r S
converges to rtol r S absolute; pass ``tol`` for an absolute bound on it) and S0 the starting scale (so a
fixed point at 0 is reached, by a residual eps S0 rtol). See ``hypergrad.hypergradients.fixed_point_residuals``. Neither
given: ``rtol = default_rtol(dtype)`` (1e-10 in float64). NaN/Inf raise [`NonFiniteError`][hypergrad.NonFiniteError]; a
residual or an iterate ``divergence_factor`` times its start raises [`DivergenceError`][hypergrad.DivergenceError];
running out of iterations raises [`ConvergenceError`][hypergrad.ConvergenceError] unless ``strict=False`` (then
``converged=False`` and a warning). The returned ``w`` is the iterate whose residual was measured last.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import ConvergenceError, DivergenceError, NonFiniteError
from .hypergradients import fixed_point_residuals
from .linear_solvers import resolve_tolerances

FpMap = Callable[[List[Tensor]], List[Tensor]]


@dataclass
class ForwardInfo:
    """What a forward solve (one of [`FORWARD_SOLVERS`][hypergrad.FORWARD_SOLVERS]) did.

    ``iterations`` (updates of w; Phi is evaluated once more), the final
    ``residual`` ||Phi(w) - w|| and its per-tensor relative form ``residual_rel``, ``converged``, and
    ``residuals``, ||Phi(w) - w|| at every iterate."""
    solver: str
    iterations: int
    residual: float
    converged: bool
    residuals: List[float] = field(default_factory=list)
    residual_rel: float = float("nan")


class _Progress:
    """The shared stopping rule and failure checks of the forward solvers."""

    def __init__(self, name: str, w0: Sequence[Tensor], maxiter, tol, rtol, divergence_factor, strict, beta=1.0):
        self.maxiter = tl.check_count(maxiter, "maxiter")
        self.tol, self.rtol = resolve_tolerances(tol, rtol, w0[0].dtype)
        if not (isinstance(divergence_factor, numbers.Real) and divergence_factor > 1):
            raise ValueError(f"divergence_factor must be a number > 1, got {divergence_factor!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 2:
            raise ValueError(f"beta (the damping of w <- w + beta (Phi(w) - w)) must be a number in (0, 2), got "
                             f"{beta!r}")
        self.name, self.factor, self.strict = name, float(divergence_factor), tl.check_flag(strict, "strict")
        self.hint = "use solver='anderson', or" if name == "fixed_point" else "try"
        self.trace: List[float] = []
        self.rel, self.start = math.inf, None
        # a tensor far smaller than the largest one counts at ratio x its scale: the smallest ratio at which
        # rtol stays above rounding (100 eps of the largest), at most 1e-3
        self.eps = torch.finfo(w0[0].dtype).eps
        self.ratio = min(1e-3, 100 * self.eps / max(self.rtol, 1e-300))

    def done(self, w: Sequence[Tensor], f: Sequence[Tensor]) -> bool:
        """Record the residual of ``w`` (``f`` = Phi(w)); True when it meets the tolerance. Raises on NaN/Inf
        and on divergence of the residual or of the iterates."""
        k = len(self.trace)
        res, rel = fixed_point_residuals(w, f, tl.dots, 0.0 if self.start is None else self.start * self.eps,
                                         self.ratio)
        size = float(tl.norm(w))
        res, self.rel = float(res), float(rel)
        self.trace.append(res)
        if not (math.isfinite(res) and math.isfinite(self.rel) and math.isfinite(size)):
            raise NonFiniteError(f"{self.name}: NaN or Inf in Phi(w) after {k} iterations (check the map and its "
                                 "inputs; a smaller step size if it blows up)")
        if self.start is None:
            self.start = max(size, float(tl.norm(f)))
        # iterates that grew far beyond their start while the residual did not fall: no fixed point to reach
        grew = size > self.factor * max(self.start, torch.finfo(w[0].dtype).tiny) and res > 0.1 * self.trace[0]
        if res > self.factor * max(self.trace[0], torch.finfo(w[0].dtype).tiny) or grew:
            what = f"||w|| = {size:.3e}" if grew else f"||Phi(w) - w|| = {res:.3e}"
            raise DivergenceError(f"{self.name} diverges: {what} after {k} iterations (||Phi(w0) - w0|| = "
                                  f"{self.trace[0]:.3e}, ||w0|| ~ {self.start:.3e}); the map is not a contraction "
                                  f"here, or has no fixed point ({self.hint} a smaller step size or damping beta < 1)")
        return res <= self.tol or self.rel <= self.rtol

    def finish(self, w: List[Tensor], converged: bool) -> Tuple[List[Tensor], ForwardInfo]:
        info = ForwardInfo(self.name, len(self.trace) - 1, self.trace[-1], converged, self.trace, self.rel)
        if not converged:
            msg = (f"{self.name} did not converge in {info.iterations} iterations: ||Phi(w) - w|| = "
                   f"{info.residual:.3e}, {self.rel:.3e} relative (tol={self.tol:g}, rtol={self.rtol:g}); the "
                   f"implicit gradient is exact only at a fixed point: raise maxiter, or {self.hint} damping")
            if self.strict:
                raise ConvergenceError(msg)
            warnings.warn(f"{self.name} did not converge (the result's ForwardInfo has the residuals); the implicit "
                          "gradient is exact only at a fixed point: raise maxiter", stacklevel=4)
        return w, info


def fixed_point_iteration(fp: FpMap, w0: Sequence[Tensor], *, maxiter: int = 1000, tol: Optional[float] = None,
                          rtol: Optional[float] = None, beta: float = 1.0, divergence_factor: float = 1e6,
                          strict: bool = True) -> Tuple[List[Tensor], ForwardInfo]:
    """Damped fixed-point iteration w <- (1 - beta) w + beta Phi(w); converges when Phi contracts.

    Returns ``(w, ForwardInfo)``, ``w`` the iterate whose residual was measured last.

    Args:
        fp: the map Phi: a list of tensors to a list of the same shapes (called without a graph).
        w0: the starting iterate (not modified).
        maxiter: the most updates of w.
        tol: stop when ||Phi(w) - w|| <= tol.
        rtol: or when every tensor i has ||Phi_i(w) - w_i|| <= rtol max(||w_i||, ||Phi_i(w)||) (small tensors
            count at a floor relative to the largest). Neither given: ``rtol = default_rtol(dtype)``.
        beta: the damping, in (0, 2).
        divergence_factor: a residual or an iterate this many times its start raises
            [`DivergenceError`][hypergrad.DivergenceError].
        strict: running out of iterations raises [`ConvergenceError`][hypergrad.ConvergenceError]; False:
            ``converged=False`` and a warning.
    """
    mon = _Progress("fixed_point", w0, maxiter, tol, rtol, divergence_factor, strict, beta)
    w = [t.detach() for t in w0]
    for _ in range(mon.maxiter + 1):
        f = fp(w)
        if mon.done(w, f):
            return mon.finish(w, True)
        if len(mon.trace) > mon.maxiter:
            break
        w = [a + beta * (b - a) for a, b in zip(w, f)]
    return mon.finish(w, False)


def anderson(fp: FpMap, w0: Sequence[Tensor], *, maxiter: int = 1000, tol: Optional[float] = None,
             rtol: Optional[float] = None, memory: int = 5, beta: float = 1.0, regularization: float = 1e-10,
             batched: bool = False, divergence_factor: float = 1e6,
             strict: bool = True) -> Tuple[List[Tensor], ForwardInfo]:
    """Anderson acceleration (type II) of w <- Phi(w), with ``memory`` past residuals g_i = Phi(w_i) - w_i.

    Step: gamma = argmin ||g_k - dG gamma||^2 + reg ||gamma||^2 (dG, dW: differences of the last residuals and
    iterates; reg = ``regularization`` * ||dG^T dG||), then w <- w_k + beta g_k - (dW + beta dG) gamma.
    ``batched``: every tensor has a leading dimension B of independent problems (a minibatch of a deep
    equilibrium model); each row gets its own gamma (the stopping rule stays the whole batch's).
    Safeguards: the history restarts when the small system is singular or not finite, and when a step
    raises the residual tenfold above the best so far (the next step is then a plain damped step).
    Returns ``(w, ForwardInfo)``; ``fp``, ``w0``, ``maxiter``, ``tol``, ``rtol``, ``beta``, ``divergence_factor``
    and ``strict`` are those of [`fixed_point_iteration`][hypergrad.fixed_point_iteration].

    Args:
        memory: the number m of past residuals kept (a positive int).
        regularization: the relative Tikhonov term of the small least-squares problem (>= 0).
        batched: solve B independent problems along the leading dimension of every tensor.
    """
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    if not (isinstance(regularization, numbers.Real) and regularization >= 0):
        raise ValueError(f"regularization must be a number >= 0, got {regularization!r}")
    mon = _Progress("anderson", w0, maxiter, tol, rtol, divergence_factor, strict, beta)
    like = [t.detach() for t in w0]
    rows = _rows(like, tl.check_flag(batched, "batched"))
    x = rows.flatten(like)
    # differences of the last ``memory`` iterates and residuals, one per slot [B, memory, n]; the order of the
    # slots does not matter to the least-squares problem, so each new difference overwrites the oldest
    dW = dG = None
    filled, slot, prev, best = 0, 0, None, math.inf
    for _ in range(mon.maxiter + 1):
        xs = rows.unflatten(x, like)
        fs = fp(xs)
        if mon.done(xs, fs):
            return mon.finish(xs, True)
        g = rows.flatten(fs) - x
        if len(mon.trace) > mon.maxiter:
            break
        if mon.trace[-1] > 10 * best:  # the accelerated step made things worse: forget the history
            filled, prev = 0, None
        best = min(best, mon.trace[-1])
        if prev is not None:
            if dW is None:
                dW, dG = (x.new_zeros(x.shape[0], memory, x.shape[1]) for _ in range(2))
            dW[:, slot], dG[:, slot] = x - prev[0], g - prev[1]
            slot, filled = (slot + 1) % memory, min(filled + 1, memory)
        prev = (x, g)
        x = x + beta * g
        if filled:
            gamma = _regularized_lstsq(dG[:, :filled], g, regularization)
            if gamma is None:  # singular or not finite: a plain step, and a fresh history
                filled, slot = 0, 0
            else:
                x = x - ((dW[:, :filled] + beta * dG[:, :filled]).transpose(1, 2) @ gamma.unsqueeze(-1)).squeeze(-1)
    return mon.finish(rows.unflatten(x, like), False)


class _rows:
    """Tensors as [B, n] rows: B = 1 (one problem) or the leading dimension (``batched``)."""

    def __init__(self, like: Sequence[Tensor], batched: bool):
        if len({t.dtype for t in like}) > 1:
            raise ValueError(f"anderson works on one vector of all params, which need one dtype; got "
                             f"{sorted({str(t.dtype) for t in like})}: cast them, or use solver='fixed_point'")
        if batched and (any(t.dim() == 0 for t in like) or len({t.shape[0] for t in like}) != 1):
            raise ValueError(f"batched=True needs one leading dimension B on every tensor, got shapes "
                             f"{[tuple(t.shape) for t in like]}")
        self.B = like[0].shape[0] if batched else 1

    def flatten(self, xs: Sequence[Tensor]) -> Tensor:
        return torch.cat([x.reshape(self.B, -1) for x in xs], 1)

    def unflatten(self, x: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
        sizes = [t.numel() // self.B for t in like]
        return [c.reshape(t.shape) for c, t in zip(torch.split(x, sizes, 1), like)]


def _regularized_lstsq(D: Tensor, b: Tensor, regularization: float) -> Optional[Tensor]:
    """Per row: argmin ||b - D^T g||^2 + reg ||g||^2 (reg relative to ||D D^T||), D [B, m, n], b [B, n];
    None when a system is singular or not finite."""
    G = D @ D.transpose(1, 2)
    reg = regularization * torch.linalg.matrix_norm(G) + torch.finfo(D.dtype).tiny
    G = G + reg[:, None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    sol, info = torch.linalg.solve_ex(G, (D @ b.unsqueeze(-1)).squeeze(-1))
    if bool((info != 0).any()) or not bool(torch.isfinite(sol).all()):
        return None
    return sol


FORWARD_SOLVERS: Dict[str, Callable] = {
    "fixed_point": fixed_point_iteration,
    "anderson": anderson,
}
"""The forward solvers by name, the choices of the ``solver`` of [`FixedPointLayer`][hypergrad.FixedPointLayer].

"fixed_point" ([`fixed_point_iteration`][hypergrad.fixed_point_iteration]) and "anderson"
([`anderson`][hypergrad.anderson])."""
