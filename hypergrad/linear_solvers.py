"""Linear solvers for A x = b on lists of tensors, A given only through ``matvec``.

Every solver has the signature ``solve(matvec, b, x0=None, *, maxiter, tol, rtol, ...) -> (x, SolveInfo)``.
The hypergradient functions use them with A = I - (dPhi/dw)^T, so one ``matvec`` is one vector-Jacobian
product through the fixed-point map.

One implementation serves one system and a batch of independent systems (``batched=True``: every tensor
has a leading dimension B, row b of ``matvec(u)`` depends only on row b of ``u``): a single system is a
batch of one, with per-system scalars, per-system stopping and per-system safety checks.

Stopping rule (per system): residual <= max(tol, rtol * ||b||). Defaults are relative and scale-invariant:
``rtol = default_rtol(dtype)`` (1e-10 in float64, 100 eps in lower precision), so multiplying b by c
multiplies x by c. An absolute ``tol`` that the zero solution already meets (0 < ||b|| <= tol, cold start)
is never taken as a solve: the system is solved to the default relative tolerance, with a warning.

Safety checks (read on the host every ``check_every`` iterations; every iteration on the CPU):
NaN/Inf, a residual ``divergence_factor`` times its start, CG on a non-symmetric or indefinite operator,
a singular operator, and fixed-point/Neumann iterations that do not contract.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import BreakdownError, DivergenceError, NonFiniteError, SingularSystemError

MatVec = Callable[[List[Tensor]], List[Tensor]]

#: a fixed-point/Neumann residual this many times above its smallest value proves the map does not contract
CONTRACTION_GROWTH = 1e3


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance: 1e-10, or 100 eps where the dtype cannot reach it (float32: 1.2e-5)."""
    return max(1e-10, 100 * torch.finfo(dtype).eps)


def resolve_tolerances(tol: Optional[float], rtol: Optional[float], dtype: torch.dtype) -> Tuple[float, float]:
    """``(tol, rtol)``: neither given -> relative ``(0, default_rtol(dtype))``; one given -> the other is 0."""
    if tol is None and rtol is None:
        return 0.0, default_rtol(dtype)
    out = []
    for name, val in (("tol", tol), ("rtol", rtol)):
        val = 0.0 if val is None else val
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val) or val < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        out.append(float(val))
    return out[0], out[1]


@dataclass
class SolveInfo:
    """What a solve did: ``iterations`` (operator products), final ``residual`` norm, ``converged``.

    For a batch of systems each is a tensor of shape [B], one entry per system."""
    solver: str
    iterations: Union[int, Tensor]
    residual: Union[float, Tensor]
    converged: Union[bool, Tensor]


# ---------------------------------------------------------------- per-system arithmetic (rows of a batch)

