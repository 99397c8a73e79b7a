"""Reference problems for the constrained tests: planted QPs with closed-form hypergradients.

Nothing here imports ``constrained``: the references are computed from the KKT linear algebra directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DT = torch.float64


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class PlantedQP:
    """g = 1/2 y'Qy + (c + Bx)'y,  p = Gy - h - Ex <= 0,  q = Ay - b - Fx = 0, with a planted KKT point
    (y, mu, nu) at x whose active set is ``active`` (multipliers and slacks bounded away from 0)."""
    Q: torch.Tensor
    c: torch.Tensor
    B: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    E: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    F: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    mu: torch.Tensor
    nu: torch.Tensor
    active: torch.Tensor
    yt: torch.Tensor   # target of the outer loss E = 1/2 ||y - yt||^2 + 1/2 ||x||^2 (+ w_mu'mu)

    # --- the torch-side problem (plain callables) ---
    def objective(self, params, hparams):
        y, x = params[0], hparams[0]
        return 0.5 * y @ (self.Q @ y) + (self.c + self.B @ x) @ y

    def ineq(self, params, hparams):
        return self.G @ params[0] - self.h - self.E @ hparams[0]

    def eq(self, params, hparams):
        return self.A @ params[0] - self.b - self.F @ hparams[0]

    def outer_loss(self, params, hparams):
        return 0.5 * ((params[0] - self.yt) ** 2).sum() + 0.5 * (hparams[0] ** 2).sum()

    # --- independent references ---
    def kkt_matrix(self, active=None):
        a = self.active if active is None else active
        GA = self.G[a]
        n, na, k = self.Q.shape[0], len(a), self.A.shape[0]
        K = torch.zeros(n + na + k, n + na + k, dtype=DT)
        K[:n, :n] = self.Q
        K[:n, n:n + na] = GA.T
        K[n:n + na, :n] = GA
        K[:n, n + na:] = self.A.T
        K[n + na:, :n] = self.A
        return K

    def exact_hypergrad(self, active=None, dE_dmu=None):
        """grad = grad_x E - B'v_y + E_A'v_mu + F'v_nu with K v = [grad_y E; grad_mu_A E; 0]."""
        a = self.active if active is None else active
        n, na = self.Q.shape[0], len(a)
        rhs = torch.zeros(self.kkt_matrix(a).shape[0], dtype=DT)
        rhs[:n] = self.y - self.yt
        if dE_dmu is not None:
            rhs[n:n + na] = dE_dmu[a]
        v = torch.linalg.solve(self.kkt_matrix(a), rhs)
        vy, vm, vn = v[:n], v[n:n + na], v[n + na:]
        return self.x - self.B.T @ vy + self.E[a].T @ vm + self.F.T @ vn

    def solve_with_active(self, x, active=None):
        """(y, mu_A, nu) at x by the KKT linear system of the given active set, and a check that it is
        still a KKT point of the QP there (so central differences of it are differences of y*(x))."""
        a = self.active if active is None else active
        n, na = self.Q.shape[0], len(a)
        rhs = torch.cat([-(self.c + self.B @ x), self.h[a] + self.E[a] @ x, self.b + self.F @ x])
        s = torch.linalg.solve(self.kkt_matrix(a), rhs)
        y, mu_a, nu = s[:n], s[n:n + na], s[n + na:]
        slack = self.h + self.E @ x - self.G @ y
        assert (na == 0 or float(mu_a.min()) > 0) and float(slack.min()) > -1e-12, "active set changed"
        return y, mu_a, nu


def planted_qp(n=8, m=6, k=2, d=3, n_active=3, seed=0, singular_Q=False, margin=0.5) -> PlantedQP:
    g = torch.Generator().manual_seed(seed)
    R = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    U = lambda *s: margin + torch.rand(*s, generator=g, dtype=DT)  # noqa: E731  values in [margin, margin+1]
    M = R(n, n)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)
    if singular_Q:
        Q = torch.zeros(n, n, dtype=DT)
    B, G, E, A, F = R(n, d), R(m, n), R(m, d), R(k, n), R(k, d)
    x, y, nu = R(d), R(n), R(k)
    perm = torch.randperm(m, generator=g)
    active = perm[:n_active].sort().values
    inactive = perm[n_active:].sort().values
    mu = torch.zeros(m, dtype=DT)
    mu[active] = U(n_active)
    slack = torch.zeros(m, dtype=DT)
    slack[inactive] = U(m - n_active)
    h = G @ y - E @ x + slack
    b = A @ y - F @ x
    c = -(Q @ y + B @ x + G.T @ mu + A.T @ nu)
    return PlantedQP(Q, c, B, G, h, E, A, b, F, x, y, mu, nu, active, R(n))


def planted_cvxpy(qp: PlantedQP):
    """The same QP as a DPP cvxpy problem in the parameter x: (problem, x_param, y_var, ineq, eq)."""
    import cvxpy as cp

    N = lambda t: t.numpy()  # noqa: E731
    n, d = qp.Q.shape[0], qp.x.numel()
    y, xp = cp.Variable(n), cp.Parameter(d)
    ineq = [N(qp.G) @ y <= N(qp.h) + N(qp.E) @ xp]
    eq = [N(qp.A) @ y == N(qp.b) + N(qp.F) @ xp] if qp.A.shape[0] else []
    obj = 0.5 * cp.quad_form(y, cp.psd_wrap(N(qp.Q))) + (N(qp.c) + N(qp.B) @ xp) @ y
    return cp.Problem(cp.Minimize(obj), ineq + eq), xp, y, ineq, eq
