"""BVFIM: the upper gradient against the Danskin formula evaluated here at the solver's (y, z); the slack;
invariance to a constant added to f; convergence of the outer loop on the quadratic problem."""
import pytest
import torch

import methods
from hypergrad.errors import NonFiniteError
from methods_problems import Vec, mlp_problem, quadratic, quadratic_objectives, rel_err


def danskin(f, F, x, y, z, mu1, mu2, tau):
    """grad_x F(x, y) + tau (grad_x f(x, y) - grad_x f(x, z)) / (f*_mu - f(x, y)),
    f*_mu = f(x, z) + mu1/2 |z|^2 + mu2: each term by its own autograd call."""
    x = x.detach().requires_grad_(True)
    Fxy = F(x, y)  # F may not depend on x directly (the MLP's validation loss)
    gF = torch.autograd.grad(Fxy, x)[0] if Fxy.requires_grad else torch.zeros_like(x)
    (gfy,) = torch.autograd.grad(f(x, y), x)
    (gfz,) = torch.autograd.grad(f(x, z), x)
    with torch.no_grad():
        slack = f(x, z) + 0.5 * mu1 * sum((w ** 2).sum() for w in z) + mu2 - f(x, y)
    return gF + tau * (gfy - gfz) / slack, slack.item()


def test_upper_gradient_is_the_danskin_formula_quadratic():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=30, y_loop=30, z_lr=0.2, y_lr=0.05)
    solver.compute_gradients(None, None, None, None)
    r = solver.last
    ref, slack = danskin(lambda x, y: p["f"](x, y[0]), lambda x, y: p["F"](x, y[0]), p["x0"], r.params, r.z,
                         0.1, 1.0, 10.0)
    assert rel_err(um.x.grad, ref) <= 1e-12
    assert slack > 0 and abs(r.slack - slack) <= 1e-12 * slack
    assert (r.mu1, r.mu2, r.theta, r.tau) == (0.1, 1.0, 0.01, 10.0)  # the reference's defaults
    # the barrier term matters: the gradient is not grad_x F alone
    x = p["x0"].clone().requires_grad_(True)
    (gF,) = torch.autograd.grad(p["F"](x, r.params[0]), x)
    assert rel_err(gF, ref) > 1e-2


def test_upper_gradient_is_the_danskin_formula_mlp_and_warm_starts():
    m = mlp_problem()
    um, lm = Vec(m["x0"], "w"), m["net"]
    solver = methods.BVFIM(m["ul"], um, m["ll"], 0.05, 0.02, 2.0, ll_model=lm, lower_loop=20, y_loop=20,
                           z_lr=0.5, y_lr=0.1, mu2=0.5, reg_decay=1.5)
    for it in range(3):
        um.w.grad = None
        solver.compute_gradients(m["Xva"], m["tva"], m["Xtr"], m["ttr"])
        r = solver.last
        d = 1.5 ** it
        assert abs(r.tau - 2.0 / d) <= 1e-15 and abs(r.mu2 - 0.5 / d) <= 1e-15
        ref, slack = danskin(m["f"], m["F"], m["x0"], r.params, r.z, r.mu1, r.mu2, r.tau)
        assert rel_err(um.w.grad, ref) <= 1e-12
        assert slack > 0
        assert rel_err([q.detach() for q in lm.parameters()], r.params) == 0  # y written into the model
    assert rel_err(um.w.detach(), m["x0"]) == 0  # upper variables untouched


def test_slack_stays_positive_from_an_infeasible_start_and_restart_is_reported():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(100 * p["y0"], "y")  # f(x, y0) far above f*_mu
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=10, y_loop=10, z_lr=0.2, y_lr=0.5)
    opt = torch.optim.SGD(um.parameters(), lr=0.05)
    for it in range(5):
        opt.zero_grad()
        solver.compute_gradients(None, None, None, None)
        d = solver.diagnostics
        assert d["slack"] > 0
        x, y = um.x.detach(), lm.y.detach()
        assert p["f"](x, y).item() < d["f_star"]
        if it == 0:
            assert d["restarts"] == 1
    assert solver.diagnostics["backtracks"] > 0  # y_lr = 0.5 > 2/L: only backtracking keeps it interior


def test_adding_a_constant_to_f_changes_nothing():
    out = []
    for shift in (0.0, 100.0):
        p = quadratic(shift=shift)
        ll, ul = quadratic_objectives(p)
        um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
        solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=20, y_loop=20, z_lr=0.2, y_lr=0.05)
        solver.compute_gradients(None, None, None, None)
        out.append((um.x.grad.clone(), solver.last.slack, solver.last.params[0], solver.last.z[0]))
    (g0, s0, y0, z0), (g1, s1, y1, z1) = out
    assert rel_err(g1, g0) <= 1e-10
    assert abs(s1 - s0) <= 1e-10 * s0
    assert rel_err(y1, y0) <= 1e-10 and rel_err(z1, z0) <= 1e-10


def test_outer_loop_reaches_the_optimal_upper_value_on_the_quadratic():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    x0 = p["x0"] + 3.0  # far from x_opt
    um, lm = Vec(x0, "x"), Vec(p["y0"], "y")
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=15, y_loop=15, z_lr=0.2, y_lr=0.05,
                           reg_decay=1.05)
    opt = torch.optim.SGD(um.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        solver.compute_gradients(None, None, None, None)
        opt.step()
    x = um.x.detach()
    value = p["F"](x, p["y_star"](x)).item()  # the upper objective at the true lower solution
    F0 = p["F"](x0, p["y_star"](x0)).item()
    assert F0 > 2 * p["F_opt"]  # the start is far from optimal
    assert abs(value - p["F_opt"]) <= 0.05 * p["F_opt"], (value, p["F_opt"])
    assert rel_err(lm.y.detach(), p["y_star"](x)) <= 0.1  # y approaches the lower solution as reg decays


def test_errors():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    for kw, match in [(dict(y_ln_reg=0.0), "y_ln_reg"), (dict(mu2=0.0), "mu2"), (dict(y_loop=0), "y_loop"),
                      (dict(reg_decay=0.5), "reg_decay"), (dict(z_l2_reg=-1.0), "z_l2_reg")]:
        with pytest.raises(ValueError, match=match):
            methods.BVFIM(ul, um, ll, ll_model=lm, **kw)
    with pytest.raises(TypeError):
        methods.BVFIM(ul, um, ll)  # the lower model is required
    bad = methods.BVFIM(lambda s: s["lower_model"]().sum() * float("nan"), um, ll, ll_model=lm, lower_loop=2)
    with pytest.raises(NonFiniteError):
        bad.compute_gradients(None, None, None, None)
    assert um.x.grad is None
    s = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=2, y_loop=2)
    with pytest.raises(ValueError, match="reg_decay"):
        s.compute_gradients(None, None, None, None, reg_decay=-1.0)
