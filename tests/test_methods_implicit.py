"""Implicit (CG / Neumann) against the closed-form implicit hypergradient of the quadratic problem,
grad_x F + B^T A^-1 grad_y F evaluated at the solver's lower iterate, computed in methods_problems."""
import pytest
import torch

import methods
from hypergrad.errors import NonFiniteError
from methods_problems import DT, Vec, mlp_problem, quadratic, quadratic_objectives, rel_err


def losses(p):
    return (lambda y, h: p["f"](h[0], y[0]), lambda y, h: p["F"](h[0], y[0]))


@pytest.mark.parametrize("solver, ks, final_tol", [("cg", [1, 2, 4, 6], 1e-12),
                                                    ("neumann", [5, 20, 80, 200], 1e-9)])
def test_converges_in_k_to_closed_form_at_the_lower_iterate(solver, ks, final_tol):
    p = quadratic()
    f, F = losses(p)
    x = p["x0"].clone().requires_grad_(True)
    errs = []
    for k in ks:
        r = methods.implicit_hypergradient([p["y0"]], [x], f, F, 7, 0.2, solver=solver, K=k, set_grad=False)
        ref = p["implicit_grad"](p["x0"], r.params[0])  # at y_7, which is not y*
        errs.append(rel_err(r.grads[0], ref))
    assert rel_err(r.params[0], p["y_star"](p["x0"])) > 1e-3  # the lower iterate is far from y*
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= final_tol
    assert errs[0] > 1e-3  # k = 1 is not already exact


def test_class_writes_grad_and_reports_solver_diagnostics():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    solver = methods.Implicit(ul, um, ll, lm, 0.2, 50, tolerance=1e-12, lower_loop=7)
    g0 = torch.randn(p["m"], dtype=DT)
    um.x.grad = g0.clone()
    loss = solver.compute_gradients(None, None, None, None)
    y7 = lm.y.detach()  # warm start: the lower model now holds y_7
    assert rel_err(um.x.grad - g0, p["implicit_grad"](p["x0"], y7)) <= 1e-12
    assert abs(loss.item() - p["F"](p["x0"], y7).item()) <= 1e-14
    d = solver.diagnostics
    assert d["converged"] and d["residual"] <= 1e-12 and 1 <= d["iterations"] <= 8 and d["solver"] == "cg"
    assert d["lower_grad_norm"] > 0
    assert torch.equal(um.x.detach(), p["x0"])


def test_no_double_counting_when_the_iterate_came_from_a_tracked_trajectory():
    p = quadratic()
    f, F = losses(p)
    x = p["x0"].clone().requires_grad_(True)
    y = p["y0"].clone()
    for _ in range(6):  # a trajectory tracked w.r.t. x
        if not y.requires_grad:
            y = y.requires_grad_(True)
        (g,) = torch.autograd.grad(p["f"](x, y), y, create_graph=True)
        y = y - 0.2 * g
    assert y.grad_fn is not None
    r = methods.implicit_hypergradient([y], [x], f, F, 0, 0.2, K=20, set_grad=True)
    ref = p["implicit_grad"](p["x0"], y.detach())
    assert rel_err(r.grads[0], ref) <= 1e-12
    assert rel_err(x.grad, ref) <= 1e-12


def test_ll_opt_momentum_drives_the_lower_steps():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    opt = torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.5)
    solver = methods.Implicit(ul, um, ll, lm, 0.2, 50, lower_loop=60, ll_opt=opt)
    solver.compute_gradients(None, None, None, None)
    y = p["y0"].clone()
    buf = None
    for _ in range(60):  # the same heavy-ball steps written here
        g = p["A"] @ y - p["B"] @ p["x0"]
        buf = g if buf is None else 0.5 * buf + g
        y = y - 0.1 * buf
    assert rel_err(lm.y.detach(), y) <= 1e-12
    assert rel_err(um.x.grad, p["implicit_grad"](p["x0"], y)) <= 1e-12


def test_mlp_minres_matches_dense_solve_of_the_hessian_system():
    """30 lower steps on a non-convex net: an indefinite but nonsingular Hessian, so MINRES."""
    m = mlp_problem()
    x = m["x0"].clone().requires_grad_(True)
    r = methods.implicit_hypergradient(m["y0"], [x], lambda y, h: m["f"](h[0], y), lambda y, h: m["F"](h[0], y),
                                       30, 0.5, solver="minres", K=400, tol=1e-13, set_grad=False)
    # reference: grad_x F - (d2f/dx dy) H^-1 grad_y F with dense Hessians by torch.autograd.functional
    shapes = [w.shape for w in r.params]
    sizes = [w.numel() for w in r.params]
    y_flat = torch.cat([w.reshape(-1) for w in r.params])

    def unflat(v):
        return [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)]

    H = torch.autograd.functional.hessian(lambda v: m["f"](m["x0"], unflat(v)), y_flat)
    gy = torch.autograd.functional.jacobian(lambda v: m["F"](m["x0"], unflat(v)), y_flat)
    Jxy = torch.autograd.functional.jacobian(
        lambda xx: torch.autograd.functional.jacobian(lambda v: m["f"](xx, unflat(v)), y_flat, create_graph=True),
        m["x0"])  # (n_y, n_x)
    evals = torch.linalg.eigvalsh(H)
    assert evals.min() < 0 < evals.max() and evals.abs().min() > 1e-5  # indefinite, nonsingular
    ref = -Jxy.T @ torch.linalg.solve(H, gy)
    assert rel_err(r.grads[0], ref) <= 1e-9


def test_errors():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    with pytest.raises(ValueError, match="solver"):
        methods.Implicit(ul, um, ll, lm, 0.2, 10, solver="lu")
    with pytest.raises(ValueError, match="ll_learning_rate"):
        methods.Implicit(ul, um, ll, lm, 0.0, 10)
    with pytest.raises(ValueError, match="k"):
        methods.Implicit(ul, um, ll, lm, 0.1, -1)
    bad = methods.Implicit(lambda s: s["lower_model"]().sum() * float("nan"), um, ll, lm, 0.1, 10, lower_loop=2)
    with pytest.raises(NonFiniteError):
        bad.compute_gradients(None, None, None, None)
    assert um.x.grad is None
