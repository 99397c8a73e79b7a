"""Every implicit method against the ridge closed form; error must fall with K and reach 1e-10."""
import pytest
import torch

import hypergrad as hg
from core_problems import rel_err, ridge

KRYLOV = ["cg", "minres", "gmres", "cg_normaleq"]


@pytest.fixture(params=[None, 500], ids=["well", "ill"])
def prob(request):
    p = ridge(cond=request.param)
    if request.param is not None:
        assert 300 < p["cond"] < 800  # the ill-conditioned case really is ~500
    return p


def _err(p, solver, K):
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    r = hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], solver=solver, K=K, tol=0.0,
                         set_grad=False)
    return rel_err(r.grads[0], p["ref"]), r


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "dense"])
def test_krylov_exact_by_dim(prob, solver):
    """Exact by K = dim in exact arithmetic. In floating point, CG and MINRES lose orthogonality on the
    cond-500 log-spaced spectrum (8e-9 and 1e-10 at K = dim, even with an exact operator) and need two
    more iterations; GMRES (modified Gram-Schmidt) and the dense solve are exact at K = dim."""
    d = prob["w_star"].numel()
    last = d + 2 if prob["cond"] > 100 and solver in ("cg", "minres") else d
    errs = [_err(prob, solver, K)[0] for K in (1, d // 2, last)]
    if solver != "dense":
        assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] <= 1e-10, errs


def test_cg_normaleq_converges(prob):
    d = prob["w_star"].numel()
    errs = [_err(prob, "cg_normaleq", K)[0] for K in (1, d // 2, 3 * d)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] <= 1e-10, errs


@pytest.mark.parametrize("solver", ["fixed_point", "neumann"])
def test_fixed_point_and_neumann_converge(solver):
    p = ridge(cond=None)
    errs = [_err(p, solver, K)[0] for K in (5, 20, 80, 400)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 1e-10, errs


def test_neumann_K_equals_fixed_point_K_plus_1():
    p = ridge(cond=500)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    for K in (0, 1, 3, 17):
        a = hg.neumann([p["w_star"]], [p["lam"]], K, gd, p["outer_loss"], tol=0.0, set_grad=False)
        b = hg.fixed_point([p["w_star"]], [p["lam"]], K + 1, gd, p["outer_loss"], tol=0.0, set_grad=False)
        assert torch.allclose(a[0], b[0], rtol=1e-12, atol=1e-14)


def test_hypertorch_named_functions_match_reference():
    p = ridge(cond=None)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    args = ([p["w_star"]], [p["lam"]])
    for fn, K in [(hg.CG, 20), (hg.cg, 20), (hg.minres, 20), (hg.gmres, 20), (hg.CG_normaleq, 60),
                  (hg.cg_normaleq, 60), (hg.fixed_point, 500), (hg.neumann, 500)]:
        g = fn(*args, K, gd, p["outer_loss"], set_grad=False)
        assert isinstance(g, list) and len(g) == 1
        assert rel_err(g[0], p["ref"]) <= 1e-10, fn.__name__


def test_warm_start_needs_next_to_no_iterations():
    p = ridge(cond=500)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    args = ([p["w_star"]], [p["lam"]], gd, p["outer_loss"])
    cold = hg.hypergradient(*args, solver="cg", K=100, tol=0.0, rtol=1e-12, set_grad=False)
    assert cold.converged and cold.iterations >= 8
    warm = hg.hypergradient(*args, solver="cg", K=100, tol=0.0, rtol=1e-12, v0=cold.v, set_grad=False)
    assert warm.converged and warm.iterations <= 1  # one product: the residual of the warm start
    assert rel_err(warm.grads[0], p["ref"]) <= 1e-10


def test_relative_tolerance_stops_early_and_reports():
    p = ridge(cond=500)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    r = hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], solver="cg", K=100, tol=0.0,
                         rtol=1e-3, set_grad=False)
    assert r.converged and 0 < r.residual
    full = hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], solver="cg", K=100, tol=0.0,
                            rtol=1e-14, set_grad=False)
    assert r.iterations < full.iterations
    assert 1e-10 < rel_err(r.grads[0], p["ref"]) < 1e-1


def test_not_converged_is_reported():
    p = ridge(cond=500)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    r = hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], solver="fixed_point", K=3,
                         set_grad=False)
    assert not r.converged and r.iterations == 2 and r.residual > 1e-10


@pytest.mark.parametrize("fn,K", [(hg.CG, 30), (hg.fixed_point, 600)])
def test_stochastic_flag_re_evaluates_the_map(fn, K):
    """stochastic=True re-evaluates fp_map at every product (hypertorch semantics): count the calls,
    and with a deterministic map the result is the same as without the flag."""
    p = ridge(cond=None)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    calls = {"n": 0}

    def counted(params, hparams):
        calls["n"] += 1
        return gd(params, hparams)

    g = fn([p["w_star"]], [p["lam"]], K, counted, p["outer_loss"], tol=1e-13, set_grad=False, stochastic=True)
    assert rel_err(g[0], p["ref"]) <= 1e-10
    assert calls["n"] >= 5  # one evaluation per product, not one per call
    calls["n"] = 0
    fn([p["w_star"]], [p["lam"]], K, counted, p["outer_loss"], tol=1e-13, set_grad=False)
    assert calls["n"] == 1


@pytest.mark.parametrize("solver", ["dense", "cg", "minres", "gmres", "cg_normaleq"])
def test_explicit_operator(solver):
    """operator= replaces the VJPs through Phi in the solve by products with a given matrix."""
    p = ridge(cond=500)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    A = p["step"] * p["A"]  # (I - dPhi/dw)^T for the gradient-descent map, built independently here
    r = hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], solver=solver, K=60, tol=0.0,
                         rtol=1e-13, operator=A, set_grad=False)
    assert rel_err(r.grads[0], p["ref"]) <= 1e-9
    with pytest.raises(ValueError, match=r"operator has shape \(3, 3\)"):
        hg.hypergradient([p["w_star"]], [p["lam"]], gd, p["outer_loss"], operator=torch.eye(3, dtype=A.dtype))
