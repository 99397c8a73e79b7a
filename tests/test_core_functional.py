"""nn.Module parameters as params/hparams through torch.func.functional_call (no `higher`)."""
import pytest
import torch
from torch import nn

import hypergrad as hg
from core_problems import DT, rel_err, ridge


def test_module_params_give_the_ridge_hypergradient():
    p = ridge(cond=None)
    model = nn.Linear(8, 1, bias=False).to(DT)
    before = [t.detach().clone() for t in model.parameters()]
    f = hg.functional(model)
    X, y = p["X"], p["y"]

    def inner(params, hparams):
        w = params[0].reshape(-1)
        return 0.5 * ((f(params, X).squeeze(1) - y) ** 2).sum() + 0.5 * (torch.exp(hparams[0]) * w * w).sum()

    def outer(params, hparams):
        return p["outer_loss"]([params[0].reshape(-1)], hparams)

    params = hg.module_params(model)
    assert params[0].shape == (1, 8) and params[0].requires_grad
    gd = hg.GradientDescent(inner, p["step"])
    for _ in range(2000):  # solve the inner problem with the module's own forward
        params = [t.detach().requires_grad_(True) for t in gd(params, [p["lam"]])]
    assert rel_err(params[0].reshape(-1).detach(), p["w_star"]) <= 1e-10
    g = hg.cg(params, [p["lam"]], 30, gd, outer, set_grad=False)
    assert rel_err(g[0], p["ref"]) <= 1e-9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # model untouched
    hg.load_params(model, params)
    assert rel_err(model.weight.detach().reshape(-1), p["w_star"]) <= 1e-10


def test_param_dict_rejects_wrong_tensors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="2 parameters but 1"):
        hg.param_dict(model, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="'weight' has shape"):
        hg.param_dict(model, [torch.zeros(3, 3), torch.zeros(2)])