def bdot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Per-system inner products <x_b, y_b>, shape [B]."""
    return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(xs, ys))


def _rows(a: Tensor, x: Tensor) -> Tensor:
    return a.reshape(-1, *([1] * (x.dim() - 1)))


def baxpy(a: Tensor, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> List[Tensor]:
    """a_b * x_b + y_b for every system b (``a`` of shape [B])."""
    return [y + _rows(a, x) * x for x, y in zip(xs, ys)]


def _bwhere(mask: Tensor, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> List[Tensor]:
    """Row b of xs where mask_b, else row b of ys."""
    return [torch.where(_rows(mask, x), x, y) for x, y in zip(xs, ys)]


def _safe(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


def _systems(mask: Tensor, show: int = 8) -> str:
    idx = mask.reshape(-1).nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:show])) + (f", ... ({len(idx)} in all)" if len(idx) > show else "")


def _dots(R, vecs: Sequence[Sequence[Tensor]], pairs: Sequence[Tuple[int, int]]):
    """[<vecs[i], vecs[j]> for (i, j) in pairs], per system: on the host path floats, one dot product each
    (reading a CPU scalar costs nothing, and a dot is cheaper than stacking the vectors); for a batch [B]
    tensors from one stack and one batched matrix product per tensor (one kernel, differentiable)."""
    if R.host:
        return [R.dot(vecs[i], vecs[j]) for i, j in pairs]
    G = None
    for k in range(len(vecs[0])):
        W = torch.stack([v[k].reshape(v[k].shape[0], -1) for v in vecs], 1)
        part = W @ W.transpose(1, 2)
        G = part if G is None else G + part
    return [G[:, i, j] for i, j in pairs]


class _TensorRows:
    """Per-system arithmetic on a batch: scalars are [B] tensors, masks [B] bool tensors (no host read)."""
    host = False

    def dot(self, xs, ys):
        return bdot(xs, ys)

    def sqrt(self, a):
        return a.sqrt()

    def detach(self, a):
        return a.detach()

    def detach_all(self, xs):
        return [t.detach() for t in xs]

    def axpy(self, a, xs, ys):
        return baxpy(a, xs, ys)

    def where(self, m, a, b):
        return torch.where(m, a, b)

    def rows_where(self, m, xs, ys):
        return _bwhere(m, xs, ys)

    def maximum(self, a, b):
        return torch.maximum(a, b)

    def minimum(self, a, b):
        return torch.minimum(a, b)

    def clamp_min(self, a, lo: float):
        return torch.clamp(a, min=lo)

    def safe(self, d):
        return _safe(d)

    def not_(self, m):
        return ~m

    def any(self, m) -> bool:
        return bool(m.any())

    def all(self, m) -> bool:
        return bool(m.all())

    def isfinite(self, a):
        return torch.isfinite(a)

    def full(self, like, value):
        return torch.full_like(like, value, dtype=torch.long) if isinstance(value, int) else torch.full_like(like, value)

    def zeros(self, like):
        return torch.zeros_like(like)

    def false(self, like):
        return torch.zeros_like(like, dtype=torch.bool)

    def top(self, a, m) -> float:
        return float(a.detach()[m].max())

    def named(self, m) -> str:
        return f" for task(s) {_systems(m)}" if m.numel() > 1 else ""

    def as_float(self, a):
        return a.to(a.dtype if a.is_floating_point() else torch.get_default_dtype())


class _HostRows:
    """One system on the CPU without a graph: scalars are Python floats, masks Python bools (reading a CPU
    tensor costs nothing, and float arithmetic is ~100x cheaper than 0-d tensor operations)."""
    host = True

    def dot(self, xs, ys):
        return tl.dot(xs, ys).item()

    def sqrt(self, a):
        return math.sqrt(a)

    def detach(self, a):
        return a

    def detach_all(self, xs):
        return xs

    def axpy(self, a, xs, ys):
        return tl.axpy(a, xs, ys)

    def where(self, m, a, b):
        return a if m else b

    def rows_where(self, m, xs, ys):
        return list(xs) if m else list(ys)

    maximum, minimum = staticmethod(max), staticmethod(min)

    def clamp_min(self, a, lo: float):
        return max(a, lo)

    def safe(self, d):
        return d if d != 0 else 1.0

    def not_(self, m):
        return not m

    def any(self, m) -> bool:
        return bool(m)

    all = any

    def isfinite(self, a):
        return math.isfinite(a)

    def full(self, like, value):
        return value

    def zeros(self, like):
        return 0.0

    def false(self, like):
        return False

    def top(self, a, m) -> float:
        return float(a)

    def named(self, m) -> str:
        return ""

    def as_float(self, a):
        return float(a)


def _as_rows(matvec: MatVec, b, x0, batched: bool):
    """(rows arithmetic, matvec, b, x0): a batch as it is; one system on the CPU without a graph on the host
    fast path; any other single system as a batch of one (0-d device scalars would cost a host read each)."""
    b = list(b)
    if x0 is not None:
        x0 = tl.check_like(x0, b, "v0 (warm start)", "the adjoint")
    if batched:
        if any(t.dim() == 0 for t in b) or len({t.shape[0] for t in b}) != 1:
            raise ValueError(f"a batch of systems needs one leading dimension B on every tensor, got shapes "
                             f"{[tuple(t.shape) for t in b]}")
        return _TensorRows(), matvec, b, x0
    if all(t.device.type == "cpu" and not t.requires_grad for t in b):
        return _HostRows(), matvec, b, x0
    up = lambda xs: [t.unsqueeze(0) for t in xs]
    return _TensorRows(), (lambda u: up(matvec([t[0] for t in u]))), up(b), (None if x0 is None else up(x0))


def _finish(R, name: str, x, its, res, conv, batched: bool):
    if batched:
        return x, SolveInfo(name, its, res.detach(), conv)
    if R.host:
        return x, SolveInfo(name, int(its), float(res), bool(conv))
    return [t[0] for t in x], SolveInfo(name, int(its[0]), float(res[0]), bool(conv[0]))


def _start(matvec: MatVec, b: Sequence[Tensor], x0) -> Tuple[List[Tensor], List[Tensor], int]:
    """Initial iterate and residual (one product when a warm start is given)."""
    if x0 is None:
        return tl.zeros_like(b), list(b), 0
    x = [t.detach().clone() if not t.requires_grad else t for t in x0]
    return x, tl.sub(b, matvec(x)), 1


class _Monitor:
    """Per-system stopping rule and the shared safety checks (NaN/Inf, divergence), read on the host only
    on check iterations. Thresholds: max(tol, rtol ||b_b||); a cold start whose nonzero b is already below
    its threshold (the zero solution would be returned) is solved to the default relative tolerance."""

    def __init__(self, name: str, b: Sequence[Tensor], r0, tol, rtol, check_every, divergence_factor,
                 cold: bool, hint: str = "", rows=None):
        R = self.R = rows if rows is not None else _TensorRows()
        tol, rtol = resolve_tolerances(tol, rtol, b[0].dtype)
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if not (isinstance(divergence_factor, numbers.Real) and divergence_factor > 1):
            raise ValueError(f"divergence_factor must be a number > 1, got {divergence_factor!r}")
        self.name, self.hint = name, hint
        self.every = check_every or (1 if b[0].device.type == "cpu" else 10)
        self.eps = torch.finfo(b[0].dtype).eps
        self.bnorm = R.detach(R.sqrt(R.dot(b, b)))
        thr = R.clamp_min(rtol * self.bnorm, tol)
        if cold:
            empty = (self.bnorm > 0) & (self.bnorm <= thr)
            if R.any(empty):  # fixed texts: Python shows each once per call site, not at every outer step
                warnings.warn(f"{name}: an absolute tol at or above ||b|| (the right-hand side dE/dw) lets the zero "
                              "adjoint pass, dropping the implicit term of the hypergradient (hypertorch returns v = 0 "
                              f"there); solving to rtol={default_rtol(b[0].dtype):g} instead. Pass rtol= (relative) "
                              "rather than an absolute tol.", stacklevel=4)
                thr = R.where(empty, default_rtol(b[0].dtype) * self.bnorm, thr)
            elif R.any((thr > 1e-3 * self.bnorm) & (self.bnorm > 0)):  # b = 0: v = 0 is exact, at any tol
                warnings.warn(f"{name}: the tolerance is above 1e-3 ||b|| (b = dE/dw): the adjoint, and the "
                              "hypergradient's implicit term, are accurate only to about tol / ||b|| relative; pass "
                              "rtol= (relative) for a tolerance that follows the scale of the outer loss",
                              stacklevel=4)
        self.threshold = thr
        self.r0 = R.detach(r0)
        self.raise_if_bad(0, self.r0, "the right-hand side or the starting point")
        self.limit = divergence_factor * R.maximum(self.r0, thr)

    def check_now(self, it: int, last: bool) -> bool:
        return last or it % self.every == 0

    def raise_if_bad(self, it: int, res, what: str = "the iterates") -> None:
        """NaN/Inf or a residual ``divergence_factor`` times its start raise (one host read)."""
        R = self.R
        res = R.detach(res)
        if it > 0 and R.all((res <= self.limit) & R.isfinite(res)):  # the common case
            return
        bad = R.not_(R.isfinite(res))
        if R.any(bad):
            raise NonFiniteError(f"{self.name}: NaN or Inf in {what}{self._of(bad)} after {it} iterations{self.hint}")
        if it > 0:
            grew = res > self.limit
            if R.any(grew):
                raise DivergenceError(f"{self.name} diverges{self._of(grew)}: residual {R.top(res, grew):.3e} "
                                      f"after {it} iterations, started at {R.top(self.r0, grew):.3e}{self.hint}")

    def _of(self, mask) -> str:
        return self.R.named(mask)


class _Scalars:
    """Scalar arithmetic of the Krylov recurrences: Python floats on the CPU without a graph (reading
    a CPU tensor costs nothing and float arithmetic is ~100x cheaper than 0-d tensor ops), 0-d device
    tensors otherwise (no host synchronisation; differentiable under create_graph)."""

    def __init__(self, b: Sequence[Tensor]):
        self.host = all(t.device.type == "cpu" and not t.requires_grad for t in b)

    def dot(self, xs, ys):
        d = tl.dot(xs, ys)
        return d.item() if self.host else d

    def sqrt(self, a):
        return math.sqrt(a) if self.host else torch.sqrt(a)

    def div(self, a, b):
        """a / b, with 0 where b == 0 (an exactly converged Krylov method divides 0 by 0)."""
        if self.host:
            return a / b if b != 0 else 0.0
        return a / torch.where(b == 0, torch.ones_like(b), b)

    def at_least(self, a, floor: float):
        return max(a, floor) if self.host else torch.clamp(a, min=floor)

    def select(self, cond, a, b):
        return (a if cond else b) if self.host else torch.where(cond, a, b)

    def abs_max(self, a, b):
        return max(abs(a), b) if self.host else torch.maximum(a.abs(), b)


def _read(x) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)




class _ScalarMonitor:
    """``_Monitor`` for the single-system solvers (MINRES, GMRES) with host-float residuals."""

    def __init__(self, name: str, b, r0, tol, rtol, check_every, divergence_factor, cold: bool):
        rows = [t.detach().reshape(1, -1) for t in b]
        r0 = torch.full((1,), _read(r0), dtype=b[0].dtype, device=b[0].device)
        self._mon = _Monitor(name, rows, r0, tol, rtol, check_every, divergence_factor, cold)
        self.every, self.threshold = self._mon.every, float(self._mon.threshold[0])
        self.r0 = self.residual = float(r0[0])
        self.limit = float(self._mon.limit[0])

    def check(self, it: int, res, force: bool = False, hint: str = "") -> bool:
        """True when converged. Raises on NaN/Inf or divergence. Reads ``res`` only on check iterations."""
        if not force and it % self.every != 0:
            return False
        self.residual = r = _read(res)
        if not math.isfinite(r) or r > self.limit:
            self._mon.hint = hint
            self._mon.raise_if_bad(it, torch.full((1,), r, dtype=torch.float64, device="cpu"))
        return r <= self.threshold


def _sym_tol(b: Sequence[Tensor], R) -> float:
    """Largest relative gap |<u, A v> - <A u, v>| / scale that rounding explains (scale: see solve_cg)."""
    n = sum((t.numel() if R.host else t[0].numel()) for t in b)
    return max(1e4, 10 * math.sqrt(n)) * torch.finfo(b[0].dtype).eps


def solve_fixed_point(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
                      rtol: Optional[float] = None, check_every: Optional[int] = None,
                      divergence_factor: float = 1e6, batched: bool = False):
    """Richardson iteration x <- x + (b - A x), i.e. v <- J^T v + b for A = I - J^T.

    ``residual`` is the last change ||x_{k+1} - x_k|| = ||b - A x_k|| (hypertorch's stopping rule).
    It converges iff the spectral radius of J is < 1; a residual that grows ``CONTRACTION_GROWTH``
    times above its smallest value, or ends above its start, raises [`DivergenceError`][hypergrad.DivergenceError].
    """
    return _richardson("fixed_point", False, matvec, b, x0, maxiter, tol, rtol, check_every, divergence_factor,
                       batched)


def solve_neumann(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
                  rtol: Optional[float] = None, check_every: Optional[int] = None,
                  divergence_factor: float = 1e6, batched: bool = False):
    """Truncated Neumann series x = x0 + sum_{i<=K} (I - A)^i r0; equals ``fixed_point`` with K+1 steps.

    ``residual`` is the norm of the last term added; the same contraction checks as ``fixed_point``.
    """
    return _richardson("neumann", True, matvec, b, x0, maxiter, tol, rtol, check_every, divergence_factor,
                       batched)


class _Contraction:
    """The non-contraction rules of a residual sequence ||(J^T)^k r0|| (fixed point, Neumann, stoch_AID), per
    system, read on check iterations. During the run: a residual that grew at 10 checks in a row to
    CONTRACTION_GROWTH times its smallest value (a non-normal contraction's transient growth is brief). Out of
    iterations and not converged: a residual above its start, or grown at the last ``run`` checks in a row
    above 10 ``floor`` (rounding noise does not grow that long). Both raise
    [`DivergenceError`][hypergrad.DivergenceError]."""

    def __init__(self, mon: _Monitor, name: str, hint: str, maxiter: int, every: int):
        self.mon, self.R, self.name, self.hint = mon, mon.R, name, hint
        self.best, self.last, self.up, self.floor = mon.r0 * 1.0, mon.r0 * 1.0, mon.R.zeros(mon.r0), None
        self.run = max(5, min(50, (maxiter // every) // 4))

    def check(self, it: int, res, floor, active) -> None:
        R, self.floor = self.R, floor
        self.up, self.last = R.where(res > self.last, self.up + 1, R.zeros(res)), res
        grew = active & (self.up >= 10) & (res > CONTRACTION_GROWTH * R.maximum(self.best, floor))
        if R.any(grew):
            raise DivergenceError(f"{self.name} diverges{self.mon._of(grew)}: residual {R.top(res, grew):.3e} after "
                                  f"{it} iterations, {CONTRACTION_GROWTH:g}x its smallest value "
                                  f"{R.top(self.best, grew):.3e}{self.hint}")
        self.best = R.minimum(self.best, res)

    def check_end(self, it: int, res, converged) -> None:
        if self.floor is None:  # no check iteration ran
            return
        R = self.R
        rising = (self.up >= self.run) & (res > 10 * self.floor)
        worse = R.not_(converged) & ((res > R.maximum(self.mon.r0, self.floor)) | rising)
        if R.any(worse):
            raise DivergenceError(f"{self.name} did not contract{self.mon._of(worse)}: after {it} iterations the "
                                  f"residual {R.top(res, worse):.3e} (start {R.top(self.mon.r0, worse):.3e}, smallest "
                                  f"{R.top(self.best, worse):.3e}) is above its start or growing steadily, so the "
                                  f"result is no approximation of the solution{self.hint} (or, for a non-normal "
                                  "contraction still in its transient growth, a larger K)")


def _richardson(name, neumann, matvec, b, x0, maxiter, tol, rtol, check_every, divergence_factor, batched):
    """Fixed-point iteration or Neumann series on rows (per-system stopping: a converged row stops moving).
    Both residuals are ||(J^T)^k r0||, so their growth measures the contraction of J directly."""
    R, matvec, b, x0 = _as_rows(matvec, b, x0, batched)
    x, r, its = _start(matvec, b, x0)
    if neumann:
        x = tl.axpy(1.0, r, x)  # r is the series' current term
    res = R.sqrt(R.dot(r, r))
    hint = ("; the map is not a contraction here (spectral radius of dPhi/dw >= 1): use solver='cg' (gradient-"
            "descent maps) or 'gmres' (any map), or a smaller inner step size")
    mon = _Monitor(name, b, res, tol, rtol, check_every, divergence_factor, cold=x0 is None, rows=R)
    active = res > mon.threshold
    task_its, one, zero = R.full(res, its), R.full(res, 1.0), R.zeros(res)
    contraction, k = _Contraction(mon, name, hint, maxiter, mon.every), 0
    for k in range(maxiter):
        if k % mon.every == 0 and not R.any(active):
            break
        if neumann:
            r = tl.sub(r, matvec(r))
        elif k > 0:  # the first residual is b (cold) or was computed by _start (warm)
            r = tl.sub(b, matvec(x))
        x = R.axpy(R.where(active, one, zero), r, x)
        if neumann or k > 0:
            task_its += active
        res = R.where(active, R.sqrt(R.dot(r, r)), res)
        active = active & (res > mon.threshold)
        if mon.check_now(k + 1, k + 1 == maxiter):
            mon.raise_if_bad(k + 1, res)
            floor = 100 * mon.eps * (mon.bnorm + R.detach(R.sqrt(R.dot(x, x))))
            contraction.check(k + 1, R.detach(res), floor, active)
    converged = res <= mon.threshold
    contraction.check_end(k + 1, R.detach(res), converged)
    return _finish(R, name, x, task_its, res, converged, batched)


def solve_cg(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
             rtol: Optional[float] = None, check_every: Optional[int] = None, divergence_factor: float = 1e6,
             check_symmetry: bool = True, batched: bool = False):
    """Conjugate gradient for symmetric positive definite A (per system). Returns the *latest* iterate.

    The recurrence r_{k+1} = r_k - alpha A p_k is the true residual b - A x_k up to rounding, which drifts
    by at most ~ k eps (||A|| ||x|| + ||b||) (Greenbaum). When every recurrence says converged and that
    bound is not far below the tolerance, the true residuals are computed (one product) and the systems
    above their tolerance restart from them: a ``converged`` system has a true residual below tolerance.

    Checks (each raises instead of returning a wrong number): symmetry, from the recurrence's own vectors,
    |<p_{k-1}, A p_k> - <A p_{k-1}, p_k>| <= ~1e4 eps (||p_{k-1}|| (||p_k|| + ||A p_k||) + ...) else
    [`BreakdownError`][hypergrad.BreakdownError] naming gmres; ||A p|| / ||p|| at the rounding level of ||A|| while the
    residual is large: [`SingularSystemError`][hypergrad.SingularSystemError]; p^T A p = 0 (breakdown):
    [`BreakdownError`][hypergrad.BreakdownError] naming minres; p^T A p < 0 (indefinite A) without convergence: a
    warning (the result is a truncated approximation). ``check_symmetry=False`` for operators that change between
    products (stochastic maps).
    """
    R, matvec, b, x0 = _as_rows(matvec, b, x0, batched)
    x, r, its = _start(matvec, b, x0)
    rr = R.dot(r, r)
    mon = _Monitor("cg", b, R.sqrt(rr), tol, rtol, check_every, divergence_factor, cold=x0 is None, rows=R)
    thr, eps = mon.threshold, mon.eps
    active = R.sqrt(rr) > thr
    task_its = R.full(rr, its)
    zero = R.zeros(R.detach(rr))
    asym, a_scale, a_norm, last_checked = zero * 1, zero * 1, zero * 1, mon.r0 * 1
    no = R.false(active)
    singular, broke, indefinite, pending, confirmed = no, no, no, no, R.not_(active)
    sym_tol, sing_res = _sym_tol(b, R), math.sqrt(eps) * mon.r0
    res, p, prev, k = R.sqrt(rr), r, None, 0
    done = not R.any(active)
    while not done and k < maxiter:
        Ap = matvec(p)
        k += 1
        sym = check_symmetry and prev is not None
        G = _dots(R, [p, Ap] + (list(prev[:2]) if sym else []), _CG_PAIRS[:5 if sym else 3])
        pAp, pp, ApAp = G[0], R.detach(G[1]), R.detach(G[2])
        pAp_d = R.detach(pAp)
        if sym:
            pp0, ApAp0 = prev[2], prev[3]
            scale = R.sqrt(pp0) * (R.sqrt(pp) + R.sqrt(ApAp)) + R.sqrt(pp) * (R.sqrt(pp0) + R.sqrt(ApAp0))
            gap = abs(R.detach(G[3] - G[4])) / R.safe(scale)  # <p0, A p> - <A p0, p>
            asym = R.maximum(asym, R.where(active, gap, zero))
        prev = (R.detach_all(p), R.detach_all(Ap), pp, ApAp) if check_symmetry else None
        a_scale = R.maximum(a_scale, R.where(active, abs(pAp_d) / R.safe(R.detach(rr)), zero))
        gain = R.sqrt(ApAp / R.safe(pp))  # ||A p|| / ||p||; its running maximum estimates ||A||
        a_norm = R.maximum(a_norm, R.where(active, gain, zero))
        flat = gain <= 100 * eps * a_norm  # A p ~ 0: p is (numerically) a null direction of A
        singular = singular | (active & flat & ((ApAp == 0) | (R.sqrt(R.detach(rr)) > sing_res)))
        broke = broke | (active & (pAp_d == 0) & R.not_(singular))
        indefinite = indefinite | (active & (pAp_d < -100 * eps * a_norm * pp))  # beyond rounding
        alpha = R.where(active & (pAp != 0), rr / R.safe(pAp), R.zeros(pAp))
        x, r = R.axpy(alpha, p, x), R.axpy(-alpha, Ap, r)
        task_its += active
        rr_new = R.dot(r, r)
        res = R.where(active, R.sqrt(rr_new), res)
        met = active & (res <= thr)
        pending, active = pending | met, active & R.not_(met)
        if mon.check_now(k, k == maxiter):
            if _cg_raise(R, k, asym, sym_tol, singular, broke, lambda: _probe_symmetric(R, matvec, b, sym_tol)):
                check_symmetry, asym, prev = False, zero, None  # symmetric after all: the gap was rounding
            mon.raise_if_bad(k, R.where(confirmed, zero, res), "the iterates")
            res_d = R.detach(res)
            low = active & (res_d < 1e-3 * mon.r0)  # only there can a recurrence be at its rounding level
            if not R.host or R.any(low) or not R.any(active):  # (batches: no extra host read)
                floor = _rounding_floor(task_its, a_scale, R.sqrt(R.detach(R.dot(x, x))), mon.bnorm, eps)
                stalled = low & (res_d > 0.5 * last_checked) & (res_d <= floor / 100)
                active = active & R.not_(stalled)  # at the rounding level: more steps only amplify rounding noise
            last_checked = R.where(active, res_d, last_checked)
            if not R.any(active):  # every recurrence converged or stalled: confirm with true residuals
                need = pending & (floor > 0.1 * thr)  # the others' recurrence cannot have drifted
                confirmed = confirmed | (pending & R.not_(need))
                if not R.any(need):
                    break
                r_true = tl.sub(b, matvec(x))
                task_its += need
                rt = R.dot(r_true, r_true)
                ok = R.sqrt(rt) <= thr
                res = R.where(need, R.sqrt(rt), res)
                confirmed, active = confirmed | (need & ok), need & R.not_(ok)  # the others restart
                r, rr_new, pending = R.rows_where(active, r_true, r), R.where(active, rt, rr_new), no
                done = not R.any(active)
                p, rr = r, rr_new
                continue
        beta = R.where(active, rr_new / R.safe(rr), R.zeros(rr))
        p, rr = R.axpy(beta, p, r), R.where(active, rr_new, rr)
    _cg_raise(R, k, asym, sym_tol, singular, broke, lambda: _probe_symmetric(R, matvec, b, sym_tol))
    bad = indefinite & R.not_(confirmed)
    if R.any(bad):  # a truncated Krylov approximation (as truncated Newton-CG), not garbage: say so
        warnings.warn(f"cg met negative curvature p^T A p < 0{mon._of(bad)} and did not converge: I - dPhi/dw is "
                      "not positive definite here (a non-convex inner problem, or a KKT map), so the result is a "
                      "truncated approximation (converged=False); solver='minres' solves symmetric indefinite systems",
                      stacklevel=4)
    return _finish(R, "cg", x, task_its, res, confirmed, batched)


#: the inner products of a CG step among (p, A p, p_prev, A p_prev): p^T A p, |p|^2, |A p|^2, then the two
#: cross products whose difference tests symmetry
_CG_PAIRS = ((0, 1), (0, 0), (1, 1), (2, 1), (3, 0))


def _probe_symmetric(R, matvec: MatVec, b, sym_tol: float):
    """Per system: is <u, A v> = <A u, v> for two fixed random u, v (two products)? Confirms a gap seen in
    a Krylov recurrence, whose vectors lose their meaning on singular or exhausted systems."""
    gen = torch.Generator().manual_seed(0)
    u, v = ([torch.randn(t.shape, generator=gen, dtype=t.dtype, device="cpu").to(t.device) for t in b]
            for _ in range(2))
    Au, Av = matvec(u), matvec(v)
    n = lambda xs: R.sqrt(R.detach(R.dot(xs, xs)))
    gap = abs(R.detach(R.dot(u, Av) - R.dot(Au, v))) / R.safe(n(u) * n(Av) + n(Au) * n(v))
    return gap <= sym_tol


def _cg_raise(R, k: int, asym, sym_tol: float, singular, broke, probe=None) -> bool:
    """Raise on CG's flags (one host read); an asymmetry is confirmed by ``probe()`` first. True when the
    probe found the operator symmetric (the recurrence's gap was rounding: stop checking it)."""
    if R.host:
        flags = [asym > sym_tol, singular, broke]
    else:
        flags = torch.stack([(asym > sym_tol).any(), singular.any(), broke.any()]).tolist()
    if flags[0] and probe is not None and R.all(probe()):
        return True
    if flags[0]:
        raise BreakdownError(f"cg needs a symmetric operator, but <u, A v> != <A u, v> (relative gap "
                             f"{float(R.top(asym, asym > sym_tol)):.1e} at iteration {k}, rounding explains "
                             f"{sym_tol:.1e}): I - dPhi/dw is not symmetric (momentum maps, non-normal maps); use "
                             "solver='gmres'")
    if flags[1]:
        raise SingularSystemError(f"cg: I - dPhi/dw is singular, or numerically singular in this dtype (||A p|| / ||p|| "
                                  f"at the rounding level of ||A|| at iteration {k}, condition number >~ 1/(100 eps), "
                                  "while the residual is large): the hypergradient is not defined unless dE/dw is in the "
                                  "range of the operator (solver='minres' then returns the least-squares adjoint); if the "
                                  "system is only ill-conditioned, use float64")
    if flags[2]:
        raise BreakdownError(f"cg broke down at iteration {k}: p^T A p = 0 with a nonzero residual (an indefinite "
                             "system); use solver='minres' (symmetric) or 'gmres'")
    return False


def _rounding_floor(its, a_scale, x_norm, b_norm, eps: float):
    """Greenbaum's bound on the gap between CG's recurrence and true residuals, 10 k eps (||A|| ||x|| +
    ||b||), with ||A|| estimated by 10 max_k 1/|alpha_k| (a Rayleigh-quotient scale: safety factor)."""
    return 10 * its * eps * (10 * a_scale * x_norm + b_norm)


def solve_minres(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
                 rtol: Optional[float] = None, check_every: Optional[int] = None, divergence_factor: float = 1e6):
    """MINRES (Paige & Saunders) for symmetric, possibly indefinite or singular A.

    One product per iteration; minimizes ||b - A x|| over the Krylov space. Symmetry is checked on the
    way (the Lanczos relation <v_{k-1}, A v_k> = beta_k) and the result is confirmed by one true
    residual; a non-symmetric operator raises [`BreakdownError`][hypergrad.BreakdownError]. On a singular A the Lanczos
    process ends (beta ~ 0) on an invariant subspace: x is then the least-squares solution, returned when the
    system is consistent (residual below tolerance) and [`SingularSystemError`][hypergrad.SingularSystemError]
    otherwise.
    """
    S = _Scalars(b)
    x0 = None if x0 is None else tl.check_like(x0, b, "v0 (warm start)", "the adjoint")
    x, r1, its = _start(matvec, b, x0)
    beta = S.sqrt(S.dot(r1, r1))
    mon = _ScalarMonitor("minres", b, beta, tol, rtol, check_every, divergence_factor, x0 is None)
    if mon.residual <= mon.threshold:
        return x, SolveInfo("minres", its, mon.residual, True)
    zero = 0.0 if S.host else torch.zeros_like(beta)
    eps = torch.finfo(b[0].dtype).eps
    noise, sym_tol = eps ** 0.5, 1e-6 * (eps / 2.2e-16) ** 0.5  # 1.5e-8 and 1e-6 in float64
    y, r2 = r1, r1
    oldb, dbar, epsln, phibar, cs, sn = zero, zero, zero, beta, zero - 1.0, zero
    w, w2 = tl.zeros_like(b), tl.zeros_like(b)
    v, asym, converged, anorm, exhausted = None, zero, False, zero, False
    frozen = False if S.host else torch.zeros((), dtype=torch.bool, device=b[0].device)  # ended: x stays
    for k in range(maxiter):
        v_prev, v = v, tl.scale(S.div(1.0, beta), y)
        y = matvec(v)
        its += 1
        if k > 0:
            gap = (S.dot(v_prev, y) - beta) / (S.sqrt(S.dot(y, y)) + beta)
            # past convergence the Lanczos vectors are rounding noise: stop checking there
            asym = S.abs_max(S.select((phibar > noise * mon.r0) & ~frozen if not S.host else
                                      (phibar > noise * mon.r0 and not frozen), gap, zero), asym)
            y = tl.axpy(-S.div(beta, oldb), r1, y)
        alfa = S.dot(v, y)
        y = tl.axpy(-S.div(alfa, beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, S.sqrt(S.dot(y, y))
        anorm = S.abs_max(alfa * alfa + beta * beta + (oldb * oldb if k > 0 else zero), anorm)  # k = 0: oldb = ||b||
        ended = beta <= 100 * eps * S.sqrt(anorm)  # an invariant subspace: solved, or A singular
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = S.at_least(S.sqrt(gbar * gbar + beta * beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = tl.scale(1.0 / gamma, [vi - oldeps * a - delta * c for vi, a, c in zip(v, w1, w2)])
        if S.host:
            x, exhausted = tl.axpy(phi, w, x), ended
        else:  # no host read: past the end of the Lanczos process the iterate stays where it was
            x = [torch.where(frozen, a, c) for a, c in zip(x, tl.axpy(phi, w, x))]
            frozen = frozen | ended
            if (k + 1) % mon.every == 0:
                exhausted = bool(frozen)
        converged = mon.check(k + 1, phibar, force=(k + 1 == maxiter or exhausted))
        if (k + 1) % mon.every == 0 or converged or k + 1 == maxiter or exhausted:
            if _read(asym) > sym_tol and _read(_probe_symmetric(_HostRows(), matvec, b, _sym_tol(b, _HostRows()))):
                exhausted = True  # symmetric: the Lanczos vectors lost their meaning (a singular A)
            elif _read(asym) > sym_tol:
                raise BreakdownError(f"minres needs a symmetric operator, but <u, A v> != <A u, v> (relative "
                                     f"gap {_read(asym):.1e} at iteration {k + 1}); use solver='gmres'")
        if converged or exhausted:
            break
    r = tl.sub(b, matvec(x))
    true_res = _read(S.sqrt(S.dot(r, r)))
    if not math.isfinite(true_res):
        raise NonFiniteError("minres: NaN or Inf in the final iterate")
    if exhausted and not converged and true_res > max(mon.threshold, math.sqrt(eps) * mon.r0):
        raise SingularSystemError(
            f"minres: I - dPhi/dw is singular (or numerically singular in this dtype: then use float64) and dE/dw is "
            f"not in its range (the least-squares residual "
            f"{true_res:.3e} stays above the tolerance {mon.threshold:.3e}): the hypergradient is not defined at "
            "this point (check that params are at a fixed point and that the inner problem has a unique solution)")
    return x, SolveInfo("minres", its + 1, true_res, converged and true_res <= max(mon.threshold, 10 * mon.residual))


def solve_gmres(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
                rtol: Optional[float] = None, check_every: Optional[int] = None, divergence_factor: float = 1e6,
                restart: int = 50):
    """Restarted GMRES(restart) for general (non-symmetric) A, with modified Gram-Schmidt Arnoldi.

    The small least-squares problem is solved on the host only on check iterations.
    """
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"restart must be a positive int, got {restart!r}")
    S = _Scalars(b)
    x0 = None if x0 is None else tl.check_like(x0, b, "v0 (warm start)", "the adjoint")
    x, r, its = _start(matvec, b, x0)
    beta = tl.norm(r)
    mon = _ScalarMonitor("gmres", b, beta, tol, rtol, check_every, divergence_factor, x0 is None)
    converged = mon.residual <= mon.threshold
    n = sum(t.numel() for t in b)
    m = max(1, min(restart, n, maxiter))
    done = 0
    while not converged and done < maxiter:
        if done > 0:  # restart: fresh residual
            r = tl.sub(b, matvec(x))
            its += 1
            beta = tl.norm(r)
        V = [tl.scale(S.div(1.0, beta), r)]
        H = torch.zeros(m + 1, m, dtype=beta.dtype, device=beta.device)
        y = None
        for j in range(min(m, maxiter - done)):
            wv = matvec(V[j])
            its += 1
            done += 1
            for i in range(j + 1):
                h = tl.dot(V[i], wv)
                H[i, j] = h
                wv = tl.axpy(-h, V[i], wv)
            hn = tl.norm(wv)
            H[j + 1, j] = hn
            V.append(tl.scale(S.div(1.0, hn), wv))
            last = j + 1 == m or done == maxiter
            if last or (j + 1) % mon.every == 0:
                y, res = _hessenberg_lstsq(H[: j + 2, : j + 1], beta)
                converged = mon.check(done, res, force=True)
                if converged or float(hn.detach()) == 0.0:
                    break
        if y is not None:
            x = [xi + sum(y[i] * V[i][t] for i in range(y.numel())) for t, xi in enumerate(x)]
    return x, SolveInfo("gmres", its, mon.residual, converged)


def _hessenberg_lstsq(H: Tensor, beta: Tensor) -> Tuple[Tensor, Tensor]:
    """argmin_y ||beta e1 - H y|| (host-side, rank-revealing) and its residual norm."""
    if not bool(torch.isfinite(H).all()):
        raise NonFiniteError("gmres: NaN or Inf in the Arnoldi basis (the operator produced NaN/Inf)")
    Hc = H.detach().cpu() if not H.requires_grad else H
    rhs = torch.zeros(H.shape[0], 1, dtype=H.dtype, device=Hc.device)
    rhs[0, 0] = 1.0
    rhs = rhs * (beta.cpu() if not H.requires_grad else beta)
    if Hc.device.type == "cpu" and not H.requires_grad:
        y = torch.linalg.lstsq(Hc, rhs, driver="gelsd").solution
    else:
        y = torch.linalg.pinv(Hc) @ rhs
    res = torch.linalg.norm(rhs - Hc @ y)
    return y[:, 0].to(H.device), res


def solve_dense(matvec: MatVec, b, x0=None, *, maxiter: Optional[int] = None, tol: Optional[float] = None,
                rtol: Optional[float] = None, matmat: Optional[Callable[[], Optional[Tensor]]] = None):
    """Materialize A (``matmat()``, e.g. one batched product; else n products) and solve it by
    ``solve_matrix``. For small systems only (n up to a few thousand)."""
    if x0 is not None:  # a direct solve needs no start, but a bad one is still the caller's error
        tl.check_finite(tl.check_like(x0, b, "v0 (warm start)", "the adjoint"), ["v0 (warm start)"] * len(b))
    flat_b = tl.flatten(b)
    n = flat_b.numel()
    A = matmat() if matmat is not None else None
    if A is None:
        cols = []
        for i in range(n):
            e = torch.zeros(n, dtype=flat_b.dtype, device=flat_b.device)
            e[i] = 1.0
            cols.append(tl.flatten(matvec(tl.unflatten(e, b))))
        A = torch.stack(cols, dim=1)
    return solve_matrix(A, b, tol=tol, rtol=rtol)


def solve_matrix(A: Tensor, b, *, tol: Optional[float] = None, rtol: Optional[float] = None):
    """x = A^-1 b by LU, for an explicit n x n matrix A and b a list of tensors (n entries in all).

    Raises [`SingularSystemError`][hypergrad.SingularSystemError] when the 1-norm condition number (Hager's estimate
    from the LU factors, O(n^2)) is >= 1 / (n eps). Differentiable when A or b carry a graph (second order).
    """
    flat_b = tl.flatten(b)
    n = flat_b.numel()
    if A.shape != (n, n):
        raise ValueError(f"dense: the operator has shape {tuple(A.shape)}, the right-hand side {n} entries")
    LU, pivots, info = torch.linalg.lu_factor_ex(A)
    if not bool(torch.isfinite(LU.diagonal()).all()):  # NaN/Inf anywhere in A reaches U's diagonal
        raise NonFiniteError("dense: the operator I - dPhi/dw^T contains NaN or Inf")
    a_norm = float(torch.linalg.matrix_norm(A.detach(), 1))
    cond = math.inf if int(info) != 0 else a_norm * _inverse_norm1_estimate(LU.detach(), pivots)
    if not cond < 1.0 / (n * torch.finfo(A.dtype).eps):
        raise SingularSystemError(f"dense: I - dPhi/dw is singular (condition number estimate {cond:.3e}) and "
                                  f"{_consistency(A, flat_b)}")
    x = torch.linalg.lu_solve(LU, pivots, flat_b[:, None])[:, 0]
    xd, bd = x.detach(), flat_b.detach()
    res = float(torch.linalg.norm(A.detach() @ xd - bd))
    tol, rtol = resolve_tolerances(tol, rtol, A.dtype)
    thresh = max(tol, rtol * float(torch.linalg.norm(bd)))
    eps = torch.finfo(A.dtype).eps  # LU is backward stable: residual ~ n eps ||A|| ||x||
    floor = 10 * n * eps * (a_norm * float(xd.abs().sum()) + float(bd.abs().sum()))
    return tl.unflatten(x, b), SolveInfo("dense", n, res, res <= max(thresh, floor))


def _consistency(A: Tensor, b: Tensor) -> str:
    """Whether b lies in the range of a singular A (least-squares residual at rounding level), in words."""
    Ad, bd = A.detach(), b.detach()
    x = torch.linalg.pinv(Ad) @ bd
    res, scale = float(torch.linalg.norm(Ad @ x - bd)), float(torch.linalg.norm(bd))
    if res <= 1e3 * A.shape[0] * torch.finfo(A.dtype).eps * max(scale, 1e-300):
        return ("dE/dw is in its range (a consistent system): the adjoint is not unique; solver='minres' returns "
                "the least-squares adjoint, a valid hypergradient when the inner solution set is flat along the null space")
    return (f"dE/dw is not in its range (least-squares residual {res:.3e} of ||dE/dw|| = {scale:.3e}): the "
            "hypergradient is not defined at this point")


def _inverse_norm1_estimate(LU: Tensor, pivots: Tensor, iters: int = 5) -> float:
    """Hager's estimate of ||A^-1||_1 from an LU factorization (a few O(n^2) solves; a lower bound)."""
    n = LU.shape[0]
    x = torch.full((n, 1), 1.0 / n, dtype=LU.dtype, device=LU.device)
    est = 0.0
    for _ in range(iters):
        y = torch.linalg.lu_solve(LU, pivots, x)
        est = float(y.abs().sum())
        z = torch.linalg.lu_solve(LU, pivots, torch.sign(y) + (y == 0), adjoint=True)
        j = int(z.abs().argmax())
        if float(z.abs()[j]) <= float((z * x).sum()):
            break
        x = torch.zeros_like(x)
        x[j] = 1.0
    return est


def normal_equations(matvec: MatVec, rmatvec: MatVec, b) -> Tuple[MatVec, List[Tensor]]:
    """(A^T A, A^T b): an SPD system with the solution of A x = b (condition number squared)."""
    return (lambda u: rmatvec(matvec(u))), rmatvec(b)


def solve_cg_normaleq(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: Optional[float] = None,
                      rtol: Optional[float] = None, check_every: Optional[int] = None,
                      divergence_factor: float = 1e6, rmatvec: Optional[MatVec] = None):
    """CG on the normal equations A^T A x = A^T b (any nonsingular A). ``residual`` is ||A^T(b - A x)||;
    ``converged`` also needs the true residual ||b - A x|| within the tolerance (one product more): on an
    ill-conditioned A a small ||A^T r|| can hide a large r."""
    if rmatvec is None:
        raise ValueError("cg_normaleq needs rmatvec (products with A^T)")
    nmv, nb = normal_equations(matvec, rmatvec, b)
    x, info = solve_cg(nmv, nb, x0, maxiter=maxiter, tol=tol, rtol=rtol, check_every=check_every,
                       divergence_factor=divergence_factor)
    t, rt = resolve_tolerances(tol, rtol, b[0].dtype)
    true = float(tl.norm(tl.sub(b, matvec(x))))
    converged = bool(info.converged) and true <= max(t, rt * float(tl.norm(b)))
    return x, SolveInfo("cg_normaleq", 2 * info.iterations + 1, info.residual, converged)


def one_vector(solve: Callable) -> Callable:
    """``solve`` iterating on one flat vector when a system has several tensors of one dtype and device
    (``hypergrad.tensor_list.pack``; a batch, ``batched=True``, on one [B, N] tensor): an iteration then
    costs O(1) tensor operations whatever the number of tensors; ``matvec`` (and ``rmatvec``) still see and
    return the tensors themselves, and the solution comes back shaped like ``b``."""

    @functools.wraps(solve)
    def run(matvec: MatVec, b, x0=None, **options):
        b = list(b)
        rows = bool(options.get("batched"))  # a batch: every tensor [B, ...] packs to one [B, N]
        if len(b) < 2 or len({(t.dtype, t.device) for t in b}) != 1 or (
                rows and (any(t.dim() == 0 for t in b) or len({t.shape[0] for t in b}) != 1)):  # the solver says why
            return solve(matvec, b, x0, **options)
        shapes = [t.shape[1:] if rows else t.shape for t in b]
        flat = lambda f: (lambda u: tl.pack(f(tl.unpack(u, shapes, rows)), rows))
        if x0 is not None:
            x0 = tl.pack(tl.check_like(x0, b, "v0 (warm start)", "the adjoint"), rows)
        if options.get("rmatvec") is not None:
            options["rmatvec"] = flat(options["rmatvec"])
        x, info = solve(flat(matvec), tl.pack(b, rows), x0, **options)
        return tl.unpack(x, shapes, rows), info

    return run


SOLVERS: Dict[str, Callable] = {name: one_vector(fn) for name, fn in {
    "fixed_point": solve_fixed_point,
    "neumann": solve_neumann,
    "cg": solve_cg,
    "cg_normaleq": solve_cg_normaleq,
    "minres": solve_minres,
    "gmres": solve_gmres,
    "dense": solve_dense,
}.items()}
"""The linear solvers of the adjoint system by name (the ``solver`` of [`hypergradient`][hypergrad.hypergradient]).

"fixed_point", "neumann", "cg", "cg_normaleq", "minres", "gmres" and "dense", each
``solve(matvec, b, x0=None, *, maxiter, tol, rtol, ...) -> (x, SolveInfo)`` on lists of tensors, iterating
on one flat vector when a system has several tensors of one dtype and device."""
