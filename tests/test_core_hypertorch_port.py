"""hypertorch code runs unchanged: its call patterns (positional and keyword), data_or_iter, momentum
maps with get_opt_params, truncated reverse over a stored history, and its utility functions."""
import itertools

import pytest
import torch

import hypergrad as hg
from hypergrad.hypergradients import get_outer_gradients, update_tensor_grads  # hypertorch's module path
from hypergrad.diff_optimizers import GradientDescent as GD2  # older hypertorch module name
from core_problems import rel_err, ridge


def test_hypertorch_call_patterns():
    p = ridge()
    X, y = p["X"], p["y"]

    def loss_with_data(params, hparams, data):  # hypertorch's loss_f(params, hparams, data)
        Xb, yb = data
        w = params[0]
        return 0.5 * ((Xb @ w - yb) ** 2).sum() + 0.5 * (torch.exp(hparams[0]) * w * w).sum()

    inner_opt = hg.GradientDescent(loss_with_data, p["step"], data_or_iter=(X, y))
    inner_it = GD2(loss_with_data, p["step"], data_or_iter=itertools.repeat((X, y)))
    params = [torch.zeros(8, dtype=torch.float64, requires_grad=True)]
    history = [params]
    for _ in range(3000):
        params = inner_opt(params, [p["lam"]])
        params = [w.detach().requires_grad_(True) for w in params]
        history.append(params)
    hparams = [p["lam"]]
    g1 = hg.CG(params, hparams, K=20, fp_map=inner_it, outer_loss=p["outer_loss"], tol=1e-10, set_grad=False)
    g2 = hg.fixed_point(params, hparams, 500, inner_opt, p["outer_loss"], 1e-12, False)  # all positional
    g3 = hg.neumann(params, hparams, 500, inner_opt, p["outer_loss"], set_grad=False)
    g4 = hg.CG_normaleq(params, hparams, 60, inner_opt, p["outer_loss"], set_grad=False)
    for g in (g1, g2, g3, g4):
        assert rel_err(g[0], p["ref"]) <= 1e-9
    T = 500  # truncated reverse over the last T stored iterates approaches the implicit hypergradient
    g5 = hg.reverse(history[-T - 1:], hparams, [inner_opt] * T, p["outer_loss"], set_grad=False)
    assert rel_err(g5[0], p["ref"]) <= 1e-6
    p["lam"].grad = None
    hg.CG(params, hparams, 20, inner_opt, p["outer_loss"])  # set_grad=True by default, as in hypertorch
    assert rel_err(p["lam"].grad, p["ref"]) <= 1e-9
    p["lam"].grad = None


def test_heavy_ball_get_opt_params_and_utilities():
    p = ridge()
    hb = hg.HeavyBall(p["inner_loss"], p["step"], lambda hparams: 0.5)  # momentum as a callable of hparams
    params = hb.get_opt_params([torch.zeros(8, dtype=torch.float64, requires_grad=True)])
    assert len(params) == 2
    for _ in range(600):
        params = [w.detach().requires_grad_(True) for w in hb(params, [p["lam"]])]
    assert rel_err(params[0].detach(), p["w_star"]) <= 1e-10
    g = hg.gmres(params, [p["lam"]], 40, hb, p["outer_loss"], set_grad=False)
    assert rel_err(g[0], p["ref"]) <= 1e-9
    loss = p["outer_loss"]([params[0]], [p["lam"]])
    gw, gh = get_outer_gradients(loss, [params[0]], [p["lam"]])
    assert torch.equal(gh[0], torch.zeros(8, dtype=torch.float64))  # the outer loss ignores lambda
    h = torch.zeros(3, requires_grad=True)
    update_tensor_grads([h], [torch.ones(3)])
    update_tensor_grads([h], [torch.ones(3)])
    assert torch.equal(h.grad, 2 * torch.ones(3))


def test_update_tensor_grads_skips_none_as_hypertorch_does():
    """hypertorch's update_tensor_grads leaves a zero .grad for a None gradient (an hparam without one)."""
    a, b = torch.zeros(2, requires_grad=True), torch.ones(3, requires_grad=True)
    b.grad = torch.full((3,), 5.0)
    update_tensor_grads([a, b], [None, None])
    assert torch.equal(a.grad, torch.zeros(2)) and torch.equal(b.grad, torch.full((3,), 5.0))
    update_tensor_grads([a, b], [torch.ones(2), None])
    assert torch.equal(a.grad, torch.ones(2)) and torch.equal(b.grad, torch.full((3,), 5.0))


@pytest.mark.parametrize("solver", ["fixed_point", "CG", "neumann", "CG_normaleq"])
def test_zero_outer_gradient_gives_the_exact_answer_without_a_tolerance_warning(solver):
    """dE/dw = 0 exactly (E = ||w||^2 / 2 at w = 0): the zero adjoint is exact at any tol, so no warning."""
    import warnings
    X = torch.eye(3, dtype=torch.float64)
    fp_map = hg.GradientDescent(lambda p, h: 0.5 * ((X @ p[0]) ** 2).sum() + 0.5 * (h[0] * p[0] ** 2).sum(), 0.1)
    w = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    lam = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = getattr(hg, solver)(w, [lam], 10, fp_map, lambda p, h: 0.5 * (p[0] ** 2).sum(), set_grad=False)
    assert torch.equal(g[0], torch.zeros(3, dtype=torch.float64))
