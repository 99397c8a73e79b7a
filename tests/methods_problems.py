"""Bilevel test problems for methods/, with references computed here independently of methods/.

All float64. ``quadratic``: f(x, y) = 1/2 y^T A y - y^T B x (+ shift), F(x, y) = 1/2 |y - y_t|^2 +
rho/2 |x - x_t|^2, so y*(x) = A^-1 B x, the implicit hypergradient at any y is
grad_x F + B^T A^-1 grad_y F, and the optimal upper value has a closed form.
``mlp``: a tanh network trained on per-sample weighted squared loss (weights sigmoid(x)), upper loss a
validation MSE; written twice: as an nn.Module for the solvers and with plain tensors for references.
"""
import math

import torch
from torch import nn

DT = torch.float64


class Vec(nn.Module):
    """A module holding one parameter vector; calling it returns the vector."""

    def __init__(self, value, name="v"):
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(value.clone()))

    def forward(self):
        return getattr(self, self.name)


def quadratic(n=6, m=3, rho=0.1, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    A = Q @ torch.diag(torch.linspace(1.0, 4.0, n, dtype=DT)) @ Q.T
    B = torch.randn(n, m, generator=g, dtype=DT)
    y_t = torch.randn(n, generator=g, dtype=DT)
    x_t = torch.randn(m, generator=g, dtype=DT)
    x0 = torch.randn(m, generator=g, dtype=DT)
    y0 = torch.randn(n, generator=g, dtype=DT)

    def f(x, y):
        return 0.5 * y @ A @ y - y @ B @ x + shift

    def F(x, y):
        return 0.5 * ((y - y_t) ** 2).sum() + 0.5 * rho * ((x - x_t) ** 2).sum()

    Ainv = torch.linalg.inv(A)
    M = Ainv @ B
    x_opt = torch.linalg.solve(M.T @ M + rho * torch.eye(m, dtype=DT), M.T @ y_t + rho * x_t)
    F_opt = F(x_opt, M @ x_opt).item()

    def implicit_grad(x, y):
        """grad_x F + B^T A^-1 grad_y F at (x, y) (y any point, not necessarily y*)."""
        return rho * (x - x_t) + B.T @ (Ainv @ (y - y_t))

    return dict(A=A, B=B, f=f, F=F, x0=x0, y0=y0, x_opt=x_opt, F_opt=F_opt, implicit_grad=implicit_grad,
                y_star=lambda x: M @ x, L=4.0, n=n, m=m)


def quadratic_objectives(p):
    """(ll_objective, ul_objective) of ``state`` for :func:`quadratic`, via module calls."""
    def ll(state):
        return p["f"](state["upper_model"](), state["lower_model"]())

    def ul(state):
        return p["F"](state["upper_model"](), state["lower_model"]())

    return ll, ul


class MLP(nn.Module):
    def __init__(self, d=3, h=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d, h).double()
        self.l2 = nn.Linear(h, 1).double()

    def forward(self, X):
        return self.l2(torch.tanh(self.l1(X))).squeeze(-1)


def mlp_problem(n_train=12, n_val=10, d=3, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xtr = torch.randn(n_train, d, generator=g, dtype=DT)
    ttr = torch.sin(Xtr.sum(1)) + 0.3 * torch.randn(n_train, generator=g, dtype=DT)
    Xva = torch.randn(n_val, d, generator=g, dtype=DT)
    tva = torch.sin(Xva.sum(1))
    x0 = 0.5 * torch.randn(n_train, generator=g, dtype=DT)
    net = MLP(d, h, seed)
    y0 = [p.detach().clone() for p in net.parameters()]  # W1, b1, W2, b2

    def plain_net(y, X):
        W1, b1, W2, b2 = y
        return (torch.tanh(X @ W1.T + b1) @ W2.T + b2).squeeze(-1)

    def f(x, y):
        return (torch.sigmoid(x) * (plain_net(y, Xtr) - ttr) ** 2).mean() + 1e-3 * sum((w ** 2).sum() for w in y)

    def F(x, y):
        return ((plain_net(y, Xva) - tva) ** 2).mean()

    def ll(state):
        w = state["upper_model"]()
        net_ = state["lower_model"]
        return (torch.sigmoid(w) * (net_(state["data"]) - state["target"]) ** 2).mean() + \
            1e-3 * sum((p ** 2).sum() for p in net_.parameters())

    def ul(state):
        return ((state["lower_model"](state["data"]) - state["target"]) ** 2).mean()

    return dict(Xtr=Xtr, ttr=ttr, Xva=Xva, tva=tva, x0=x0, net=net, y0=y0, f=f, F=F, ll=ll, ul=ul)


def toy(n=2, a=2.0, c=None):
    """The BVFIM paper's non-convex toy: F = |x - a|^2 + |y - a - c|^2, f = sum_i sin(x + y_i - c_i),
    x scalar, y in R^n. Lower solutions y_i = c_i - x - pi/2 + 2 k_i pi; the optimum takes every k_i = k*
    minimizing |2a + pi/2 - 2k pi|: x* = ((1 - n) a - n (pi/2 - 2k* pi)) / (1 + n),
    F* = n/(1+n) (2a + pi/2 - 2k* pi)^2."""
    c = torch.linspace(-1.0, 1.0, n, dtype=DT) if c is None else c
    k = round((2 * a + math.pi / 2) / (2 * math.pi))
    x_opt = ((1 - n) * a - n * (math.pi / 2 - 2 * k * math.pi)) / (1 + n)
    F_opt = n / (1 + n) * (2 * a + math.pi / 2 - 2 * k * math.pi) ** 2
    y_opt = c - x_opt - math.pi / 2 + 2 * k * math.pi

    def f(x, y):
        return torch.sin(x + y - c).sum()

    def F(x, y):
        return ((x - a) ** 2).sum() + ((y - a - c) ** 2).sum()

    return dict(f=f, F=F, x_opt=x_opt, y_opt=y_opt, F_opt=F_opt, a=a, c=c, n=n)


def rel_err(a, b):
    if isinstance(a, (list, tuple)):
        a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return ((a - b).norm() / b.norm()).item()
