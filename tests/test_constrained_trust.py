"""constrained/: no silently wrong hypergradient (models that lost a dependence, degenerate points at a
solver's accuracy, inaccurate solves, cvxpy's own refusals).

References share no code with the library: the closed-form KKT dense solve of a QP written here or in
constrained_problems (``exact_hypergrad``), and one-sided differences of re-solved cvxpy problems.
"""
import warnings

import cvxpy as cp
import pytest
import torch

import constrained as C
import hypergrad
from constrained_problems import DT, planted_cvxpy, planted_qp, rel_err

CASE = dict(n=8, m=6, k=2, d=3, n_active=3, seed=0)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def hg(problem, sol, x, loss, **kw):
    return C.hypergradient(problem, sol.params, [x], loss, sol.mu, sol.nu, set_grad=False, **kw)


# ---------------------------------------------------------------- 1. a model that lost its dependence
def planted_models(qp):
    """The planted QP's torch model, right and with one dependence dropped (values unchanged)."""
    right = dict(objective=qp.objective, ineq=qp.ineq, eq=qp.eq)
    return {
        "right": right,
        "ineq x.detach()": dict(right, ineq=lambda p, h: qp.G @ p[0] - qp.h - qp.E @ h[0].detach()),
        "eq x.detach()": dict(right, eq=lambda p, h: qp.A @ p[0] - qp.b - qp.F @ h[0].detach()),
        "objective x.detach()": dict(right, objective=lambda p, h: 0.5 * p[0] @ (qp.Q @ p[0])
                                     + (qp.c + qp.B @ h[0].detach()) @ p[0]),
        "ineq numpy round trip": dict(right, ineq=lambda p, h: qp.G @ p[0] - qp.h - qp.E @ torch.as_tensor(
            h[0].detach().numpy())),
        "objective half y.detach()": dict(right, objective=lambda p, h: 0.5 * p[0].detach() @ (qp.Q @ p[0])
                                          + (qp.c + qp.B @ h[0]) @ p[0]),
    }


def cast(qp, dtype):
    for name in ("Q", "c", "B", "G", "h", "E", "A", "b", "F", "x", "y", "mu", "nu", "yt"):
        setattr(qp, name, getattr(qp, name).to(dtype))
    return qp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(planted_models(planted_qp(**CASE))))
def test_model_that_lost_a_dependence_is_a_mismatch(name, dtype):
    """Values match cvxpy's at the solution, so only the derivative check can see it. Without the check
    (check_derivatives=False: the library before) the hypergradient is far from the exact formula."""
    qp = cast(planted_qp(**CASE), dtype)
    ref = cast(planted_qp(**CASE), DT).exact_hypergrad()
    prob, xp, y, ineq, eq = planted_cvxpy(cast(planted_qp(**CASE), DT))
    tp = C.ConstrainedProblem(**planted_models(qp)[name])
    x = leaf(qp.x)
    if name == "right":
        sol = C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=tp)
        assert rel_err(hg(tp, sol, x, qp.outer_loss).grads[0].double(), ref) <= (1e-6 if dtype == DT else 1e-3)
        return
    with pytest.raises(C.ModelMismatchError, match="torch model's derivative") as err:
        C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=tp)
    piece = name.split()[0]
    assert (piece == "objective" and "the objective" in str(err.value)) or f"{piece}[0]" in str(err.value)
    if name != "objective half y.detach()":  # that one is no KKT point either: the old check caught it
        sol = C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=tp, check_derivatives=False)
        assert rel_err(hg(tp, sol, x, qp.outer_loss).grads[0].double(), ref) > 0.1


