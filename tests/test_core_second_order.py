"""create_graph=True: the hypergradient differentiated again is the true Hessian of
f(lambda, mu) = E(w*(lambda), mu), against the closed form w*(lambda) = (X^T X + diag e^lambda)^-1 X^T y
differentiated by plain autograd through torch.linalg.solve (written in the test)."""
import pytest
import torch

import hypergrad as hg
from core_problems import DT, rel_err, ridge


def _f(p, Xv, yv):
    """f(lambda, mu) in closed form (the reference)."""
    X, y = p["X"], p["y"]

    def f(lam, mu):
        w = torch.linalg.solve(X.T @ X + torch.diag(torch.exp(lam)), X.T @ y)
        return 0.5 * ((Xv @ w - yv) ** 2).sum() + 0.5 * ((mu * w) ** 2).sum()
    return f


def _case(seed=5):
    p = ridge(cond=None, seed=seed)
    gen = torch.Generator().manual_seed(2)
    Xv, yv = torch.randn(30, 8, generator=gen, dtype=DT), torch.randn(30, generator=gen, dtype=DT)
    mu = torch.full((8,), 0.5, dtype=DT, requires_grad=True)

    def outer(params, hparams):
        w = params[0]
        return 0.5 * ((Xv @ w - yv) ** 2).sum() + 0.5 * ((hparams[1] * w) ** 2).sum()
    return p, mu, outer, _f(p, Xv, yv)


@pytest.mark.parametrize("solver,K", [("dense", 0), ("cg", 60), ("minres", 60), ("gmres", 60),
                                      ("cg_normaleq", 200), ("fixed_point", 3000)])
def test_second_order_is_the_true_hessian(solver, K):
    p, mu, outer, f = _case()
    lam = p["lam"]
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    r = hg.hypergradient([p["w_star"]], [lam, mu], gd, outer, solver=solver, K=K, create_graph=True,
                         set_grad=False, **({} if solver in ("dense", "fixed_point") else {"rtol": 1e-12}))
    ours = torch.cat(r.grads)
    ref_g = torch.cat(torch.func.grad(f, argnums=(0, 1))(lam.detach(), mu.detach()))
    tol = 1e-7 if solver == "fixed_point" else 1e-9
    assert rel_err(ours.detach(), ref_g) <= tol
    H = torch.stack([torch.cat(torch.autograd.grad(ours[i], [lam, mu], retain_graph=True)) for i in range(16)])
    Hl, Hm = torch.func.hessian(f, argnums=(0, 1))(lam.detach(), mu.detach())
    H_ref = torch.cat([torch.cat(Hl, 1), torch.cat(Hm, 1)], 0)
    assert rel_err(H, H_ref) <= 10 * tol
    assert (H - H.T).norm() <= 10 * tol * H.norm()


def test_second_order_is_not_the_fixed_w_formula():
    """The old semantics, the formula differentiated with w held at w*, is percents off the true Hessian
    here, so the test above tells them apart."""
    p, mu, outer, f = _case()
    X, w, s, lam = p["X"], p["w_star"], p["step"], p["lam"]
    Xv_w = torch.func.grad(lambda w_: outer([w_], [lam.detach(), mu.detach()]))(w)
    fixed = -s * torch.exp(lam) * w * torch.linalg.solve(s * (X.T @ X + torch.diag(torch.exp(lam))), Xv_w)
    H_fixed = torch.stack([torch.autograd.grad(fixed[i], lam, retain_graph=True)[0] for i in range(8)])
    H_true = torch.func.hessian(f, argnums=0)(lam.detach(), mu.detach())
    assert rel_err(H_fixed, H_true) > 1e-2


def test_first_order_result_carries_no_graph():
    p = ridge()
    r = hg.hypergradient([p["w_star"]], [p["lam"]], hg.GradientDescent(p["inner_loss"], p["step"]),
                         p["outer_loss"], set_grad=False)
    assert not r.grads[0].requires_grad and not r.v[0].requires_grad
