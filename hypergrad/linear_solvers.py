"""Linear solvers for A x = b on lists of tensors, A given only through ``matvec``.

Every solver has the signature ``solve(matvec, b, x0=None, *, maxiter, tol, rtol, ...) -> (x, SolveInfo)``
and stops when the residual norm is <= max(tol, rtol * ||b||). The hypergradient functions use them with
A = I - (dPhi/dw)^T, so one ``matvec`` is one vector-Jacobian product through the fixed-point map.

Convergence is tested on the device; the host reads it only every ``check_every`` iterations
(default: every iteration on CPU, where reading is free, every 10 on accelerators). Every read also
checks for NaN/Inf and for a residual that grew ``divergence_factor`` times past its start, and raises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import BreakdownError, DivergenceError, NonFiniteError, SingularSystemError

MatVec = Callable[[List[Tensor]], List[Tensor]]


@dataclass
class SolveInfo:
    """What a solve did: ``iterations`` (operator products), final ``residual`` norm, ``converged``."""
    solver: str
    iterations: int
    residual: float
    converged: bool


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


class _Monitor:
    """Stopping rule and safety checks, reading the device only every ``check_every`` iterations."""

    def __init__(self, name: str, b: Sequence[Tensor], r0, tol: float, rtol: float,
                 check_every: Optional[int], divergence_factor: float):
        if tol < 0 or rtol < 0:
            raise ValueError(f"tolerances must be >= 0, got tol={tol}, rtol={rtol}")
        self.name = name
        self.every = check_every or (1 if b[0].device.type == "cpu" else 10)
        self.threshold = max(tol, rtol * float(tl.norm(b).detach())) if rtol > 0 else tol
        self.r0 = _read(r0)
        if not math.isfinite(self.r0):
            raise NonFiniteError(f"{name}: the right-hand side or the starting point contains NaN or Inf")
        self.limit = divergence_factor * max(self.r0, self.threshold)
        self.residual = self.r0

    def done_at_start(self) -> bool:
        return self.r0 <= self.threshold

    def check(self, it: int, res, force: bool = False, hint: str = "") -> bool:
        """True when converged. Raises on NaN/Inf or divergence. Reads ``res`` only on check iterations."""
        if not force and it % self.every != 0:
            return False
        r = _read(res)
        self.residual = r
        if not math.isfinite(r):
            raise NonFiniteError(f"{self.name}: NaN or Inf in the iterates after {it} iterations{hint}")
        if r > self.limit:
            raise DivergenceError(
                f"{self.name} diverges: residual {r:.3e} after {it} iterations, started at {self.r0:.3e}{hint}")
        return r <= self.threshold


def _start(matvec: MatVec, b: Sequence[Tensor], x0) -> Tuple[List[Tensor], List[Tensor], int]:
    """Initial iterate and residual (one product when a warm start is given)."""
    if x0 is None:
        return tl.zeros_like(b), list(b), 0
    x = tl.check_like(x0, b, "v0 (warm start)", "the adjoint")
    x = [t.detach().clone() if not t.requires_grad else t for t in x]
    return x, tl.sub(b, matvec(x)), 1


def solve_fixed_point(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10,
                      rtol: float = 0.0, check_every=None, divergence_factor: float = 1e6, **_):
    """Richardson iteration x <- x + (b - A x), i.e. v <- J^T v + b for A = I - J^T.

    ``residual`` is the last change ||x_{k+1} - x_k|| = ||b - A x_k|| (hypertorch's stopping rule).
    """
    S = _Scalars(b)
    x, r, its = _start(matvec, b, x0)
    mon = _Monitor("fixed_point", b, S.sqrt(S.dot(r, r)), tol, rtol, check_every, divergence_factor)
    converged = mon.done_at_start()
    for k in range(maxiter):
        if converged:
            break
        if k > 0:  # the first residual is known: b (cold start) or computed by _start (warm start)
            r = tl.sub(b, matvec(x))
            its += 1
        x = tl.axpy(1.0, r, x)
        converged = mon.check(k + 1, S.sqrt(S.dot(r, r)), force=(k + 1 == maxiter))
    return x, SolveInfo("fixed_point", its, mon.residual, converged)


def solve_neumann(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10,
                  rtol: float = 0.0, check_every=None, divergence_factor: float = 1e6, **_):
    """Truncated Neumann series x = x0 + sum_{i<=K} (I - A)^i r0; equals ``fixed_point`` with K+1 steps.

    ``residual`` is the norm of the last term added.
    """
    S = _Scalars(b)
    x, p, its = _start(matvec, b, x0)
    x = tl.axpy(1.0, p, x)
    mon = _Monitor("neumann", b, S.sqrt(S.dot(p, p)), tol, rtol, check_every, divergence_factor)
    converged = mon.done_at_start()
    for k in range(maxiter):
        if converged:
            break
        p = tl.sub(p, matvec(p))
        its += 1
        x = tl.axpy(1.0, p, x)
        converged = mon.check(k + 1, S.sqrt(S.dot(p, p)), force=(k + 1 == maxiter))
    return x, SolveInfo("neumann", its, mon.residual, converged)


def solve_cg(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10, rtol: float = 0.0,
             check_every=None, divergence_factor: float = 1e6, **_):
    """Conjugate gradient for symmetric positive definite A. Returns the *latest* iterate.

    The recurrence r_{k+1} = r_k - alpha A p_k is the true residual b - A x_k up to rounding, which
    drifts by at most ~ k eps (||A|| ||x|| + ||b||) (Greenbaum). When the recurrence says it converged
    and that bound is not far below the tolerance, the true residual is computed (one product) and
    CG restarts from it while iterations remain: a ``converged`` result has a true residual below the
    tolerance. Breakdown (p^T A p = 0 with a nonzero residual: an indefinite or singular A) raises
    :class:`BreakdownError` instead of returning NaN.
    """
    S = _Scalars(b)
    x, r, its = _start(matvec, b, x0)
    rr = S.dot(r, r)
    mon = _Monitor("cg", b, S.sqrt(rr), tol, rtol, check_every, divergence_factor)
    if mon.done_at_start():
        return x, SolveInfo("cg", its, mon.residual, True)
    hint = "; the system may be indefinite or non-symmetric: try solver='minres' or 'gmres'"
    broke = False if S.host else torch.zeros((), dtype=torch.bool, device=b[0].device)
    p, k, converged, last_checked = r, 0, False, mon.r0
    a_scale = 0.0 if S.host else torch.zeros_like(rr)  # max 1/|alpha_k| = |p^T A p| / r^T r: A's scale
    while k < maxiter:
        Ap = matvec(p)
        its, k = its + 1, k + 1
        pAp = S.dot(p, Ap)
        broke = broke | ((pAp == 0) & (rr > 0))
        a_scale = S.abs_max(S.div(pAp, rr), a_scale)
        if (k % mon.every == 0 or k == maxiter) and bool(broke):
            raise BreakdownError(f"cg broke down at iteration {k}: p^T A p = 0 with a nonzero residual{hint}")
        alpha = S.div(rr, pAp)
        x = tl.axpy(alpha, p, x)
        r = tl.axpy(-alpha, Ap, r)
        rr_new = S.dot(r, r)
        if mon.check(k, S.sqrt(rr_new), force=(k == maxiter), hint=hint):
            if S.host and _rounding_floor(its, a_scale, x, b) <= 0.1 * mon.threshold:
                converged = True  # the recurrence cannot have drifted: no confirming product needed
                break
            r = tl.sub(b, matvec(x))  # confirm with the true residual
            its += 1
            rr_new = S.dot(r, r)
            converged = mon.check(k, S.sqrt(rr_new), force=True, hint=hint)
            if converged:
                break
            p, rr = r, rr_new  # restart from the true residual
            continue
        if k % mon.every == 0:
            if (mon.residual > 0.5 * last_checked and mon.residual < 1e-3 * mon.r0
                    and mon.residual <= _rounding_floor(its, _read(a_scale), x, b) / 100):
                break  # stalled at the rounding level (the bound without its safety factors): more steps
                # cannot help, and on a singular A they amplify rounding noise in the null space
            last_checked = mon.residual
        p = tl.axpy(S.div(rr_new, rr), p, r)
        rr = rr_new
    return x, SolveInfo("cg", its, mon.residual, converged)


def _rounding_floor(its: int, a_scale: float, x, b) -> float:
    """Greenbaum's bound on the gap between CG's recurrence and true residuals, 10 k eps (||A|| ||x|| +
    ||b||), with ||A|| estimated by 10 max_k 1/|alpha_k| (a Rayleigh-quotient scale: safety factor)."""
    eps = torch.finfo(b[0].dtype).eps
    return 10 * its * eps * (10 * a_scale * _read(tl.norm(x)) + _read(tl.norm(b)))


def solve_minres(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10,
                 rtol: float = 0.0, check_every=None, divergence_factor: float = 1e6, **_):
    """MINRES (Paige & Saunders) for symmetric, possibly indefinite or singular A.

    One product per iteration; minimizes ||b - A x|| over the Krylov space. Symmetry is checked on the
    way (the Lanczos relation <v_{k-1}, A v_k> = beta_k) and the result is confirmed by one true
    residual; a non-symmetric operator raises :class:`BreakdownError`.
    """
    S = _Scalars(b)
    x, r1, its = _start(matvec, b, x0)
    beta = S.sqrt(S.dot(r1, r1))
    mon = _Monitor("minres", b, beta, tol, rtol, check_every, divergence_factor)
    if mon.done_at_start():
        return x, SolveInfo("minres", its, mon.residual, True)
    zero = 0.0 if S.host else torch.zeros_like(beta)
    eps = torch.finfo(b[0].dtype).eps
    noise, sym_tol = eps ** 0.5, 1e-6 * (eps / 2.2e-16) ** 0.5  # 1.5e-8 and 1e-6 in float64
    y, r2 = r1, r1
    oldb, dbar, epsln, phibar, cs, sn = zero, zero, zero, beta, zero - 1.0, zero
    w, w2 = tl.zeros_like(b), tl.zeros_like(b)
    v, asym, converged = None, zero, False
    for k in range(maxiter):
        v_prev, v = v, tl.scale(S.div(1.0, beta), y)
        y = matvec(v)
        its += 1
        if k > 0:
            gap = (S.dot(v_prev, y) - beta) / (S.sqrt(S.dot(y, y)) + beta)
            # past convergence the Lanczos vectors are rounding noise: stop checking there
            asym = S.abs_max(S.select(phibar > noise * mon.r0, gap, zero), asym)
            y = tl.axpy(-S.div(beta, oldb), r1, y)
        alfa = S.dot(v, y)
        y = tl.axpy(-S.div(alfa, beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, S.sqrt(S.dot(y, y))
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
        x = tl.axpy(phi, w, x)
        converged = mon.check(k + 1, phibar, force=(k + 1 == maxiter))
        if (k + 1) % mon.every == 0 or converged or k + 1 == maxiter:
            if _read(asym) > sym_tol:
                raise BreakdownError(f"minres needs a symmetric operator, but <u, A v> != <A u, v> (relative "
                                     f"gap {_read(asym):.1e} at iteration {k + 1}); use solver='gmres'")
        if converged:
            break
    r = tl.sub(b, matvec(x))
    true_res = _read(S.sqrt(S.dot(r, r)))
    if not math.isfinite(true_res):
        raise NonFiniteError("minres: NaN or Inf in the final iterate")
    return x, SolveInfo("minres", its + 1, true_res, converged and true_res <= max(mon.threshold, 10 * mon.residual))


def solve_gmres(matvec: MatVec, b, x0=None, *, maxiter: int = 100, tol: float = 1e-10, rtol: float = 0.0,
                check_every=None, divergence_factor: float = 1e6, restart: int = 50, **_):
    """Restarted GMRES(restart) for general (non-symmetric) A, with modified Gram-Schmidt Arnoldi.

    The small least-squares problem is solved on the host only on check iterations.
    """
    S = _Scalars(b)
    x, r, its = _start(matvec, b, x0)
    beta = tl.norm(r)
    mon = _Monitor("gmres", b, beta, tol, rtol, check_every, divergence_factor)
    converged = mon.done_at_start()
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


def solve_dense(matvec: MatVec, b, x0=None, *, tol: float = 1e-10, rtol: float = 0.0,
                matmat: Optional[Callable[[], Optional[Tensor]]] = None, **_):
    """Materialize A (``matmat()``, e.g. one batched product; else n products) and solve it by
    :func:`solve_matrix`. For small systems only (n up to a few thousand)."""
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


def solve_matrix(A: Tensor, b, *, tol: float = 1e-10, rtol: float = 0.0):
    """x = A^-1 b by LU, for an explicit n x n matrix A and b a list of tensors (n entries in all).

    Raises :class:`SingularSystemError` when the 1-norm condition number (Hager's estimate from the LU
    factors, O(n^2)) is >= 1 / (n eps). Differentiable when A or b carry a graph (second order).
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
        raise SingularSystemError(f"dense: I - dPhi/dw is singular (condition number estimate {cond:.3e}); the "
                                  "hypergradient is not defined at this point (minres gives a least-squares adjoint)")
    x = torch.linalg.lu_solve(LU, pivots, flat_b[:, None])[:, 0]
    xd, bd = x.detach(), flat_b.detach()
    res = float(torch.linalg.norm(A.detach() @ xd - bd))
    thresh = max(tol, rtol * float(torch.linalg.norm(bd)))
    eps = torch.finfo(A.dtype).eps  # LU is backward stable: residual ~ n eps ||A|| ||x||
    floor = 10 * n * eps * (a_norm * float(xd.abs().sum()) + float(bd.abs().sum()))
    return tl.unflatten(x, b), SolveInfo("dense", n, res, res <= max(thresh, floor))


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


def solve_cg_normaleq(matvec: MatVec, b, x0=None, *, rmatvec: Optional[MatVec] = None, **kw):
    """CG on the normal equations A^T A x = A^T b (any nonsingular A). ``residual`` is ||A^T(b - A x)||."""
    if rmatvec is None:
        raise ValueError("cg_normaleq needs rmatvec (products with A^T)")
    nmv, nb = normal_equations(matvec, rmatvec, b)
    x, info = solve_cg(nmv, nb, x0, **kw)
    return x, SolveInfo("cg_normaleq", 2 * info.iterations, info.residual, info.converged)


SOLVERS: Dict[str, Callable] = {
    "fixed_point": solve_fixed_point,
    "neumann": solve_neumann,
    "cg": solve_cg,
    "cg_normaleq": solve_cg_normaleq,
    "minres": solve_minres,
    "gmres": solve_gmres,
    "dense": solve_dense,
}
