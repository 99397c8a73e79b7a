"""Dynamic (RAD, T-RAD, BDA, IAPTT-GM) against autograd through the same steps written plainly here."""
import pytest
import torch
from torch import nn

import methods
from hypergrad.errors import NonFiniteError
from methods_problems import DT, Vec, mlp_problem, quadratic, quadratic_objectives, rel_err


# ---------------------------------------------------------------- plain references (no methods/ code)
def plain_unroll(f, F, x, y0, T, lr, K=0, alpha_t=None, momentum=0.0, nesterov=False, wd=0.0):
    """T SGD steps on lists of tensors; the first K without any graph; returns the iterates y_1..y_T."""
    y, buf, out = list(y0), None, []
    for t in range(T):
        tracked = t >= K
        if not tracked:
            y = [w.detach().requires_grad_(True) for w in y]
        elif not y[0].requires_grad:
            y = [w.detach().requires_grad_(True) for w in y]
        xx = x if tracked else x.detach()
        loss = f(xx, y) if alpha_t is None else (1 - alpha_t(t)) * f(xx, y) + alpha_t(t) * F(xx, y)
        g = list(torch.autograd.grad(loss, y, create_graph=tracked))
        g = [gi + wd * w for gi, w in zip(g, y)]
        if momentum:
            buf = g if buf is None else [momentum * b + gi for b, gi in zip(buf, g)]
            d = [gi + momentum * b for gi, b in zip(g, buf)] if nesterov else buf
        else:
            d = g
        y = [w - lr * di for w, di in zip(y, d)]
        if not tracked:
            y = [w.detach() for w in y]
            buf = None if buf is None else [b.detach() for b in buf]
        out.append(y)
    return out


def quad_setup(T=15, lr=0.2, **kw):
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    solver = methods.Dynamic(ll, T, um, ul, lm, lr=lr, **kw)
    f = lambda x, y: p["f"](x, y[0])  # noqa: E731
    F = lambda x, y: p["F"](x, y[0])  # noqa: E731
    return p, um, lm, solver, f, F, [p["y0"]]


def mlp_setup(T=12, lr=0.5, **kw):
    m = mlp_problem()
    um = Vec(m["x0"], "w")
    lm = m["net"]
    solver = methods.Dynamic(m["ll"], T, um, m["ul"], lm, lr=lr, **kw)
    return m, um, lm, solver


def call_mlp(m, solver):
    return solver.compute_gradients(m["Xva"], m["tva"], m["Xtr"], m["ttr"])


# ---------------------------------------------------------------- RAD
@pytest.mark.parametrize("T", [1, 15])
def test_rad_equals_plain_autograd_quadratic(T):
    p, um, lm, solver, f, F, y0 = quad_setup(T=T)
    loss = solver.compute_gradients(None, None, None, None)
    x = p["x0"].clone().requires_grad_(True)
    yT = plain_unroll(f, F, x, y0, T, 0.2)[-1]
    (ref,) = torch.autograd.grad(F(x, yT), x)
    assert rel_err(um.x.grad, ref) <= 1e-12
    assert abs(loss.item() - F(x, yT).item()) <= 1e-12 * abs(loss.item())
    assert torch.equal(um.x.detach(), p["x0"])  # upper variables untouched, only .grad
    assert torch.allclose(lm.y.detach(), yT[0].detach(), rtol=0, atol=1e-14)  # warm start: y_T written


def test_rad_equals_plain_autograd_mlp():
    m, um, lm, solver = mlp_setup()
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    yT = plain_unroll(m["f"], m["F"], x, m["y0"], 12, 0.5)[-1]
    (ref,) = torch.autograd.grad(m["F"](x, yT), x)
    assert rel_err(um.w.grad, ref) <= 1e-12
    assert solver.diagnostics["k_star"] == 12 and solver.diagnostics["lower_grad_norm"] > 0


