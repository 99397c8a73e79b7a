"""constrained/: hypergradients through constrained inner problems, against independent references.

References: the exact QP formula (K v = [grad_y E; 0; 0] solved densely in the test), central finite
differences of re-solved problems, closed forms (box, simplex, ball projections), one-sided differences
at degenerate points, and cvxpylayers (SCS at eps=1e-10). All float64.
"""

import pytest
import torch

import constrained as C
from constrained_problems import DT, planted_cvxpy, planted_qp, rel_err
from hypergrad import HypergradError, SingularSystemError


def qp_problem(qp):
    return C.ConstrainedProblem(qp.objective, qp.ineq, qp.eq if qp.A.shape[0] else None)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def hg(problem, params, hparams, loss, mu=None, nu=None, **kw):
    return C.hypergradient(problem, params, hparams, loss, mu, nu, set_grad=False, **kw)


# ---------------------------------------------------------------- planted QPs: exact formula, FD, K
QP_CASES = [dict(n=8, m=6, k=2, d=3, n_active=3, seed=0), dict(n=12, m=10, k=0, d=4, n_active=5, seed=1),
            dict(n=6, m=5, k=3, d=2, n_active=2, seed=2), dict(n=10, m=12, k=1, d=5, n_active=7, seed=3)]


@pytest.mark.parametrize("case", QP_CASES)
@pytest.mark.parametrize("solver", ["dense", "minres", "auto"])
@pytest.mark.parametrize("materialize", [True, False])
def test_planted_qp_matches_exact_formula(case, solver, materialize):
    """Both operator paths: K materialized once (LU / core Krylov on mat-vecs) and matrix-free (core)."""
    qp = planted_qp(**case)
    res = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu if case["k"] else None,
             solver=solver, materialize=materialize)
    assert res.report.active.tolist() == qp.active.tolist()
    assert rel_err(res.grads[0], qp.exact_hypergrad()) <= 1e-8
    assert res.converged


def test_cg_normaleq_on_planted_qp():
    qp = planted_qp(**QP_CASES[0])
    res = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu, solver="cg_normaleq")
    assert rel_err(res.grads[0], qp.exact_hypergrad()) <= 1e-7


def test_callables_without_torch_func_support_fall_back_to_matrix_free():
    """A NumPy round trip (here a sanity check) breaks torch.func: the matrix-free path takes over."""
    import numpy as np

    qp = planted_qp(**QP_CASES[0])

    def ineq(params, hparams):
        assert np.isfinite(params[0].detach().numpy()).all()
        return qp.G @ params[0] - qp.h - qp.E @ hparams[0]

    km = C.kkt_map(C.ConstrainedProblem(qp.objective, ineq, qp.eq), [qp.y], [qp.x], qp.mu, qp.nu)
    assert C.hypergradients.materialize_kkt(km, [qp.x]) is None
    res = hg(C.ConstrainedProblem(qp.objective, ineq, qp.eq), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu)
    assert rel_err(res.grads[0], qp.exact_hypergrad()) <= 1e-8


def test_exact_formula_matches_central_differences():
    """The reference itself, against central differences of the re-solved QP (affine in x locally)."""
    qp = planted_qp(**QP_CASES[0])
    h, d = 1e-5, qp.x.numel()
    fd = torch.zeros(d, dtype=DT)
    for i in range(d):
        e = torch.zeros(d, dtype=DT)
        e[i] = h
        vals = [qp.outer_loss([qp.solve_with_active(qp.x + s * e)[0]], [qp.x + s * e]) for s in (1, -1)]
        fd[i] = (vals[0] - vals[1]) / (2 * h)
    assert rel_err(fd, qp.exact_hypergrad()) <= 1e-8
    ours = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu).grads[0]
    assert rel_err(ours, fd) <= 1e-8


def test_kkt_map_fixed_point_and_jacobian_is_eta_K():
    qp = planted_qp(**QP_CASES[0])
    eta = 0.37
    km = C.kkt_map(qp_problem(qp), [qp.y], [qp.x], qp.mu, qp.nu, eta=eta)
    assert [t.shape for t in km.w] == [(8,), (3,), (2,)]
    out = km.fp_map(km.w, [qp.x])
    assert max(float((a - b).abs().max()) for a, b in zip(out, km.w)) <= 1e-12
    flat = torch.cat([t.detach() for t in km.w]).requires_grad_(True)

    def phi(v):
        return torch.cat(km.fp_map(list(torch.split(v, [8, 3, 2])), [qp.x]))

    J = torch.autograd.functional.jacobian(phi, flat)
    assert torch.allclose(torch.eye(13, dtype=DT) - J, eta * qp.kkt_matrix(), atol=1e-13)
    # eta cancels from the hypergradient
    a = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu, eta=eta).grads[0]
    assert rel_err(a, qp.exact_hypergrad()) <= 1e-10


