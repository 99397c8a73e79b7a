"""Non-symmetric maps (GMRES), indefinite maps (MINRES vs CG breakdown), CG's early exit, divergence."""
import pytest
import torch

import hypergrad as hg
from core_problems import DT, rel_err, ridge


@pytest.mark.parametrize("opt_cls", [hg.HeavyBall, hg.Momentum])
def test_momentum_maps_solved_by_gmres(opt_cls):
    """HeavyBall/Momentum have the ridge solution as fixed point; their Jacobian is non-symmetric."""
    p = ridge(cond=None)
    opt = opt_cls(p["inner_loss"], p["step"], 0.5)
    w = p["w_star"]
    aux = w if opt_cls is hg.HeavyBall else torch.zeros_like(w)  # the fixed point's auxiliary state
    params = [w, aux]
    J = torch.autograd.functional.jacobian(lambda a, b: torch.cat(opt([a, b], [p["lam"]])), (w, aux))
    J = torch.cat(J, dim=1)
    assert (J - J.T).abs().max() > 1e-3  # really non-symmetric
    errs = [rel_err(hg.hypergradient(params, [p["lam"]], opt, p["outer_loss"], solver="gmres", K=K, tol=0.0,
                                     set_grad=False).grads[0], p["ref"]) for K in (2, 8, 16)]
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-10, errs
    g = hg.gmres(params, [p["lam"]], 40, opt, p["outer_loss"], set_grad=False)
    assert rel_err(g[0], p["ref"]) <= 1e-10


def _linear_map(M):
    """Phi(w, lam) = w - (M w - lam): fixed point w* = M^-1 lam, I - dPhi/dw = M."""
    return lambda params, hparams: [params[0] - (M @ params[0] - hparams[0])]


def test_indefinite_symmetric_cg_breaks_down_minres_exact():
    M = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)  # symmetric, indefinite, nonsingular
    lam = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([1.0, 1.0], dtype=DT)
    w_star = torch.linalg.solve(M, lam.detach())  # (2, 1): dE/dw = (1, 0) and p^T M p = 0 at once
    outer = lambda params, hparams: 0.5 * ((params[0] - t) ** 2).sum()
    ref = torch.linalg.solve(M.T, w_star - t)  # dE/dlam = M^-T (w* - t)
    with pytest.raises(hg.BreakdownError, match="minres"):
        hg.cg([w_star], [lam], 10, _linear_map(M), outer, set_grad=False)
    g = hg.minres([w_star], [lam], 2, _linear_map(M), outer, set_grad=False)
    assert rel_err(g[0], ref) <= 1e-14


def test_random_indefinite_minres_exact_by_dim_and_cg_never_nan():
    gen = torch.Generator().manual_seed(3)
    n = 12
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = torch.cat([torch.linspace(1, 4, 8, dtype=DT), -torch.linspace(0.5, 2, 4, dtype=DT)])
    M = Q @ torch.diag(eig) @ Q.T
    lam = torch.randn(n, generator=gen, dtype=DT, requires_grad=True)
    t = torch.randn(n, generator=gen, dtype=DT)
    w_star = torch.linalg.solve(M, lam.detach())
    outer = lambda params, hparams: 0.5 * ((params[0] - t) ** 2).sum()
    ref = torch.linalg.solve(M, w_star - t)
    errs = [rel_err(hg.minres([w_star], [lam], K, _linear_map(M), outer, tol=0.0, set_grad=False)[0], ref)
            for K in (2, 6, n)]
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-10, errs
    try:
        g = hg.cg([w_star], [lam], 3 * n, _linear_map(M), outer, set_grad=False)
    except (hg.BreakdownError, hg.DivergenceError):
        return
    assert torch.isfinite(g[0]).all() and rel_err(g[0], ref) <= 1e-8


def test_cg_returns_latest_iterate_on_abrupt_convergence():
    """hypertorch's CG returns the previous iterate when the tolerance is met: v = 0 here."""
    lam = torch.tensor([0.3, -1.2, 2.0], dtype=DT, requires_grad=True)
    const_map = lambda params, hparams: [hparams[0] * 1.0]  # Phi(w, lam) = lam: w* = lam
    outer = lambda params, hparams: 0.5 * (params[0] ** 2).sum()  # dE/dlam = lam
    g = hg.CG([lam.detach().clone()], [lam], 10, const_map, outer, tol=1.0, set_grad=False)
    assert torch.allclose(g[0], lam.detach(), rtol=0, atol=1e-15)
    # two distinct eigenvalues: CG is exact at iteration 2 and stops there
    D = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=DT))
    lam4 = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=DT, requires_grad=True)
    t = torch.ones(4, dtype=DT)
    w_star = torch.linalg.solve(D, lam4.detach())
    outer4 = lambda params, hparams: 0.5 * ((params[0] - t) ** 2).sum()
    r = hg.hypergradient([w_star], [lam4], lambda p, h: [p[0] - 0.2 * (D @ p[0] - h[0])], outer4, solver="cg",
                         K=10, tol=1e-6, set_grad=False)
    ref = torch.linalg.solve(D, w_star - t)
    assert r.converged and rel_err(r.grads[0], ref) <= 1e-14


