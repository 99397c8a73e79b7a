"""create_graph=True: the hypergradient differentiated again w.r.t. hparams, against autograd through
the same formula with a dense solve written in the test."""
import pytest
import torch

import hypergrad as hg
from core_problems import DT, rel_err, ridge


def _formula(p, lam, mu):
    """g(lam, mu) = dE/d(lam, mu) + (dPhi/d(lam, mu))^T (I - dPhi/dw)^-T dE/dw at fixed w = w*,
    for Phi = w - s (X^T (X w - y) + e^lam w) and E = 1/2 ||Xv w - yv||^2 + 1/2 ||mu * w||^2."""
    X, w, s = p["X"], p["w_star"], p["step"]
    A = s * (X.T @ X + torch.diag(torch.exp(lam)))  # I - dPhi/dw
    gw = p["Xv"].T @ (p["Xv"] @ w - p["yv"]) + mu ** 2 * w
    v = torch.linalg.solve(A.T, gw)
    g_lam = -s * torch.exp(lam) * w * v
    g_mu = mu * w ** 2
    return torch.cat([g_lam, g_mu])


@pytest.mark.parametrize("solver,K", [("dense", 0), ("cg", 60), ("minres", 60), ("gmres", 60)])
def test_second_order_matches_autograd_through_dense_formula(solver, K):
    p = ridge(cond=None, seed=5)
    gen = torch.Generator().manual_seed(2)
    p["Xv"], p["yv"] = torch.randn(30, 8, generator=gen, dtype=DT), torch.randn(30, generator=gen, dtype=DT)
    lam = p["lam"]
    mu = torch.full((8,), 0.5, dtype=DT, requires_grad=True)

    def outer(params, hparams):
        w = params[0]
        return 0.5 * ((p["Xv"] @ w - p["yv"]) ** 2).sum() + 0.5 * ((hparams[1] * w) ** 2).sum()

    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    r = hg.hypergradient([p["w_star"]], [lam, mu], gd, outer, solver=solver, K=K, tol=0.0, create_graph=True,
                         set_grad=False)
    ours = torch.cat(r.grads)
    ref = _formula(p, lam, mu)
    assert rel_err(ours.detach(), ref.detach()) <= 1e-10
    u = torch.randn(16, generator=gen, dtype=DT)
    h_ours = torch.autograd.grad(ours @ u, [lam, mu])
    h_ref = torch.autograd.grad(ref @ u, [lam, mu])
    for a, b in zip(h_ours, h_ref):
        assert rel_err(a, b) <= 1e-9


def test_first_order_result_carries_no_graph():
    p = ridge()
    r = hg.hypergradient([p["w_star"]], [p["lam"]], hg.GradientDescent(p["inner_loss"], p["step"]),
                         p["outer_loss"], set_grad=False)
    assert not r.grads[0].requires_grad and not r.v[0].requires_grad