def test_outer_loss_depending_on_multipliers():
    """E = 1/2||y - yt||^2 + 1/2||x||^2 + wm'mu: exact formula with [grad_y E; wm_A; 0], central
    differences of (y, mu_A)(x), and cvxpylayers' duals."""
    qp = planted_qp(**QP_CASES[0])
    wm = torch.linspace(-1.0, 2.0, qp.mu.numel(), dtype=DT)

    def loss(params, hparams, mu, nu):
        return qp.outer_loss(params, hparams) + wm @ mu + 0.0 * nu.sum()

    ref = qp.exact_hypergrad(dE_dmu=wm)
    res = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], loss, qp.mu, qp.nu, with_multipliers=True)
    assert rel_err(res.grads[0], ref) <= 1e-8
    assert rel_err(ref, qp.exact_hypergrad()) > 1e-2  # the mu-term matters

    def f(x):
        y, mu_a, _ = qp.solve_with_active(x)
        return qp.outer_loss([y], [x]) + wm[qp.active] @ mu_a

    h = 1e-5
    fd = torch.stack([(f(qp.x + h * e) - f(qp.x - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)])
    assert rel_err(fd, ref) <= 1e-8

    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    x = leaf(qp.x)
    sol = C.DualLayer(prob, [xp], [y], ineq=ineq, eq=eq)(x)
    g, = torch.autograd.grad(loss(sol.params, [x], sol.mu, sol.nu), x)
    assert rel_err(res.grads[0], g) <= 1e-5


# ---------------------------------------------------------------- cvxpy / cvxpylayers
def test_planted_qp_against_cvxpy_and_cvxpylayers():
    qp = planted_qp(**QP_CASES[0])
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    tp = qp_problem(qp)
    x = leaf(qp.x)
    sol = C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=tp)
    assert sol.status == "optimal"
    assert float((sol.params[0] - qp.y).abs().max()) < 1e-6
    assert float((sol.mu - qp.mu).abs().max()) < 1e-6 and float((sol.nu - qp.nu).abs().max()) < 1e-6
    ours = hg(tp, sol.params, [x], qp.outer_loss, sol.mu, sol.nu).grads[0]
    assert rel_err(ours, qp.exact_hypergrad()) <= 1e-6
    layer = C.DualLayer(prob, [xp], [y], ineq=ineq, eq=eq)
    ls = layer(x)
    ref, = torch.autograd.grad(qp.outer_loss(ls.params, [x]), x)
    assert rel_err(ref, qp.exact_hypergrad()) <= 1e-5
    ours = hg(tp, [p.detach() for p in ls.params], [x], qp.outer_loss, ls.mu.detach(), ls.nu.detach(),
              solver="minres").grads[0]
    assert rel_err(ours, ref) <= 1e-5


def test_torch_model_disagreeing_with_cvxpy_is_an_error():
    qp = planted_qp(**QP_CASES[0])
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    x = leaf(qp.x)
    flipped = C.ConstrainedProblem(qp.objective, lambda p, h: -qp.ineq(p, h), qp.eq)
    with pytest.raises(C.ModelMismatchError, match="ineq"):
        C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=flipped)
    wrong_obj = C.ConstrainedProblem(lambda p, h: qp.objective(p, h) + p[0].sum(), qp.ineq, qp.eq)
    with pytest.raises(C.ModelMismatchError, match="not a KKT point"):
        C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=wrong_obj)
    with pytest.raises(TypeError, match="NonNeg|Inequality"):
        C.split_constraints(prob, ineq=eq, eq=ineq)