@pytest.mark.parametrize("mapping", ["identity", "autograd", "no graph"])
def test_derivative_check_for_each_way_values_come_from_hparams(mapping):
    """hparams=None (values are the hparams), values computed from hparams by autograd (v = 2x: the check
    maps the direction through dv/dx), and values without a graph to hparams (the torch model is then
    checked against its own central differences in x)."""
    qp = planted_qp(**CASE)
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    scale = 1.0 if mapping == "identity" else 2.0
    z = leaf(qp.x / scale)

    def model(detach):
        def ineq_fn(p, h):
            xv = scale * (h[0].detach() if detach else h[0])
            return qp.G @ p[0] - qp.h - qp.E @ xv
        return C.ConstrainedProblem(lambda p, h: qp.objective(p, [scale * h[0]]), ineq_fn,
                                    lambda p, h: qp.eq(p, [scale * h[0]]))

    if mapping == "identity":
        values, hparams = [z], None
    else:
        values, hparams = [scale * z if mapping == "autograd" else (scale * z).detach()], [z]
    sol = C.solve_cvxpy(prob, [xp], values, [y], ineq=ineq, eq=eq, torch_problem=model(False), hparams=hparams)
    got = hg(model(False), sol, z, lambda p, h: qp.outer_loss(p, [scale * h[0]])).grads[0]
    assert rel_err(got, scale * qp.exact_hypergrad()) <= 1e-6
    with pytest.raises(C.ModelMismatchError, match=r"ineq\[0\].*D\^2_xy|ineq\[0\].*D_x"):
        C.solve_cvxpy(prob, [xp], values, [y], ineq=ineq, eq=eq, torch_problem=model(True), hparams=hparams)


def readme_problem():
    """The README's y*(a) = argmin ||y - a||^2 s.t. y <= 0.5, sum(y) = 1 (a enters only the objective)."""
    y, a = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [y <= 0.5, cp.sum(y) == 1])
    return prob, a, y


def readme_model(detach_obj=False, detach_eq=False):
    return C.ConstrainedProblem(lambda p, h: ((p[0] - (h[0].detach() if detach_obj else h[0])) ** 2).sum(),
                                ineq=lambda p, h: p[0] - 0.5,
                                eq=lambda p, h: (p[0].detach() if detach_eq else p[0]).sum().reshape(1) - 1)


def test_parameter_only_in_the_objective_and_detached_equality():
    prob, a, y = readme_problem()
    x = torch.tensor([0.9, 0.2, -0.1], dtype=DT, requires_grad=True)
    with pytest.raises(C.ModelMismatchError, match="the objective.*hparams"):
        C.solve_cvxpy(prob, [a], [x], [y], torch_problem=readme_model(detach_obj=True))
    with pytest.raises(C.ModelMismatchError, match=r"eq\[0\]"):
        C.solve_cvxpy(prob, [a], [x], [y], torch_problem=readme_model(detach_eq=True))


def test_dual_layer_checks_each_batch_element():
    qp = planted_qp(n=6, m=5, k=1, d=3, n_active=2, seed=11)
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    X = leaf(qp.x + 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=DT))
    right = C.ConstrainedProblem(qp.objective, qp.ineq, qp.eq)
    C.DualLayer(prob, [xp], [y], ineq=ineq, eq=eq, torch_problem=right)(X)
    wrong = C.ConstrainedProblem(qp.objective, lambda p, h: qp.G @ p[0] - qp.h - qp.E @ h[0].detach(), qp.eq)
    with pytest.raises(C.ModelMismatchError, match=r"ineq\[0\]"):
        C.DualLayer(prob, [xp], [y], ineq=ineq, eq=eq, torch_problem=wrong)(X)


# ---------------------------------------------------------------- 2. degenerate at the solver's accuracy
def readme_references(a0, w):
    """dE/da for E = w'y, y = projection of a: the KKT dense solve with y_0 <= 0.5 kept (active) and dropped.
    d_a grad_y L = -2I, so dE/da = 2 v_y with K v = [w; 0]."""
    out = {}
    for side, rows in (("keep", [[1.0, 0, 0], [1.0, 1, 1]]), ("drop", [[1.0, 1, 1]])):
        J = torch.tensor(rows, dtype=DT)
        r = J.shape[0]
        K = torch.cat([torch.cat([2 * torch.eye(3, dtype=DT), J.T], 1), torch.cat([J, torch.zeros(r, r, dtype=DT)], 1)])
        v = torch.linalg.solve(K, torch.cat([w, torch.zeros(r, dtype=DT)]))
        out[side] = 2 * v[:3]
    return out


def one_sided(prob, a, y, a0, w, d, h=1e-3):
    """(E(a0 + 2h d) - E(a0 + h d)) / h with E = w'y*(a) re-solved by cvxpy (tight tolerances): the slope on
    the side of d (y*(a) is piecewise affine; both points are off the degenerate one)."""
    def E(av):
        a.value = av.numpy()
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        return float(w @ torch.as_tensor(y.value))
    return (E(a0 + 2 * h * d) - E(a0 + h * d)) / h


