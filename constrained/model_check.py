"""Is the torch model of the inner problem the cvxpy model, in values *and* derivatives?

Values alone miss a model that lost its dependence on y or x (a ``.detach()``, ``.item()``, a NumPy round
trip): it has the right values and a wrong hypergradient. So for each piece s (the objective g, and
w_c^T c(y, x) for each constraint c with random weights w_c) the torch autograd derivatives

    D_y s[u],  D^2_yy s[u, u],  D_x s[e] (constraints only),  D^2_xy s[u, e]

along random directions u (in y) and e (in x) are compared with central differences of the cvxpy
expressions, evaluated (not solved) at (y +- t u, v +- t dv), v the cvxpy parameter values and
dv = (dv/dx) e. An x-only term of g is irrelevant to y*(x) and is not compared. When the values do not
depend on the hparams through autograd (dv/dx unknown), the x-derivatives are compared with central
differences of the torch model's own values instead (which a ``.detach()`` does not change).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from hypergrad import tensor_list as tl

from .errors import ModelMismatchError
from .problem import ConstrainedProblem

STEPS = (1e-4, 1e-3)  # central-difference steps (first, second order), relative to the scales of y and x


def _unit(like: Tensor, gen: torch.Generator) -> Tensor:
    """A random direction scaled per entry like ``like``: r_i max(|like_i|, 1e-2 ||like||_inf) (1 where like = 0),
    so that a step stays inside the domain of log, sqrt, ... and the differences resolve each entry."""
    r = torch.randn(like.shape, generator=gen, dtype=torch.float64, device="cpu")
    if r.numel() == 0:
        return r.to(like.dtype)
    a = like.detach().double().cpu().abs()
    top = float(a.max())
    return (r * torch.clamp(a, min=1e-2 * top if top > 0 else 1.0)).to(device=like.device, dtype=like.dtype)


def _value_directions(values: Sequence[Tensor], hparams: Sequence[Tensor], e: List[Tensor],
                      identity: bool) -> Optional[List[np.ndarray]]:
    """dv = (dv/dx) e for the cvxpy parameter values v(x): e itself when values are the hparams, by autograd
    (forward mode from the values' graph, the double-VJP trick) otherwise; None when no value depends on x."""
    if identity:
        return [d.detach().double().cpu().numpy() for d in e]
    idx = [j for j, h in enumerate(hparams) if h.requires_grad]
    outs = [v for v in values if v.requires_grad]
    if not idx or not outs:
        return None
    with torch.enable_grad():
        zs = [torch.zeros_like(v, requires_grad=True) for v in outs]
        gs = torch.autograd.grad(outs, [hparams[j] for j in idx], grad_outputs=zs, create_graph=True,
                                 allow_unused=True)
        pairs = [(g, e[j]) for g, j in zip(gs, idx) if g is not None]
        if not pairs or not any(g.requires_grad for g, _ in pairs):
            return None
        total = sum((g * d).sum() for g, d in pairs)
        jv = tl.grad_or_zeros(total, zs)
    it = iter(jv)
    return [next(it).detach().double().cpu().numpy() if v.requires_grad else np.zeros(tuple(v.shape))
            for v in values]


class _CvxpyPieces:
    """Evaluates the pieces s of the cvxpy problem at given variable and parameter values (no solve)."""

    def __init__(self, problem: cp.Problem, parameters, variables, ineq, eq, weights: List[np.ndarray]):
        self.problem, self.parameters, self.variables = problem, list(parameters), list(variables)
        self.constraints, self.weights = list(ineq) + list(eq), weights
        self.sign = 1.0 if isinstance(problem.objective, cp.Minimize) else -1.0

    def __call__(self, ys: Sequence[np.ndarray], vs: Sequence[np.ndarray]) -> np.ndarray:
        for var, val in zip(self.variables, ys):
            var.value = val.reshape(var.shape)
        for par, val in zip(self.parameters, vs):
            par.value = val.reshape(par.shape)
        out = [self.sign * float(np.asarray(self.problem.objective.expr.value))]
        for c, w in zip(self.constraints, self.weights):
            out.append(float(w @ np.asarray(c.expr.value, dtype=np.float64).reshape(-1)))
        return np.array(out)


def _torch_pieces(tp: ConstrainedProblem, y, x, weights: List[Tensor], sizes: Tuple[List[int], List[int]]):
    """The same pieces of the torch model: g, w_c^T p[slice_c], w_c^T q[slice_c]."""
    out = [tp.value(y, x)]
    for vec, ns, off in ((tp.p(y, x), sizes[0], 0), (tp.q(y, x), sizes[1], len(sizes[0]))):
        start = 0
        for j, n in enumerate(ns):
            out.append((weights[off + j] * vec[start:start + n]).sum())
            start += n
    return out


def _torch_derivatives(tp, params, hparams, u, e, weights, sizes):
    """Per piece: (D_y s[u], D_yy s[u,u], D_x s[e], D_xy s[u,e]) by autograd, each with its Cauchy-Schwarz
    scale (||gradient|| ||direction||), and |s|."""
    with torch.enable_grad():
        y = [t.detach().requires_grad_(True) for t in params]
        x = [h.detach().requires_grad_(True) for h in hparams]
        rows = []
        for s in _torch_pieces(tp, y, x, weights, sizes):
            gy, gx = _grads(s, y, True), _grads(s, x, True)
            dy = sum((a * b).sum() for a, b in zip(gy, u))
            hy, hx = _grads(dy, y), _grads(dy, x)
            rows.append([(_dot(gy, u), _cs(gy, u)), (_dot(hy, u), _cs(hy, u)),
                         (_dot(gx, e), _cs(gx, e)), (_dot(hx, e), _cs(hx, e)), abs(float(s.detach()))])
    return rows


def _short(c) -> str:
    text = " ".join(str(c).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _grads(s: Tensor, inputs: List[Tensor], create_graph: bool = False) -> List[Tensor]:
    """d s / d inputs, zeros where s does not depend on them (or on anything: a fully detached piece)."""
    if not (isinstance(s, Tensor) and s.requires_grad) or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    return tl.grad_or_zeros(s, inputs, create_graph=create_graph)


def _dot(a, b) -> float:
    return float(sum((s.detach().double() * t.double()).sum() for s, t in zip(a, b))) if a else 0.0


def _cs(a, b) -> float:
    return float(tl.norm([t.detach().double() for t in a]) * tl.norm([t.double() for t in b])) if a else 0.0


def check_derivatives(torch_problem: ConstrainedProblem, cvx_problem: cp.Problem, parameters, values, variables,
                      ineq, eq, params, hparams, tol: float, identity: bool, seed: int = 0) -> None:
    """Compare the derivatives of the torch model with central differences of the cvxpy expressions (see
    the docstring of the module [`constrained.model_check`][constrained.model_check]); raises
    [`ModelMismatchError`][constrained.ModelMismatchError] naming the piece, the
    derivative and the gap. Restores the variables' and parameters' values afterwards."""
    dt = params[0].dtype
    tol = max(tol, 100 * torch.finfo(dt).eps)
    gen = torch.Generator().manual_seed(seed)
    sizes = ([c.size for c in ineq], [c.size for c in eq])
    w64 = [torch.randn(n, generator=gen, dtype=torch.float64, device="cpu") for n in sizes[0] + sizes[1]]
    weights = [w.to(device=params[0].device, dtype=dt) for w in w64]
    u = [_unit(t, gen) for t in params]
    e = [_unit(h, gen) if h.is_floating_point() else torch.zeros_like(h) for h in hparams]
    dv = _value_directions(values, hparams, e, identity)
    named = [("ineq", i, c) for i, c in enumerate(ineq)] + [("eq", i, c) for i, c in enumerate(eq)]
    mine = _torch_derivatives(torch_problem, params, hparams, u, e, weights, sizes)

    saved_y = [None if v.value is None else np.array(v.value) for v in variables]
    saved_v = [None if p.value is None else np.array(p.value) for p in parameters]
    pieces = _CvxpyPieces(cvx_problem, parameters, variables, ineq, eq, [w.numpy() for w in w64])
    y0 = [t.detach().double().cpu().numpy() for t in params]
    v0 = [t.detach().double().cpu().numpy() for t in values]
    u0 = [t.double().cpu().numpy() for t in u]
    try:
        mags = np.array([row[4] + sum(sc for _, sc in row[:4]) for row in mine])  # sizes of the terms in s
        refs = _references(pieces, y0, v0, u0, dv, mags, torch_problem, params, hparams, u, e, weights, sizes)
    finally:
        for var, val in zip(variables, saved_y):
            var.value = val
        for par, val in zip(parameters, saved_v):
            par.value = val
    names = ["D_y (along a random u)", "D^2_yy (u, u)", "D_x (along a random e)", "D^2_xy (u, e)"]
    wrt = ["the inner variables y", "y", "the hparams x", "the hparams x"]
    for i in range(1 + len(named)):
        for k in range(4):
            if i == 0 and k == 2:
                continue  # an x-only term of g does not move y*(x)
            ref, err, src = refs[k][i]
            got, scale = mine[i][k]
            if not np.isfinite(ref):
                continue
            gap = abs(got - ref)
            if gap > tol * (scale + abs(ref)) + err:
                label = "the objective" if i == 0 else "{}[{}] ({})".format(*named[i - 1][:2], _short(named[i - 1][2]))
                raise ModelMismatchError(
                    f"{label}: the torch model's derivative {names[k]} is {got:.6g} by autograd but {ref:.6g} by "
                    f"central differences of {src} (gap {gap:.3e} > tolerance {tol * (scale + abs(ref)) + err:.3e}): "
                    f"the torch model lost or changed its dependence on {wrt[k]} (a .detach(), .item(), NumPy round "
                    "trip or torch.no_grad() inside it?); the hypergradient would be wrong")


def _references(pieces, y0, v0, u0, dv, mags, tp, params, hparams, u, e, weights, sizes):
    """[(ref, err, source) per piece] for D_y, D_yy, D_x, D_xy: central differences, with the rounding-error
    bound err = 100 eps M / t^order (M: the size of the terms of s, from the torch side)."""
    (t1, t2), eps = STEPS, np.finfo(np.float64).eps

    def at(t, sy, sx):
        return pieces([a + sy * t * b for a, b in zip(y0, u0)],
                      [a + sx * t * b for a, b in zip(v0, dv)] if sx else v0)

    c = at(0, 0, 0)
    d_y = (at(t1, 1, 0) - at(t1, -1, 0)) / (2 * t1), 100 * eps * mags / t1
    d_yy = (at(t2, 1, 0) - 2 * c + at(t2, -1, 0)) / t2 ** 2, 100 * eps * mags / t2 ** 2
    src = "the cvxpy expressions"
    try:
        if dv is not None:
            d_x = (at(t1, 0, 1) - at(t1, 0, -1)) / (2 * t1), 100 * eps * mags / t1
            d_xy = ((at(t2, 1, 1) - at(t2, 1, -1) - at(t2, -1, 1) + at(t2, -1, -1)) / (4 * t2 ** 2),
                    100 * eps * mags / t2 ** 2)
    except ValueError:  # a sign-restricted parameter (nonneg=True) pushed out of its set
        dv = None
    if dv is not None:
        srcs = [src] * 4
    else:
        d_x, d_xy = _torch_x_references(tp, params, hparams, u, e, weights, sizes, mags)
        srcs = [src, src, "the torch model's own values", "the torch model's own D_y"]
    return [[(float(a), float(b), s) for a, b in zip(vals, errs)]
            for (vals, errs), s in zip((d_y, d_yy, d_x, d_xy), srcs)]


def _torch_x_references(tp, params, hparams, u, e, weights, sizes, mags):
    """Central differences in x of the torch model's values (D_x) and of its autograd D_y (D_xy), for when
    dv/dx is unknown: a model that dropped its dependence on x still has the right values."""
    dt = params[0].dtype
    t = float(torch.finfo(dt).eps) ** (1 / 3)

    def pieces_at(sign):
        x = [h.detach() + sign * t * d for h, d in zip(hparams, e)]
        with torch.enable_grad():
            y = [p.detach().requires_grad_(True) for p in params]
            vals, dys = [], []
            for s in _torch_pieces(tp, y, x, weights, sizes):
                gy = _grads(s, y)
                vals.append(float(s))
                dys.append(_dot(gy, u))
        return np.array(vals), np.array(dys)

    (sp, dp), (sm, dm) = pieces_at(1), pieces_at(-1)
    eps = float(torch.finfo(dt).eps)
    err = 100 * eps * mags / t + t ** 2 * mags  # rounding + truncation (t = eps^(1/3) balances them)
    return ((sp - sm) / (2 * t), err), ((dp - dm) / (2 * t), err)