def test_infeasible_and_unbounded_inner_problems_raise_with_status():
    import cvxpy as cp

    y, a = cp.Variable(2), cp.Parameter(2)
    infeasible = cp.Problem(cp.Minimize(cp.sum_squares(y)), [a - y <= 0, cp.sum(y) <= 1])
    with pytest.raises(C.InnerSolveError, match="infeasible") as err:
        C.solve_cvxpy(infeasible, [a], [torch.ones(2, dtype=DT)], [y])
    assert err.value.status == "infeasible"
    with pytest.raises(C.InnerSolveError) as err:
        C.DualLayer(infeasible, [a], [y])(torch.ones(2, dtype=DT))
    assert err.value.status == "infeasible"
    unbounded = cp.Problem(cp.Minimize(a @ y), [y[0] <= 1])
    with pytest.raises(C.InnerSolveError) as err:
        C.solve_cvxpy(unbounded, [a], [torch.ones(2, dtype=DT)], [y])
    assert "unbounded" in err.value.status or "infeasible" in err.value.status


# ---------------------------------------------------------------- closed forms
def test_equality_constrained_least_squares_vs_autograd_through_dense_solve():
    """min 1/2||M y - x||^2 s.t. A y = b(x) = b0 + F x: reference by autograd through the KKT solve."""
    g = torch.Generator().manual_seed(5)
    n, k, r = 6, 2, 9
    M, A, F = (torch.randn(r, n, generator=g, dtype=DT), torch.randn(k, n, generator=g, dtype=DT),
               torch.randn(k, r, generator=g, dtype=DT))
    b0, yt, x0 = (torch.randn(k, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT),
                  torch.randn(r, generator=g, dtype=DT))

    def solve(x):
        Kt = torch.cat([torch.cat([M.T @ M, A.T], 1), torch.cat([A, torch.zeros(k, k, dtype=DT)], 1)])
        s = torch.linalg.solve(Kt, torch.cat([M.T @ x, b0 + F @ x]))
        return s[:n], s[n:]

    def loss(p, h):
        return ((p[0] - yt) ** 2).sum() * h[0].sum()

    x = leaf(x0)
    y_ref, nu_ref = solve(x)
    ref, = torch.autograd.grad(loss([y_ref], [x]), x)
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((M @ p[0] - h[0]) ** 2).sum(),
                                eq=lambda p, h: A @ p[0] - b0 - F @ h[0])
    for solver in ("dense", "minres"):
        res = hg(prob, [y_ref.detach()], [x], loss, nu=nu_ref.detach(), solver=solver)
        assert rel_err(res.grads[0], ref) <= 1e-9


def test_box_projection_with_x_in_the_bounds():
    """y = clip(a, l, u), hparams (a, l, u): dE/da = w on the free set, dE/dl = w where y = l, etc."""
    a = torch.tensor([-2.0, -0.3, 0.1, 0.9, 3.0, 0.5], dtype=DT)
    l0 = torch.tensor([-1.0, -1.0, -0.5, -0.5, 0.0, 0.6], dtype=DT)
    u0 = torch.tensor([1.0, 1.0, 0.5, 0.5, 2.0, 1.0], dtype=DT)
    w = torch.linspace(0.5, 3.0, 6, dtype=DT)
    y = torch.clamp(a, l0, u0)
    mu = torch.cat([(l0 - a).clamp(min=0), (a - u0).clamp(min=0)])  # for l - y <= 0 and y - u <= 0
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(),
                                lambda p, h: torch.cat([h[1] - p[0], p[0] - h[2]]))
    hp = [leaf(a), leaf(l0), leaf(u0)]
    res = hg(prob, [y], hp, lambda p, h: w @ p[0], mu)
    free, low, up = (y > l0) & (y < u0), y == l0, y == u0
    for got, mask in zip(res.grads, (free, low, up)):
        assert torch.allclose(got, w * mask, atol=1e-12)
    assert len(res.report.active) == int(low.sum() + up.sum()) == 4


def sparsemax(z):
    s, _ = torch.sort(z, descending=True)
    cs = torch.cumsum(s, 0) - 1
    kk = torch.arange(1, len(z) + 1, dtype=z.dtype)
    k = int((s - cs / kk > 0).sum())
    return (z - cs[k - 1] / k).clamp(min=0)