@pytest.mark.parametrize("solver, kw", [("CLARABEL", {}), ("SCS", dict(eps=1e-4))])
def test_readme_degenerate_point_each_policy(solver, kw):
    """a = (0.6, 0.4, 0.3): y = (0.5, 0.3, 0.2), mu_0 = 0 and slack_0 = 0. The interior-point solver leaves
    mu_0 ~ 1e-4, slack_0 ~ 4e-5 (both ~ sqrt(gap)): within the point's accuracy, so degenerate."""
    prob, a, y = readme_problem()
    a0 = torch.tensor([0.6, 0.4, 0.3], dtype=DT)
    w = torch.tensor([0.0, 1.0, 0.0], dtype=DT)  # the README's outer loss y*_1
    ref = readme_references(a0, w)
    e0 = torch.tensor([1.0, 0, 0], dtype=DT)
    # the one-sided derivatives along e0: y_0 pushed up stays at 0.5 (keep), pushed down leaves it (drop)
    assert abs(one_sided(prob, a, y, a0, w, e0) - float(ref["keep"] @ e0)) <= 1e-5
    assert abs(-one_sided(prob, a, y, a0, w, -e0) - float(ref["drop"] @ e0)) <= 1e-5
    assert rel_err(ref["drop"], ref["keep"]) > 0.5
    x = leaf(a0)
    sol = C.solve_cvxpy(prob, [a], [x], [y], torch_problem=readme_model(), solver=solver, **kw)
    loss = lambda p, h: w @ p[0]  # noqa: E731
    with pytest.warns(C.DegenerateConstraintWarning, match=r"indices \[0\]"):
        default = hg(readme_model(), sol, x, loss)
    assert default.report.degenerate.tolist() == [0]
    with pytest.raises(C.DegenerateConstraintError, match=r"\[0\]"):
        hg(readme_model(), sol, x, loss, degenerate="error")
    for side in ("drop", "keep"):
        with pytest.warns(C.DegenerateConstraintWarning):
            res = hg(readme_model(), sol, x, loss, degenerate=side)
        assert rel_err(res.grads[0], ref[side]) <= 1e-6, side
        assert (0 in res.report.active.tolist()) == (side == "keep")


def degenerate_planted():
    """The planted QP with one inactive constraint j moved onto its boundary: mu_j = 0 = slack_j."""
    qp = planted_qp(**CASE)
    j = [i for i in range(qp.mu.numel()) if i not in qp.active.tolist()][0]
    qp.h[j] = qp.G[j] @ qp.y - qp.E[j] @ qp.x
    return qp, j


def test_planted_qp_with_a_degenerate_constraint_at_clarabel_accuracy():
    qp, j = degenerate_planted()
    prob, xp, y, ineq, eq = planted_cvxpy(qp)
    tp = C.ConstrainedProblem(qp.objective, qp.ineq, qp.eq)
    x = leaf(qp.x)
    sol = C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, eq=eq, torch_problem=tp)
    assert float(sol.mu[j]) > 1e-6 and float(-qp.ineq(sol.params, [x])[j]) > 1e-6  # neither is ~0 by rtol
    keep = qp.exact_hypergrad(active=torch.cat([qp.active, torch.tensor([j])]).sort().values)
    drop = qp.exact_hypergrad()
    assert rel_err(keep, drop) > 0.1
    with pytest.raises(C.DegenerateConstraintError, match=rf"\[{j}\]"):
        hg(tp, sol, x, qp.outer_loss, degenerate="error")
    for side, ref in (("drop", drop), ("keep", keep)):  # the point itself is accurate to ~1e-4 (sqrt(gap))
        with pytest.warns(C.DegenerateConstraintWarning):
            assert rel_err(hg(tp, sol, x, qp.outer_loss, degenerate=side).grads[0], ref) <= 1e-3, side


