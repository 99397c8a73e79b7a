"""Bad input gets an early error that names the problem; inputs are never modified; set_grad accumulates."""
import pytest
import torch

import hypergrad as hg
from core_problems import DT, rel_err, ridge


@pytest.fixture
def p():
    return ridge()


def _call(p, **kw):
    args = dict(params=[p["w_star"]], hparams=[p["lam"]], fp_map=hg.GradientDescent(p["inner_loss"], p["step"]),
                outer_loss=p["outer_loss"], set_grad=False)
    args.update(kw)
    return hg.hypergradient(**args)


def test_hparam_without_requires_grad(p):
    with pytest.raises(ValueError, match=r"hparams\[0\].*requires_grad"):
        _call(p, hparams=[p["lam"].detach()])
    with pytest.raises(ValueError, match="requires_grad"):
        hg.CG([p["w_star"]], [p["lam"].detach()], 10, hg.GradientDescent(p["inner_loss"], 0.1), p["outer_loss"])


def test_fp_map_wrong_number_of_tensors(p):
    with pytest.raises(ValueError, match=r"fp_map.*2 tensors.*params has 1"):
        _call(p, fp_map=lambda w, h: [w[0], w[0]])


def test_fp_map_wrong_shape(p):
    with pytest.raises(ValueError, match=r"fp_map.*shape \(4,\).*shape \(8,\)"):
        _call(p, fp_map=lambda w, h: [w[0][:4]])


def test_fp_map_returns_a_tensor_not_a_list(p):
    with pytest.raises(TypeError, match="list of tensors"):
        _call(p, fp_map=lambda w, h: w[0])


def test_non_scalar_outer_loss(p):
    with pytest.raises(ValueError, match="scalar"):
        _call(p, outer_loss=lambda w, h: w[0] * 2)


def test_dtype_mismatch(p):
    with pytest.raises(TypeError, match="dtype mismatch"):
        _call(p, params=[p["w_star"].float()])


def test_device_mismatch(p):
    with pytest.raises(ValueError, match="device mismatch"):
        _call(p, params=[torch.empty(8, dtype=DT, device="meta")])


def test_non_float_hparam():
    with pytest.raises(TypeError, match="floating"):
        hg.hypergradient([torch.ones(2, dtype=DT)], [torch.ones(2, dtype=torch.int64)], lambda w, h: w,
                         lambda w, h: w[0].sum())


def test_nan_outer_loss(p):
    with pytest.raises(hg.NonFiniteError, match="outer_loss"):
        _call(p, outer_loss=lambda w, h: w[0].sum() * float("nan"))


def test_unknown_solver_and_bad_K(p):
    with pytest.raises(ValueError, match="unknown solver"):
        _call(p, solver="lu")
    with pytest.raises(ValueError, match="K must be"):
        _call(p, K=-1)


def test_bad_warm_start_shape(p):
    with pytest.raises(ValueError, match=r"v0.*shape"):
        _call(p, v0=[torch.zeros(3, dtype=DT)])


def test_params_not_a_list(p):
    with pytest.raises(TypeError, match="params must be a list"):
        _call(p, params=5)


def test_inputs_are_never_modified(p):
    w, lam = p["w_star"].clone(), p["lam"]
    lam_before = lam.detach().clone()
    v0 = [torch.ones(8, dtype=DT)]
    v0_before = v0[0].clone()
    for solver in ["cg", "minres", "gmres", "dense", "fixed_point", "neumann", "cg_normaleq"]:
        _call(p, params=[w], solver=solver, v0=v0, K=5)
    assert torch.equal(w, p["w_star"]) and not w.requires_grad and w.grad is None
    assert torch.equal(lam.detach(), lam_before) and lam.grad is None  # set_grad=False leaves .grad alone
    assert torch.equal(v0[0], v0_before)


def test_set_grad_accumulates(p):
    lam = p["lam"]
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    lam.grad = None
    g1 = hg.cg([p["w_star"]], [lam], 30, gd, p["outer_loss"])
    assert torch.allclose(lam.grad, g1[0])
    hg.cg([p["w_star"]], [lam], 30, gd, p["outer_loss"])
    assert torch.allclose(lam.grad, 2 * g1[0], rtol=1e-14)
    assert rel_err(g1[0], p["ref"]) <= 1e-10
    lam.grad = None


def test_unused_hparam_gets_zero_not_none(p):
    extra = torch.ones(3, dtype=DT, requires_grad=True)
    r = _call(p, hparams=[p["lam"], extra])
    assert torch.equal(r.grads[1], torch.zeros(3, dtype=DT))
    assert rel_err(r.grads[0], p["ref"]) <= 1e-10