def test_projection_onto_simplex():
    """y = argmin 1/2||y - x||^2 s.t. y >= 0, 1'y = 1 (sparsemax); J = diag(s) - s s'/|S|."""
    x0 = torch.tensor([0.8, 0.1, 0.65, -0.4, 0.3, 0.55], dtype=DT)
    y = sparsemax(x0)
    supp = (y > 0).to(DT)
    tau = float((x0 - y)[y > 0][0])  # y = x - tau on the support: nu = tau
    nu = torch.tensor([tau], dtype=DT)
    mu = (y - x0 + tau).clamp(min=0)  # stationarity y - x - mu + nu = 0 off the support
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, -1.0], dtype=DT)
    ref = supp * w - supp * (supp @ w) / supp.sum()
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(), lambda p, h: -p[0],
                                lambda p, h: p[0].sum().reshape(1) - 1)
    for solver in ("dense", "minres"):
        res = hg(prob, [y], [leaf(x0)], lambda p, h: w @ p[0], mu, nu, solver=solver)
        assert rel_err(res.grads[0], ref) <= 1e-10
    assert 0 < supp.sum() < 6


def test_nonlinear_ball_constraint_needs_mu_hessian_term():
    """min 1/2||y - a||^2 s.t. ||y||^2 <= r^2, r = e^s, ||a|| > r: y = r a/||a||, mu = (||a||/r - 1)/2."""
    a0 = torch.tensor([1.5, -2.0, 0.7, 1.1], dtype=DT)
    s0 = torch.tensor(0.2, dtype=DT)
    r, na = torch.exp(s0), a0.norm()
    y = r * a0 / na
    mu = ((na / r - 1) / 2).reshape(1)
    w = torch.tensor([0.3, 1.0, -2.0, 0.5], dtype=DT)
    ahat = a0 / na
    ref_a = (r / na) * (w - ahat * (ahat @ w))
    ref_s = r * (ahat @ w)
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(),
                                lambda p, h: (p[0] @ p[0] - torch.exp(2 * h[1])).reshape(1))
    for solver in ("dense", "minres"):
        res = hg(prob, [y], [leaf(a0), leaf(s0)], lambda p, h: w @ p[0], mu, solver=solver)
        assert rel_err(res.grads[0], ref_a) <= 1e-10
        assert abs(float(res.grads[1] - ref_s)) <= 1e-10 * abs(float(ref_s))
    # without the mu * Hessian(p) term (H = I instead of (1 + 2 mu) I) the answer is far off
    n = 4
    Kn = torch.zeros(n + 1, n + 1, dtype=DT)
    Kn[:n, :n] = torch.eye(n, dtype=DT)
    Kn[:n, n] = Kn[n, :n] = 2 * y
    v = torch.linalg.solve(Kn, torch.cat([w, torch.zeros(1, dtype=DT)]))
    assert rel_err(v[:n], ref_a) > 0.1  # (d_a grad_y L = -I, so the no-curvature gradient is v_y)


# ---------------------------------------------------------------- degenerate points, LICQ, singular H
def box_lower(a):
    """y = max(a, 0) = argmin 1/2||y - a||^2 s.t. -y <= 0; mu = max(-a, 0)."""
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(), lambda p, h: -p[0])
    return prob, a.clamp(min=0), (-a).clamp(min=0)


def test_degenerate_point_each_policy_gives_its_one_sided_derivative():
    a0 = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=DT)  # index 2: mu = 0 and p = 0
    w = torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=DT)
    prob, y, mu = box_lower(a0)

    def f(a):
        return w @ a.clamp(min=0)

    h = 1e-3  # the map is piecewise linear: one-sided differences are exact
    right = torch.stack([(f(a0 + h * e) - f(a0)) / h for e in torch.eye(4, dtype=DT)])
    left = torch.stack([(f(a0) - f(a0 - h * e)) / h for e in torch.eye(4, dtype=DT)])
    assert float((right - left).abs().max()) > 1  # a kink at index 2
    with pytest.warns(C.DegenerateConstraintWarning, match="degenerate"):
        drop = hg(prob, [y], [leaf(a0)], lambda p, h: w @ p[0], mu)
    assert drop.report.degenerate.tolist() == [2] and 2 not in drop.report.active.tolist()
    assert torch.allclose(drop.grads[0], right, atol=1e-10)  # dropped: the side where y_2 > 0
    with pytest.warns(C.DegenerateConstraintWarning):
        keep = hg(prob, [y], [leaf(a0)], lambda p, h: w @ p[0], mu, degenerate="keep")
    assert 2 in keep.report.active.tolist()
    assert torch.allclose(keep.grads[0], left, atol=1e-10)  # kept: the side where y_2 stays at 0
    with pytest.raises(C.DegenerateConstraintError, match=r"\[2\]"):
        hg(prob, [y], [leaf(a0)], lambda p, h: w @ p[0], mu, degenerate="error")