def test_batch_flags_the_degenerate_element():
    prob, a, y = readme_problem()
    A0 = torch.tensor([[0.6, 0.4, 0.3], [0.9, 0.2, -0.1], [0.2, 0.5, 0.1]], dtype=DT)
    w = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    sols = [C.solve_cvxpy(prob, [a], [A0[b]], [y]) for b in range(3)]
    Y = torch.stack([s.params[0] for s in sols])
    MU, NU = torch.stack([s.mu for s in sols]), torch.stack([s.nu for s in sols])
    X = leaf(A0)

    def run(side):
        return C.batch_hypergradient(readme_model(), [Y], [X], lambda p, h: (p[0] @ w).sum(), MU, NU,
                                     hparams_batched=[True], degenerate=side, set_grad=False)

    with pytest.raises(C.DegenerateConstraintError):
        run("error")
    ref = readme_references(A0[0], w)
    for side in ("drop", "keep"):
        with pytest.warns(C.DegenerateConstraintWarning):
            res = run(side)
        assert [r.degenerate.tolist() for r in res.reports] == [[0], [], []]
        assert rel_err(res.grads[0][0], ref[side]) <= 1e-6, side


# ---------------------------------------------------------------- 3. inaccurate solves, cvxpy's refusals
@pytest.mark.parametrize("solver, kw", [("CLARABEL", dict(tol_gap_abs=1e-3, tol_gap_rel=1e-3, tol_feas=1e-3)),
                                        ("OSQP", dict(eps_abs=1e-2, eps_rel=1e-2, polish=False))])
def test_loose_solve_of_a_correct_model_is_an_inaccurate_solve_not_a_mismatch(solver, kw):
    prob, a, y = readme_problem()
    qp = planted_qp(**CASE)
    cases = [(prob, [a], [y], {}, torch.tensor([0.6, 0.4, 0.3], dtype=DT), readme_model())]
    pprob, xp, py, ineq, eq = planted_cvxpy(qp)
    cases.append((pprob, [xp], [py], dict(ineq=ineq, eq=eq), qp.x, C.ConstrainedProblem(qp.objective, qp.ineq,
                                                                                          qp.eq)))
    raised = 0
    for problem, pars, vars_, split, x0, model in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # optimal_inaccurate
                C.solve_cvxpy(problem, pars, [leaf(x0)], vars_, torch_problem=model, solver=solver, **split, **kw)
        except C.InaccurateSolveError as e:
            raised += 1
            assert "tighten the solver's tolerances" in str(e) and "eps_abs" in str(e)
            assert "stationarity" in e.residuals and "not a KKT point" in str(e)
        # a ModelMismatchError here (the library before) fails the test
    assert raised >= 1


def test_cvxpy_refusals_are_library_errors_naming_the_problem():
    y, a = cp.Variable(3), cp.Parameter(3)
    concave = cp.Problem(cp.Maximize(cp.sum_squares(y - a)), [y <= 0.5])
    with pytest.raises(C.CvxpyProblemError, match="DCPError.*maximize.*is_dcp") as err:
        C.solve_cvxpy(concave, [a], [torch.zeros(3, dtype=DT)], [y])
    assert isinstance(err.value.__cause__, cp.error.DCPError)
    not_dpp = cp.Problem(cp.Minimize(cp.sum_squares(y - cp.square(a))), [y <= 0.5])
    with pytest.raises(C.CvxpyProblemError, match="DPP.*is_dpp"):
        C.DualLayer(not_dpp, [a], [y])
    s = cp.Parameter(3, nonneg=True)
    with pytest.raises(C.CvxpyProblemError, match=r"values\[0\].*nonnegative"):
        C.solve_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(y - s)), [y <= 0.5]), [s],
                      [torch.tensor([-1.0, 0, 0], dtype=DT)], [y])