def test_sgd_rule_of_ll_opt_is_followed_differentiably():
    m = mlp_problem()
    um, lm = Vec(m["x0"], "w"), m["net"]
    opt = torch.optim.SGD(lm.parameters(), lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.01)
    before = [q.detach().clone() for q in lm.parameters()]
    solver = methods.Dynamic(m["ll"], 10, um, m["ul"], lm, ll_opt=opt)
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    yT = plain_unroll(m["f"], m["F"], x, m["y0"], 10, 0.3, momentum=0.8, nesterov=True, wd=0.01)[-1]
    (ref,) = torch.autograd.grad(m["F"](x, yT), x)
    assert rel_err(um.w.grad, ref) <= 1e-12
    assert not opt.state  # the optimizer itself was never stepped
    assert rel_err([q.detach() for q in lm.parameters()], [w.detach() for w in yT]) <= 1e-13
    assert rel_err(before, m["y0"]) == 0


# ---------------------------------------------------------------- T-RAD
@pytest.mark.parametrize("K", [1, 8, 14])
def test_trad_equals_autograd_with_first_K_steps_detached(K):
    p, um, lm, solver, f, F, y0 = quad_setup(T=15, truncate_iters=K)
    g0 = torch.randn(p["m"], dtype=DT)
    um.x.grad = g0.clone()  # accumulation: the warm-up must add nothing to what is there
    solver.compute_gradients(None, None, None, None)
    x = p["x0"].clone().requires_grad_(True)
    yT = plain_unroll(f, F, x, y0, 15, 0.2, K=K)[-1]
    (ref,) = torch.autograd.grad(F(x, yT), x)
    assert rel_err(um.x.grad - g0, ref) <= 1e-12
    (full,) = torch.autograd.grad(F(x, plain_unroll(f, F, x, y0, 15, 0.2)[-1]), x)
    assert rel_err(ref, full) > 1e-6  # truncation really changes the gradient here
    assert solver.diagnostics["steps"] == 15 - K
    # the warm-up steps are real steps: y_T is the full trajectory's end point
    assert rel_err(lm.y.detach(), yT[0].detach()) <= 1e-13


def test_trad_mlp():
    m, um, lm, solver = mlp_setup(T=12, truncate_iters=5)
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    yT = plain_unroll(m["f"], m["F"], x, m["y0"], 12, 0.5, K=5)[-1]
    (ref,) = torch.autograd.grad(m["F"](x, yT), x)
    assert rel_err(um.w.grad, ref) <= 1e-12


# ---------------------------------------------------------------- BDA
def test_bda_alpha_zero_is_rad_exactly():
    m, um, lm, rad = mlp_setup()
    call_mlp(m, rad)
    m2, um2, lm2, bda = mlp_setup(alpha=0.0)
    call_mlp(m2, bda)
    assert torch.equal(um.w.grad, um2.w.grad)
    assert all(torch.equal(a, b) for a, b in zip(lm.parameters(), lm2.parameters()))


def test_bda_equals_plain_aggregated_unroll():
    m, um, lm, solver = mlp_setup(alpha=0.6)
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    yT = plain_unroll(m["f"], m["F"], x, m["y0"], 12, 0.5, alpha_t=lambda t: 0.6 / (t + 1))[-1]
    (ref,) = torch.autograd.grad(m["F"](x, yT), x)
    assert rel_err(um.w.grad, ref) <= 1e-12
    x2 = m["x0"].clone().requires_grad_(True)
    (rad,) = torch.autograd.grad(m["F"](x2, plain_unroll(m["f"], m["F"], x2, m["y0"], 12, 0.5)[-1]), x2)
    assert rel_err(ref, rad) > 1e-3  # the aggregation matters


# ---------------------------------------------------------------- IAPTT-GM
def _ptt_reference(m, x, y0):
    ys = plain_unroll(m["f"], m["F"], x, y0, 12, 0.5)
    values = torch.stack([m["F"](x, yk).detach() for yk in ys])
    k = int(torch.argmax(values))
    return k + 1, m["F"](x, ys[k])


def test_ptt_differentiates_through_argmax_iterate():
    m, um, lm, solver = mlp_setup(acquire_max_loss=True)
    loss = call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    k_star, F_k = _ptt_reference(m, x, m["y0"])
    assert 1 < k_star < 12  # an interior maximum, so the test tells PTT from RAD
    assert solver.diagnostics["k_star"] == k_star
    (ref,) = torch.autograd.grad(F_k, x)
    assert rel_err(um.w.grad, ref) <= 1e-12
    assert abs(loss.item() - F_k.item()) <= 1e-13