def test_duplicated_constraints_warn_and_keep_the_primal_part():
    qp = planted_qp(**QP_CASES[0])
    i = int(qp.active[0])
    dup = planted_qp(**QP_CASES[0])
    for name in ("G", "h", "E"):
        t = getattr(qp, name)
        setattr(dup, name, torch.cat([t, t[i:i + 1]]))
    mu = torch.cat([qp.mu, torch.zeros(1, dtype=DT)])
    mu[i] = 0.3 * qp.mu[i]
    mu[-1] = 0.7 * qp.mu[i]  # any split of the multiplier is a KKT point
    ref = qp.exact_hypergrad()
    for solver, materialize in (("auto", None), ("minres", True), ("minres", False)):
        with pytest.warns(C.LICQWarning, match="LICQ"):
            res = hg(qp_problem(dup), [qp.y], [leaf(qp.x)], qp.outer_loss, mu, qp.nu, solver=solver,
                     materialize=materialize)
        assert res.solver == "minres" and not res.report.licq
        assert rel_err(res.grads[0], ref) <= 1e-8
    for materialize in (True, False):
        with pytest.warns(C.LICQWarning), pytest.raises(SingularSystemError):
            hg(qp_problem(dup), [qp.y], [leaf(qp.x)], qp.outer_loss, mu, qp.nu, solver="dense",
               materialize=materialize)


def test_lp_lower_level_singular_hessian_nonsingular_kkt():
    """Q = 0 (an LP) at a vertex: H singular, K nonsingular. Dense and MINRES right; CG right or a clear
    error (it breaks down on p'Kp = 0), never NaN."""
    qp = planted_qp(n=5, m=8, k=1, d=3, n_active=4, seed=7, singular_Q=True)
    ref = qp.exact_hypergrad()
    assert torch.linalg.matrix_rank(qp.kkt_matrix()) == 10
    for solver in ("dense", "minres", "auto"):
        for materialize in (True, False):
            res = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu, solver=solver,
                     materialize=materialize)
            assert rel_err(res.grads[0], ref) <= 1e-8
    for materialize in (True, False):
        try:
            res = hg(qp_problem(qp), [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu, solver="cg",
                     materialize=materialize)
        except HypergradError as e:
            assert "cg" in str(e)
        else:
            assert bool(torch.isfinite(res.grads[0]).all()) and rel_err(res.grads[0], ref) <= 1e-8


def test_svm_bias_singular_hessian_against_cvxpylayers():
    """Squared-hinge SVM with an unregularized bias b: the Hessian in (w, b, xi) is singular in b, K is
    not. Reference: cvxpylayers' derivative w.r.t. the per-sample weights."""
    import cvxpy as cp

    g = torch.Generator().manual_seed(3)
    n, d = 14, 3
    X = torch.randn(n, d, generator=g, dtype=DT)
    yl = torch.sign(X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=DT))
    w, b, xi, s = cp.Variable(d), cp.Variable(), cp.Variable(n), cp.Parameter(n, nonneg=True)
    cons = [1 - xi - cp.multiply(yl.numpy(), X.numpy() @ w + b) <= 0]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w) + 0.5 * cp.sum_squares(cp.multiply(s, xi))), cons)
    tp = C.ConstrainedProblem(lambda p, h: 0.5 * (p[0] ** 2).sum() + 0.5 * (torch.exp(h[0]) * p[2] ** 2).sum(),
                              lambda p, h: 1 - p[2] - yl * (X @ p[0] + p[1]))
    Xv, yv = torch.randn(6, d, generator=g, dtype=DT), torch.sign(torch.randn(6, generator=g, dtype=DT))

    def loss(p, h):
        return torch.sigmoid(-yv * (Xv @ p[0] + p[1])).mean()

    c = leaf(0.3 * torch.randn(n, generator=g, dtype=DT))
    sol = C.DualLayer(prob, [s], [w, b, xi], ineq=cons)(torch.exp(c / 2))
    ref, = torch.autograd.grad(loss(sol.params, [c]), c)
    params = [t.detach() for t in sol.params]
    for solver in ("dense", "minres"):
        res = hg(tp, params, [c], loss, sol.mu.detach(), solver=solver)
        assert rel_err(res.grads[0], ref) <= 1e-5
        assert 0 < len(res.report.active) < n


