"""The BVFIM paper's non-convex toy (F = |x - a|^2 + |y - a - c|^2, f = sum_i sin(x + y_i - c_i)), optimum in
closed form (methods_problems.toy). The paper claims BVFIM reaches the optimum from starts where RAD and
CG stall. What we measured and test here: from (x0, y0) = (4, 4) BVFIM reaches x* while RAD and Implicit
stall at a stationary point of another lower-solution branch; from (0, 0) all three stall (BVFIM too)."""
import torch

import methods
from methods_problems import DT, Vec, toy

P = toy(n=2, a=2.0)


def run(method, x0, y0, iters=40, T=10):
    um, lm = Vec(torch.tensor([x0], dtype=DT), "x"), Vec(torch.full((2,), y0, dtype=DT), "y")
    ll = lambda s: P["f"](s["upper_model"](), s["lower_model"]())  # noqa: E731
    ul = lambda s: P["F"](s["upper_model"](), s["lower_model"]())  # noqa: E731
    if method == "RAD":
        solver = methods.Dynamic(ll, T, um, ul, lm, lr=0.5)
    elif method == "Implicit":
        solver = methods.Implicit(ul, um, ll, lm, 0.5, T, lower_loop=T)
    else:
        solver = methods.BVFIM(ul, um, ll, 0.1, 0.01, 1.0, ll_model=lm, lower_loop=T, y_loop=T, z_lr=0.5,
                               y_lr=0.05, mu2=1.0, reg_decay=1.01)
    opt = torch.optim.Adam(um.parameters(), lr=0.05)
    for _ in range(iters):
        opt.zero_grad()
        solver.compute_gradients(None, None, None, None)
        opt.step()
        if method == "BVFIM":
            assert solver.diagnostics["slack"] > 0
    return um.x.item(), lm.y.detach()


def test_closed_form_optimum_is_a_bilevel_solution():
    x = torch.tensor(P["x_opt"], dtype=DT, requires_grad=True)
    y = P["y_opt"]
    assert abs(P["f"](x, y).item() + 2) <= 1e-12  # y is a global lower minimizer (sin = -1 everywhere)
    (g,) = torch.autograd.grad(P["F"](x, y), x)  # stationary along the branch y(x) = c - x - pi/2 + 2k pi
    (gb,) = torch.autograd.grad(P["F"](x, P["c"] - x - torch.pi / 2 + 2 * torch.pi), x)
    assert abs(gb.item()) <= 1e-12 and abs(P["F"](x, y).item() - P["F_opt"]) <= 1e-12


def test_from_4_4_bvfim_reaches_the_optimum_where_rad_and_implicit_stall():
    xb, yb = run("BVFIM", 4.0, 4.0)
    assert abs(xb - P["x_opt"]) < 0.3
    for method in ("RAD", "Implicit"):
        x, y = run(method, 4.0, 4.0)
        assert abs(x - P["x_opt"]) > 1.5  # stalled on another branch of lower solutions
        assert abs(P["f"](torch.tensor(x, dtype=DT), y).item() + 2) < 1e-3  # ... with y lower-optimal


def test_from_0_0_all_three_stall():
    """Not the paper's claim: from (0, 0) BVFIM is attracted to the same wrong branch as RAD and CG."""
    for method in ("BVFIM", "RAD", "Implicit"):
        x, _ = run(method, 0.0, 0.0)
        assert abs(x - P["x_opt"]) > 3.0, method
