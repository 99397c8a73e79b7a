"""BVFIM: the upper gradient against the Danskin formula evaluated here at the solver's (y, z); the slack;
invariance to a constant added to f; convergence of the outer loop on the quadratic problem."""
import pytest
import torch

import methods
from hypergrad.errors import NonFiniteError
from methods_problems import DT, Vec, mlp_problem, quadratic, quadratic_objectives, rel_err


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


# ---------------------------------------------------------------- the y-step rule: cost and result
def dense_quadratic(n=50, m=10, rho=0.01, seed=0):
    """f = 1/2 y^T A y - y^T B x (A SPD, eigenvalues in [1, 10]), F = 1/2 |y - y_t|^2 + rho/2 |x|^2: the
    barrier's curvature (tau/s) A + (tau/s^2) grad f grad f^T is far above f's, for which the step 0.1 is set."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    A = Q @ torch.diag(torch.linspace(1.0, 10.0, n, dtype=DT)) @ Q.T
    B = torch.randn(n, m, generator=g, dtype=DT) / m ** 0.5
    y_t = torch.randn(n, generator=g, dtype=DT)
    x0 = torch.randn(m, generator=g, dtype=DT)
    return dict(A=A, B=B, y_t=y_t, x0=x0, rho=rho, n=n,
                f=lambda x, y: 0.5 * y @ A @ y - y @ B @ x,
                F=lambda x, y: 0.5 * ((y - y_t) ** 2).sum() + 0.5 * rho * (x @ x))


def barrier_newton(P, x, z, mu1, mu2, theta, tau):
    """The minimizer of psi(y) = F + theta/2 |y|^2 - tau ln(f*_mu - f(x, y)) by Newton's method with the
    gradient and Hessian in closed form (no autograd): grad = (1 + theta) y - y_t + tau grad f / s,
    H = (1 + theta) I + tau A / s + tau grad f grad f^T / s^2, s the slack."""
    A, B, y_t, f = P["A"], P["B"], P["y_t"], P["f"]
    c = f(x, z) + 0.5 * mu1 * (z @ z) + mu2
    y = z.clone()

    def grad(y):
        gf = A @ y - B @ x
        return (1 + theta) * y - y_t + tau * gf / (c - f(x, y)), gf

    for _ in range(60):
        g, gf = grad(y)
        s = c - f(x, y)
        H = (1 + theta) * torch.eye(len(y), dtype=DT) + tau * A / s + tau * torch.outer(gf, gf) / s ** 2
        step, t = torch.linalg.solve(H, g), 1.0
        while c - f(x, y - t * step) <= 0:
            t /= 2
        y = y - t * step
    assert grad(y)[0].norm() <= 1e-12 and c - f(x, y) > 0
    return y


def danskin_closed_form(P, x, y, z, mu1, mu2, tau):
    """grad_x F + tau (grad_x f(x, y) - grad_x f(x, z)) / s = rho x + tau B^T (z - y) / s."""
    s = P["f"](x, z) + 0.5 * mu1 * (z @ z) + mu2 - P["f"](x, y)
    return P["rho"] * x + tau * P["B"].T @ (z - y) / s


def test_y_loop_costs_about_one_evaluation_per_step_on_a_stiff_barrier():
    """Every evaluation of f and F is counted over 10 outer steps (T_z = T_y = 20, steps 0.1, the default
    regularization). The minimum is T_z + T_y + 2 evaluations of f (the z-loop, f(x, z), the y-loop's start
    and one per y-step; the upper gradient reuses their graphs) and T_y + 1 of F. Before: the y-step was
    halved from the full step at every y-step: 88 evaluations of f and 65 of F per outer step here (now 48, 27)."""
    P, T = dense_quadratic(), 20
    count = {"f": 0, "F": 0}

    def ll(state):
        count["f"] += 1
        return P["f"](state["upper_model"](), state["lower_model"]())

    def ul(state):
        count["F"] += 1
        return P["F"](state["upper_model"](), state["lower_model"]())

    um, lm = Vec(P["x0"], "x"), Vec(torch.zeros(P["n"], dtype=DT), "y")
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=T, y_loop=T, z_lr=0.1, y_lr=0.1)
    opt = torch.optim.SGD(um.parameters(), lr=0.1)
    per_f, per_F, total_backtracks = [], [], 0
    for _ in range(10):
        count.update(f=0, F=0)
        opt.zero_grad()
        solver.compute_gradients(None, None, None, None)
        opt.step()
        r = solver.last
        assert r.f_evals == count["f"] == 2 * T + 2 + r.backtracks + r.restarts  # no stall here
        assert r.stalls == 0 and r.slack > 0 and 0 < r.eta <= 1
        per_f.append(count["f"])
        per_F.append(count["F"])
        total_backtracks += r.backtracks
    assert sum(per_f) / len(per_f) <= 2 * T + 2 + T / 2, per_f  # at most one rejected trial every 2nd step
    assert max(per_f) <= 3 * T + 3, per_f
    assert sum(per_F) / len(per_F) <= T + 1 + T / 2, per_F
    assert total_backtracks > 0  # the full step is too long here: the rule is exercised


def test_y_loop_converges_to_the_barrier_minimizer_and_the_gradient_is_danskins():
    """The y-loop's end against Newton's method on the barrier problem (closed-form derivatives), for growing
    T_y: the error falls to rounding level; the upper gradient is Danskin's formula in closed form at the
    returned (y, z) for every T_y, and at the barrier minimizer once the y-loop has converged."""
    P = dense_quadratic()
    x = P["x0"].clone().requires_grad_(True)
    f = lambda y, h: P["f"](h[0], y[0])  # noqa: E731
    F = lambda y, h: P["F"](h[0], y[0])  # noqa: E731
    errors = []
    for T_y in (10, 25, 50, 100):
        r = methods.bvfim_hypergradient([torch.zeros(P["n"], dtype=DT)], [x], f, F, z_loop=20, y_loop=T_y,
                                        z_lr=0.1, y_lr=0.1, set_grad=False)
        y, z = r.params[0], r.z[0]
        y_ref = barrier_newton(P, P["x0"], z, r.mu1, r.mu2, r.theta, r.tau)
        errors.append(((y - y_ref).norm() / y_ref.norm()).item())
        assert rel_err(r.grads[0], danskin_closed_form(P, P["x0"], y, z, r.mu1, r.mu2, r.tau)) <= 1e-12
        assert abs(r.slack - (P["f"](P["x0"], z) + 0.5 * r.mu1 * (z @ z) + r.mu2 - P["f"](P["x0"], y)).item()) \
            <= 1e-12 * r.slack
    assert all(b < 0.05 * a for a, b in zip(errors, errors[1:])), errors  # converging, not stalling
    assert errors[0] > 1e-3 and errors[-1] <= 1e-13, errors  # from far to rounding level
    ref = danskin_closed_form(P, P["x0"], y_ref, z, r.mu1, r.mu2, r.tau)
    assert rel_err(r.grads[0], ref) <= 1e-10


def test_y_loop_with_momentum_restarts_it_where_it_points_uphill():
    """With ll_opt's momentum 0.9 the rule's step points uphill on psi now and then; no shorter step helps
    there, so without a reset of the momentum the y-loop stalled after 31 trials (at a 1e-2 error here)."""
    P = dense_quadratic()
    x = P["x0"].clone().requires_grad_(True)
    f = lambda y, h: P["f"](h[0], y[0])  # noqa: E731
    F = lambda y, h: P["F"](h[0], y[0])  # noqa: E731
    rule = methods.SGDRule([0.1], [0.9], [0.0], [0.0], [False], [False])
    r = methods.bvfim_hypergradient([torch.zeros(P["n"], dtype=DT)], [x], f, F, z_loop=20, y_loop=100,
                                    y_rule=rule, set_grad=False)
    y, z = r.params[0], r.z[0]
    assert r.slack > 0 and r.stalls == 0 and r.momentum_restarts > 0
    assert r.f_evals <= 20 + 2 * 100 + 2  # at most one rejected trial per step on average
    assert rel_err(r.grads[0], danskin_closed_form(P, P["x0"], y, z, r.mu1, r.mu2, r.tau)) <= 1e-12
    y_ref = barrier_newton(P, P["x0"], z, r.mu1, r.mu2, r.theta, r.tau)
    assert ((y - y_ref).norm() / y_ref.norm()).item() <= 1e-3