# ---------------------------------------------------------------- batches through cvxpylayers
def test_batch_with_different_active_sets_matches_per_element_and_cvxpylayers():
    qp = planted_qp(n=6, m=5, k=1, d=3, n_active=2, seed=11)
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    layer = C.DualLayer(prob, [xp], [y], ineq=ineq, eq=eq)
    g = torch.Generator().manual_seed(0)
    X = leaf(qp.x + 1.5 * torch.randn(4, 3, generator=g, dtype=DT))
    sol = layer(X)

    def loss(params, hparams):
        return sum(qp.outer_loss([params[0][b]], [hparams[0][b]]) for b in range(params[0].shape[0]))

    ref, = torch.autograd.grad(loss(sol.params, [X]), X)
    ys, mus, nus = sol.params[0].detach(), sol.mu.detach(), sol.nu.detach()
    tp = qp_problem(qp)
    res = C.batch_hypergradient(tp, [ys], [X], loss, mus, nus, hparams_batched=[True], set_grad=False)
    actives = {tuple(r.active.tolist()) for r in res.reports}
    assert len(actives) >= 3  # genuinely different active sets
    per = torch.stack([hg(tp, [ys[b]], [leaf(X[b].detach())], qp.outer_loss, mus[b], nus[b]).grads[0]
                       for b in range(4)])
    assert rel_err(res.grads[0], per) <= 1e-10
    assert rel_err(res.grads[0], ref) <= 1e-5
    loop = C.batch_hypergradient(tp, [ys], [X], loss, mus, nus, hparams_batched=[True], set_grad=False,
                                 vectorize=False, solver="minres")
    assert rel_err(loop.grads[0], per) <= 1e-8


def test_batch_with_shared_hparam_and_multiplier_loss():
    """Box projections y_b = clip(a_b, -u, u) with the bound u shared; E = sum_b w'y_b + c'mu_b."""
    a = torch.tensor([[0.2, -1.5, 2.0], [1.2, 0.1, -0.3], [-0.4, 0.6, 0.9]], dtype=DT)
    u0 = torch.tensor([0.5, 1.0, 0.8], dtype=DT)
    w, cm = torch.tensor([1.0, -2.0, 0.5], dtype=DT), torch.tensor([0.1, 0.2, 0.3, -0.1, 0.4, 0.5], dtype=DT)
    Y = torch.maximum(torch.minimum(a, u0), -u0)
    mu = torch.cat([(a - u0).clamp(min=0), (-u0 - a).clamp(min=0)], dim=1)  # y - u <= 0, -u - y <= 0
    prob = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(),
                                lambda p, h: torch.cat([p[0] - h[1], -h[1] - p[0]]))
    A, U = leaf(a), leaf(u0)
    res = C.batch_hypergradient(prob, [Y], [A, U], lambda p, h, m, n: (p[0] @ w).sum() + (m @ cm).sum(), mu,
                                hparams_batched=[True, False], with_multipliers=True, set_grad=False)

    def E(a_, u_):  # the closed form, differentiated by autograd
        y = torch.maximum(torch.minimum(a_, u_), -u_)
        m = torch.cat([(a_ - u_).clamp(min=0), (-u_ - a_).clamp(min=0)], dim=1)
        return (y @ w).sum() + (m @ cm).sum()

    ra, ru = torch.autograd.grad(E(A, U), [A, U])
    assert torch.allclose(res.grads[0], ra, atol=1e-12) and torch.allclose(res.grads[1], ru, atol=1e-12)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors_and_caller_tensors_untouched():
    qp = planted_qp(**QP_CASES[0])
    tp = qp_problem(qp)
    x = leaf(qp.x)
    y0, mu0 = qp.y.clone(), qp.mu.clone()
    with pytest.raises(ValueError, match="pass mu"):
        hg(tp, [qp.y], [x], qp.outer_loss, None, qp.nu)
    with pytest.raises(ValueError, match="shape"):
        hg(tp, [qp.y], [x], qp.outer_loss, qp.mu[:-1], qp.nu)
    with pytest.raises(ValueError, match="unknown solver"):
        hg(tp, [qp.y], [x], qp.outer_loss, qp.mu, qp.nu, solver="neumann")
    with pytest.raises(ValueError, match="degenerate"):
        hg(tp, [qp.y], [x], qp.outer_loss, qp.mu, qp.nu, degenerate="maybe")
    bad = qp.mu.clone()
    bad[qp.active[0]] = -1.0
    with pytest.raises(C.KKTError, match="negative multiplier"):
        hg(tp, [qp.y], [x], qp.outer_loss, bad, qp.nu)
    inactive = [i for i in range(6) if i not in qp.active.tolist()][0]
    bad = qp.mu.clone()
    bad[inactive] = 1.0
    with pytest.raises(C.KKTError, match="complementarity|stationarity"):
        hg(tp, [qp.y], [x], qp.outer_loss, bad, qp.nu, kkt_tol=None)
    with pytest.raises(C.KKTError, match="stationarity"):
        hg(tp, [qp.y + 1e-3], [x], qp.outer_loss, qp.mu, qp.nu)
    res = C.hypergradient(tp, [qp.y], [x], qp.outer_loss, qp.mu, qp.nu)
    assert torch.equal(qp.y, y0) and torch.equal(qp.mu, mu0)
    assert torch.allclose(x.grad, res.grads[0])  # set_grad accumulates into .grad
    C.hypergradient(tp, [qp.y], [x], qp.outer_loss, qp.mu, qp.nu)
    assert torch.allclose(x.grad, 2 * res.grads[0])