# ---------------------------------------------------------------- 4. nonlinear pieces, sign-restricted parameters
TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonlinear_models_pass_and_a_detached_one_is_caught(dtype):
    """A ball constraint ||y||^2 <= r (r a nonneg parameter: the check steps inside its set) and a log
    objective with entries from 0.03 to 0.4 (steps relative to each entry stay in the domain)."""
    y, a, r = cp.Variable(4), cp.Parameter(4), cp.Parameter(nonneg=True)
    ball = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.sum_squares(y) <= r])
    A, R = torch.tensor([1.5, -2.0, 0.7, 1.1], dtype=dtype), torch.tensor(1.3, dtype=dtype)

    def ball_model(detach):
        return C.ConstrainedProblem(lambda p, h: ((p[0] - h[0]) ** 2).sum(),
                                    lambda p, h: (p[0] @ p[0] - (h[1].detach() if detach else h[1])).reshape(1))

    sol = C.solve_cvxpy(ball, [a, r], [leaf(A), leaf(R)], [y], torch_problem=ball_model(False), **TIGHT)
    # closed form: y = sqrt(r) a / ||a||, dE/dr for E = w'y is w'a / (2 sqrt(r) ||a||)
    w = torch.tensor([0.3, 1.0, -2.0, 0.5], dtype=dtype)
    res = C.hypergradient(ball_model(False), sol.params, [leaf(A), leaf(R)], lambda p, h: w @ p[0], sol.mu,
                          set_grad=False)
    ref_r = float(w.double() @ A.double()) / (2 * float(R) ** 0.5 * float(A.double().norm()))
    assert abs(float(res.grads[1]) - ref_r) <= (1e-6 if dtype == DT else 1e-3) * abs(ref_r)
    with pytest.raises(C.ModelMismatchError, match=r"ineq\[0\].*hparams"):
        C.solve_cvxpy(ball, [a, r], [leaf(A), leaf(R)], [y], torch_problem=ball_model(True), **TIGHT)
    y, a = cp.Variable(5), cp.Parameter(5)
    logp = cp.Problem(cp.Minimize(-cp.sum(cp.log(y)) + a @ y), [cp.sum(y) == 1, y <= 0.6])
    model = C.ConstrainedProblem(lambda p, h: -torch.log(p[0]).sum() + h[0] @ p[0], lambda p, h: p[0] - 0.6,
                                 lambda p, h: p[0].sum().reshape(1) - 1)
    A = torch.tensor([30.0, 0.1, -2.0, 5.0, 0.0], dtype=dtype)
    # at Clarabel's default tolerances the exponential-cone solve is only accurate to ~4e-4: said so
    with pytest.raises(C.InaccurateSolveError, match="stationarity.*tighten"):
        C.solve_cvxpy(logp, [a], [A], [y], torch_problem=model)
    sol = C.solve_cvxpy(logp, [a], [A], [y], torch_problem=model, **TIGHT)
    assert float(sol.params[0].min()) < 0.05


# second round: new instances from an independent tester ----------------------------------------------------

def test_an_accurate_kkt_point_with_a_tiny_active_multiplier_is_no_fixed_point_alarm():
    """mu ~ 1e-6 on an active constraint: the multiplier block's residual is the solver's accuracy over a
    tiny norm, not a sign that the point is off (the hypergradient is exact: [0, 1, 1, 1], 2)."""
    import warnings as _w
    y, a, b = cp.Variable(4), cp.Parameter(4), cp.Parameter()
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a)), [y[0] - b <= 0])
    A = torch.tensor([0.5 + 1e-6, 3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    Bv = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    tp = C.ConstrainedProblem(lambda p, h: 0.5 * ((p[0] - h[0]) ** 2).sum(),
                              ineq=lambda p, h: (p[0][0] - h[1]).reshape(1))
    sol = C.solve_cvxpy(prob, [a, b], [A, Bv], [y], torch_problem=tp, tol_gap_abs=1e-13, tol_gap_rel=1e-13,
                        tol_feas=1e-13)
    w = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    with _w.catch_warnings():
        _w.simplefilter("error", hypergrad.FixedPointWarning)
        res = C.hypergradient(tp, sol.params, [A, Bv], lambda p, h: w @ p[0], sol.mu, set_grad=False)
    assert torch.allclose(res.grads[0], torch.tensor([0.0, 1, 1, 1], dtype=torch.float64), atol=1e-6)
    assert abs(float(res.grads[1]) - 2.0) <= 1e-6


def test_variables_with_constraint_attributes_are_rejected_with_the_fix():
    """cp.Variable(nonneg=True) hides its bound from problem.constraints (no dual): the KKT map would miss it."""
    y, a = cp.Variable(3, nonneg=True), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.sum(y) <= 2])
    A = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64, requires_grad=True)
    tp = C.ConstrainedProblem(lambda p, h: ((p[0] - h[0]) ** 2).sum(), ineq=lambda p, h: (p[0].sum() - 2).reshape(1))
    with pytest.raises(C.CvxpyProblemError, match="explicit constraint"):
        C.solve_cvxpy(prob, [a], [A], [y], torch_problem=tp)
    with pytest.raises(C.CvxpyProblemError, match="nonneg"):
        C.DualLayer(prob, [a], [y])