@pytest.mark.parametrize("solver", ["fixed_point", "neumann"])
def test_diverging_iteration_raises(solver):
    """Phi = 1.5 w + lam has a well-defined fixed point but spectral radius 1.5: the iteration diverges."""
    lam = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    fp = lambda params, hparams: [1.5 * params[0] + hparams[0]]
    outer = lambda params, hparams: 0.5 * (params[0] ** 2).sum()
    w_star = -2 * lam.detach()
    with pytest.raises(hg.DivergenceError, match="diverges"):
        hg.hypergradient([w_star], [lam], fp, outer, solver=solver, K=200, set_grad=False)
    g = hg.minres([w_star], [lam], 5, fp, outer, set_grad=False)  # I - J = -0.5 I: minres is exact
    assert torch.allclose(g[0], 4 * lam.detach(), rtol=1e-14)  # E = 2 ||lam||^2


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "fixed_point", "neumann", "dense", "cg_normaleq"])
def test_nan_in_map_raises(solver):
    lam = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    fp = lambda params, hparams: [params[0] * torch.tensor([float("nan"), 1.0], dtype=DT) + hparams[0]]
    outer = lambda params, hparams: 0.5 * (params[0] ** 2).sum()
    with pytest.raises(hg.NonFiniteError):
        hg.hypergradient([lam.detach().clone()], [lam], fp, outer, solver=solver, K=10, set_grad=False)


def test_minres_detects_non_symmetric_operator():
    M = torch.tensor([[2.0, 1.5, 0.0], [0.0, 1.0, 0.7], [0.3, 0.0, 3.0]], dtype=DT)
    lam = torch.tensor([1.0, -1.0, 0.5], dtype=DT, requires_grad=True)
    outer = lambda params, hparams: 0.5 * (params[0] ** 2).sum()
    w_star = torch.linalg.solve(M, lam.detach())
    with pytest.raises(hg.BreakdownError, match="symmetric operator"):
        hg.minres([w_star], [lam], 20, _linear_map(M), outer, set_grad=False)
    g = hg.gmres([w_star], [lam], 3, _linear_map(M), outer, set_grad=False)
    assert rel_err(g[0], torch.linalg.solve(M.T, w_star)) <= 1e-13


def test_dense_singular_system_raises():
    M = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)
    lam = torch.tensor([1.0, 1.0], dtype=DT, requires_grad=True)
    outer = lambda params, hparams: 0.5 * (params[0] ** 2).sum()
    with pytest.raises(hg.SingularSystemError):
        hg.hypergradient([torch.ones(2, dtype=DT)], [lam], _linear_map(M), outer, solver="dense", set_grad=False)


def test_stoch_aid_deterministic_matches_reference():
    p = ridge(cond=None)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    grads, v = hg.stoch_AID([p["w_star"]], [p["lam"]], p["outer_loss"], 400, fp_map=gd, set_grad=False,
                            verbose=False)
    assert rel_err(grads[0], p["ref"]) <= 1e-10 and len(v) == 1
    build = lambda v: (torch.optim.SGD(v, lr=p["step"]), None)
    grads, _ = hg.stoch_AID([p["w_star"]], [p["lam"]], p["outer_loss"], 400, inner_loss=p["inner_loss"],
                            optim_build=build, set_grad=False, verbose=False)
    assert rel_err(grads[0], p["ref"]) <= 1e-10


@pytest.mark.parametrize("which", ["J_inner", "J_outer"])
def test_stoch_aid_refuses_zero_samples(which):
    """J = 0 averages no samples: J_inner=0 would drop the indirect term, J_outer=0 divide by zero."""
    p = ridge(cond=None)
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    with pytest.raises(ValueError, match=f"{which} must be at least 1"):
        hg.stoch_AID([p["w_star"]], [p["lam"]], p["outer_loss"], 10, fp_map=gd, set_grad=False, verbose=False,
                     stoch_inner=True, stoch_outer=True, **{which: 0})


@pytest.mark.parametrize("cond", [10.0, 1e4, 1e8])
@pytest.mark.parametrize("rtol", [1e-4, 1e-8, 1e-12])
def test_cg_converged_means_true_residual_below_tolerance(cond, rtol):
    """Whether CG confirms with a true residual or trusts the recurrence (rounding bound), a result
    marked converged has ||b - A x|| <= rtol ||b||, computed here independently."""
    from hypergrad.linear_solvers import solve_cg
    gen = torch.Generator().manual_seed(7)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ Q.T
    b = torch.randn(n, generator=gen, dtype=DT)
    x, info = solve_cg(lambda u: [A @ u[0]], [b], maxiter=2000, tol=0.0, rtol=rtol)
    true_res = (b - A @ x[0]).norm().item()
    if info.converged:
        assert true_res <= rtol * b.norm().item()
    else:
        assert rtol < 1e3 * cond * torch.finfo(DT).eps  # only unattainable accuracies may fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_on_singular_consistent_system_stops_at_rounding_level(dtype):
    """A singular PSD A (a softmax bias direction, an unregularized intercept) with b in its range:
    past the attainable accuracy, plain CG amplifies rounding noise in the null space and its residual
    grows by orders of magnitude (seen in float32). CG must stop at the rounding floor instead."""
    from hypergrad.linear_solvers import solve_cg
    gen = torch.Generator().manual_seed(0)
    n = 18
    B = torch.randn(n, n - 3, generator=gen, dtype=torch.float64)
    A = (B @ B.T / n).to(dtype)  # rank n - 3
    b = A @ torch.randn(n, generator=gen, dtype=dtype)  # consistent
    x, info = solve_cg(lambda u: [A @ u[0]], [b], maxiter=200, tol=0.0)
    assert torch.isfinite(x[0]).all()
    eps = torch.finfo(dtype).eps
    true_res = (b - A @ x[0]).norm().item()
    assert true_res <= 1e3 * eps * b.norm().item() * n, (true_res, info)
    assert info.iterations < 200