# ---------------------------------------------------------------- example and benchmark run (quick modes)
def test_svm_example_and_benchmark_quick_modes(tmp_path):
    import importlib.util
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    loaded = {}
    for name in ("examples/svm_hyperparameters.py", "benchmarks/bench_constrained.py"):
        spec = importlib.util.spec_from_file_location(name.replace("/", "_")[:-3], os.path.join(root, name))
        loaded[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[name])
    log, check = loaded["examples/svm_hyperparameters.py"].main(["--tiny", "--out", str(tmp_path)])
    assert check["rel_diff"] < 1e-4 and len(log) == 4 and (tmp_path / "svm_hyperparameters.png").exists()
    head = loaded["benchmarks/bench_constrained.py"].main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert head["ours_rel_err"] <= 1e-6 and (tmp_path / "bench_constrained.csv").exists()


# ---------------------------------------------------------------- a Hessian supplied in closed form
@pytest.mark.parametrize("case", QP_CASES)
def test_supplied_hessian_matches_exact_formula(case):
    qp = planted_qp(**case)
    base = qp_problem(qp)
    problem = C.ConstrainedProblem(base.objective, base.ineq, base.eq, hessian=lambda p, h, mu, nu: qp.Q)
    res = hg(problem, [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu if case["k"] else None, solver="dense")
    assert rel_err(res.grads[0], qp.exact_hypergrad()) <= 1e-8


def test_wrong_supplied_hessian_is_an_error():
    qp = planted_qp(**QP_CASES[0])
    base = qp_problem(qp)
    eye = torch.eye(qp.Q.shape[0], dtype=DT)
    for bad, match in [(lambda p, h, mu, nu: qp.Q + 1e-3 * eye, "disagrees with the autodiff Hessian"),
                       (lambda p, h, mu, nu: qp.Q[:3, :3], r"must return a \(8, 8\) tensor")]:
        problem = C.ConstrainedProblem(base.objective, base.ineq, base.eq, hessian=bad)
        with pytest.raises(ValueError, match=match):
            hg(problem, [qp.y], [leaf(qp.x)], qp.outer_loss, qp.mu, qp.nu, solver="dense")


@pytest.mark.parametrize("solver", ["dense", "minres"])
def test_float32_solve_converges_and_scales_with_the_outer_loss(solver):
    """The default rtol is reachable in float32 (max(1e-11, 100 eps)); scaling E by c scales the result by c."""
    qp = planted_qp(**QP_CASES[0])
    f = lambda t: t.detach().float()
    prob = C.ConstrainedProblem(lambda p, h: qp.objective([p[0].double()], [h[0].double()]).float(),
                                lambda p, h: qp.ineq([p[0].double()], [h[0].double()]).float(),
                                lambda p, h: qp.eq([p[0].double()], [h[0].double()]).float())
    ref = qp.exact_hypergrad()
    for c in (1e-8, 1.0, 1e8):
        loss = lambda p, h, c=c: c * qp.outer_loss([p[0].double()], [h[0].double()]).float()
        res = hg(prob, [f(qp.y)], [leaf(f(qp.x))], loss, f(qp.mu), f(qp.nu), solver=solver, materialize=False)
        assert res.converged, (c, res.residual)
        assert rel_err(res.grads[0].double() / c, ref) <= 1e-4, c
