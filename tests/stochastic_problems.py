"""References for the stochastic solvers, computed here independently of methods/.

The problems are methods.stochastic.quadratics' sample quadratics (the benchmark_bilevel generator):
f_i(y, x) = 1/2 (a_i.y)^2 + 1/2 (b_i.x)^2 + (c_i.x)(e_i.y) + l_i.y + m_i.x. Everything below is written
from that formula by hand: per-batch derivatives in closed form (no autograd), and the bilevel solution by
dense solves:

    y*(x) = -H^-1 (C^T x + l),   grad h(x) = grad_x F + J^T grad_y F at y*(x),   J = -H^-1 C^T,

with (H, G, C, l, m) the full-batch means of the inner (f) or outer (F) samples.
"""
import torch

from methods.stochastic import FiniteSum
from methods.stochastic.quadratics import make_quadratic_bilevel

DT = torch.float64


def small_problem(n_inner=256, n_outer=128, p=8, q=3, seed=0, **kw):
    return make_quadratic_bilevel(n_inner, n_outer, p, q, seed=seed, **kw)


def oracles(pb, batch_size=16, seed=0, outer_batch_size=None):
    """(inner, outer) FiniteSum oracles of a problem; twins with the same seeds draw the same batches."""
    return (FiniteSum(pb.inner.batch_loss, pb.inner.n, batch_size, seed=seed),
            FiniteSum(pb.outer.batch_loss, pb.outer.n, outer_batch_size or batch_size, seed=seed + 1))


# -- closed-form per-batch derivatives (scale: the oracle's unbiasing factor of the batch) ----------
def _rows(q, idx):
    return q.a[idx], q.b[idx], q.c[idx], q.e[idx], q.l_[idx], q.m_[idx]


def grad_y(q, y, x, batch):
    a, b, c, e, l_, m_ = _rows(q, batch.idx)
    return batch.scale * (a * (a @ y)[:, None] + e * (c @ x)[:, None] + l_).mean(0)


def grad_x(q, y, x, batch):
    a, b, c, e, l_, m_ = _rows(q, batch.idx)
    return batch.scale * (b * (b @ x)[:, None] + c * (e @ y)[:, None] + m_).mean(0)


def hvp(q, v, batch):
    """grad2_yy f_B v (constant in (y, x) for a quadratic)."""
    a = q.a[batch.idx]
    return batch.scale * (a * (a @ v)[:, None]).mean(0)


def cross(q, v, batch):
    """grad2_xy f_B v = mean c_i (e_i . v)."""
    c, e = q.c[batch.idx], q.e[batch.idx]
    return batch.scale * (c * (e @ v)[:, None]).mean(0)


def value(q, y, x, batch):
    a, b, c, e, l_, m_ = _rows(q, batch.idx)
    return batch.scale * (0.5 * (a @ y) ** 2 + 0.5 * (b @ x) ** 2 + (c @ x) * (e @ y) + l_ @ y + m_ @ x).mean()


# -- the bilevel solution by dense solves ---------------------------------------------------------
def y_star(pb, x):
    f = pb.inner
    return -torch.linalg.solve(f.H, f.C.T @ x + f.l)


def grad_h(pb, x):
    """grad h(x) = grad_x F(y*, x) - C_f H_f^-1 grad_y F(y*, x)."""
    f, F = pb.inner, pb.outer
    y = y_star(pb, x)
    gy = F.H @ y + F.C.T @ x + F.l
    gx = F.G @ x + F.C @ y + F.m
    return gx - f.C @ torch.linalg.solve(f.H, gy)


def x_star(pb):
    """The minimizer of the quadratic h: Hess_h x = -grad h(0), Hess_h written out here."""
    f, F = pb.inner, pb.outer
    J = -torch.linalg.solve(f.H, f.C.T)
    hess = J.T @ F.H @ J + F.G + F.C @ J + J.T @ F.C.T
    return torch.linalg.solve(hess, -grad_h(pb, torch.zeros(F.G.shape[0], dtype=F.G.dtype)))


def sq_grad_norm(pb, x):
    return float(grad_h(pb, x).square().sum())


# -- shared test helpers ----------------------------------------------------------------------------
def zeros():
    """y0 = 0 (dim 8) and x0 = 0 (dim 3), the small problem's shapes."""
    return torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT)


def neumann(b, hvps, eta):
    """eta sum_{k<=K} prod_{j<=k} (I - eta H_j) b, H_j v = hvps[j](v)."""
    r = s = b
    for h in hvps:
        r = r - eta * h(r)
        s = s + r
    return eta * s


def reads(host_reads, f):
    """Device-to-host reads made by f() (host_reads: the conftest fixture)."""
    n0 = host_reads["n"]
    f()
    return host_reads["n"] - n0


def random_state(solver, seed=3, t=4, g=None):
    """Put a random (y, v, x) and iteration t into ``solver`` (drawn from ``g``, else a generator seeded by
    ``seed``); returns copies."""
    g = torch.Generator().manual_seed(seed) if g is None else g
    solver.y = torch.randn(solver.y.shape, generator=g, dtype=DT)
    solver.v = torch.randn(solver.v.shape, generator=g, dtype=DT)
    solver.x = torch.randn(solver.x.shape, generator=g, dtype=DT)
    solver.t = t
    return solver.y.clone(), solver.v.clone(), solver.x.clone()