def test_initialization_auxiliary_moves_y0_by_gradient_through_chosen_iterate():
    m, um, lm, solver = mlp_setup(acquire_max_loss=True, init_aux=True)
    opt = torch.optim.SGD(list(um.parameters()) + list(lm.parameters()), lr=0.1)
    opt.zero_grad()
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    y0 = [w.clone().requires_grad_(True) for w in m["y0"]]
    _, F_k = _ptt_reference(m, x, y0)
    refs = torch.autograd.grad(F_k, [x] + y0)
    assert rel_err(um.w.grad, refs[0]) <= 1e-12
    assert rel_err([q.grad for q in lm.parameters()], list(refs[1:])) <= 1e-12
    assert rel_err([q.detach() for q in lm.parameters()], m["y0"]) == 0  # y_0 not overwritten by y_T
    opt.step()
    moved = [w - 0.1 * g for w, g in zip(m["y0"], refs[1:])]
    assert rel_err([q.detach() for q in lm.parameters()], moved) <= 1e-14


def test_initialization_auxiliary_with_rad():
    m, um, lm, solver = mlp_setup(init_aux=True)
    call_mlp(m, solver)
    x = m["x0"].clone().requires_grad_(True)
    y0 = [w.clone().requires_grad_(True) for w in m["y0"]]
    refs = torch.autograd.grad(m["F"](x, plain_unroll(m["f"], m["F"], x, y0, 12, 0.5)[-1]), [x] + y0)
    assert rel_err([um.w.grad] + [q.grad for q in lm.parameters()], list(refs)) <= 1e-12


# ---------------------------------------------------------------- errors and contracts
@pytest.mark.parametrize("kw, match", [
    (dict(truncate_iters=3, acquire_max_loss=True), "exclusive"),
    (dict(truncate_iters=15), "truncate_iters"),
    (dict(truncate_iters=-1), "truncate_iters"),
    (dict(alpha=1.5), "alpha"),
    (dict(truncate_iters=2, init_aux=True), "init_aux"),
    (dict(init_aux=True, warm_start=True), "exclusive"),
    (dict(lr=-1.0), "lr"),
])
def test_invalid_combinations_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        quad_setup(**kw)


def test_unsupported_ll_opt_and_foreign_ll_opt():
    p = quadratic()
    ll, ul = quadratic_objectives(p)
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    with pytest.raises(TypeError, match="SGD"):
        methods.Dynamic(ll, 5, um, ul, lm, ll_opt=torch.optim.Adam(lm.parameters()))
    with pytest.raises(ValueError, match="ll_opt"):
        methods.Dynamic(ll, 5, um, ul, lm, ll_opt=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))


def test_nan_raises_and_leaves_grad_untouched():
    p, um, lm, solver, f, F, y0 = quad_setup(T=10, lr=2.0)  # lr * L = 8: the lower loop blows up
    with torch.no_grad():
        lm.y.mul_(1e300)
    with pytest.raises(NonFiniteError, match="lower"):
        solver.compute_gradients(None, None, None, None)
    assert um.x.grad is None


def test_non_scalar_objective_is_a_clear_error():
    p = quadratic()
    um, lm = Vec(p["x0"], "x"), Vec(p["y0"], "y")
    solver = methods.Dynamic(lambda s: s["lower_model"]() ** 2, 3, um, lambda s: s["lower_model"]().sum(), lm)
    with pytest.raises(ValueError, match="scalar"):
        solver.compute_gradients(None, None, None, None)


def test_functional_api_does_not_touch_caller_tensors():
    p = quadratic()
    x = p["x0"].clone().requires_grad_(True)
    y0 = p["y0"].clone()
    r = methods.dynamic_hypergradient([y0], [x], lambda y, h: p["f"](h[0], y[0]),
                                      lambda y, h: p["F"](h[0], y[0]), 5, 0.2, set_grad=False)
    assert x.grad is None and torch.equal(y0, p["y0"]) and not y0.requires_grad
    assert not r.params[0].requires_grad
