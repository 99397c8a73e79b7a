"""No silently wrong hypergradient from methods/: diverging lower loops, fixed-point residuals, BVFIM in
float32 and with offsets, BDA schedules, module names. References are written here: plain autograd through
the same unrolled steps, closed forms of the quadratic problem, a Newton solve of BVFIM's barrier problem."""
import importlib
import math

import pytest
import torch

import methods
from hypergrad import DivergenceError
from methods_problems import DT, Vec, quadratic, quadratic_objectives, rel_err

P = quadratic()  # lower Hessian A with eigenvalues 1..4: gradient descent diverges for lr > 2/4


def losses(p, dtype=DT):
    A, B = p["A"].to(dtype), p["B"].to(dtype)
    return (lambda y, h: 0.5 * y[0] @ A @ y[0] - y[0] @ B @ h[0],
            lambda y, h: p["F"](h[0].to(DT), y[0].to(DT)).to(dtype))


def plain_rad(x, y0, T, lr):
    """T gradient steps y <- y - lr (A y - B x) on the graph; the iterates y_0..y_T."""
    ys = [y0]
    for _ in range(T):
        ys.append(ys[-1] - lr * (P["A"] @ ys[-1] - P["B"] @ x))
    return ys


# ---------------------------------------------------------------- 1. diverging lower loops
def test_the_unrolled_gradient_of_a_diverging_loop_is_garbage():
    """What used to be returned: plain autograd through 30 steps with lr = 1 (|1 - lr 4| = 3) is ~1e14."""
    x = P["x0"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(P["F"](x, plain_rad(x, P["y0"], 30, 1.0)[-1]), x)
    exact = P["implicit_grad"](P["x0"], P["y_star"](P["x0"]))
    assert g.norm() > 1e10 * exact.norm()


DYNAMIC_VARIANTS = [dict(), dict(truncate_iters=20), dict(alpha=0.5), dict(acquire_max_loss=True),
                    dict(init_aux=True), dict(acquire_max_loss=True, init_aux=True)]


@pytest.mark.parametrize("kw", DYNAMIC_VARIANTS, ids=["RAD", "T-RAD", "BDA", "PTT", "IA", "IAPTT"])
def test_dynamic_diverging_lower_loop_raises_naming_lr(kw):
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.Dynamic(ll, 30, um, ul, lm, lr=1.0, **kw)
    with pytest.raises(DivergenceError, match=r"lr.*=1 .*smaller"):
        solver.compute_gradients(None, None, None, None)
    assert um.x.grad is None and torch.equal(lm.y.detach(), P["y0"])  # nothing written


def test_dynamic_ll_opt_with_momentum_diverging():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    opt = torch.optim.SGD(lm.parameters(), lr=0.9, momentum=0.5)
    with pytest.raises(DivergenceError, match="ll_opt's lr"):
        methods.Dynamic(ll, 30, um, ul, lm, ll_opt=opt).compute_gradients(None, None, None, None)


def test_slow_divergence_is_caught_by_the_monotone_growth_rule():
    """lr = 0.55: the top mode grows by 1.2 per step, 1.2^60 = 6e4 < the 1e6 growth limit."""
    f, F = losses(P)
    x = P["x0"].clone().requires_grad_(True)
    with pytest.raises(DivergenceError, match="lr"):
        methods.dynamic_hypergradient([P["y0"]], [x], f, F, 60, 0.55, set_grad=False)


def test_implicit_diverging_lower_loop_raises_naming_ll_learning_rate():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.Implicit(ul, um, ll, lm, 1.0, 20, lower_loop=30)
    with pytest.raises(DivergenceError, match=r"ll_learning_rate.*=1 .*smaller"):
        solver.compute_gradients(None, None, None, None)
    assert um.x.grad is None


def test_bvfim_diverging_z_loop_raises_naming_z_lr():
    """Before: z ~ 1e24 made the slack huge and the barrier term vanish: a finite, wrong gradient."""
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=60, z_lr=0.6)
    with pytest.raises(DivergenceError, match=r"z-loop.*z_lr.*=0.6 .*smaller"):
        solver.compute_gradients(None, None, None, None)
    assert um.x.grad is None


def test_a_converging_loop_near_the_limit_is_not_flagged():
    """lr = 0.49 (|1 - 4 lr| = 0.96): slow but convergent; the result is plain autograd's."""
    f, F = losses(P)
    x = P["x0"].clone().requires_grad_(True)
    r = methods.dynamic_hypergradient([P["y0"]], [x], f, F, 60, 0.49, set_grad=False)
    (ref,) = torch.autograd.grad(P["F"](x, plain_rad(x, P["y0"], 60, 0.49)[-1]), x)
    assert rel_err(r.grads[0], ref) <= 1e-12


def test_escaping_a_saddle_grows_the_gradient_but_is_not_divergence():
    """f = (y^2 - 1)^2 / 4 from y = 1e-9: the gradient grows ~1e9-fold while f decreases to 0."""
    f = lambda y, h: ((y[0] ** 2 - 1) ** 2).sum() / 4 + 0 * h[0].sum()  # noqa: E731
    F = lambda y, h: ((y[0] - h[0]) ** 2).sum()  # noqa: E731
    x = torch.tensor([0.3], dtype=DT, requires_grad=True)
    r = methods.dynamic_hypergradient([torch.tensor([1e-9], dtype=DT)], [x], f, F, 120, 0.5, set_grad=False)
    assert abs(r.params[0].item() - 1) < 1e-6


# ---------------------------------------------------------------- 2. fixed-point residual in diagnostics
def test_dynamic_reports_the_last_step_as_fixed_point_residual():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.Dynamic(ll, 15, um, ul, lm, lr=0.2)
    solver.compute_gradients(None, None, None, None)
    ys = [y.detach() for y in plain_rad(P["x0"], P["y0"], 15, 0.2)]
    d = solver.diagnostics
    res = (ys[-1] - ys[-2]).norm().item()
    assert abs(d["fp_residual"] - res) <= 1e-12 * res
    assert abs(d["fp_residual_rel"] - res / max(ys[-1].norm(), ys[-2].norm()).item()) <= 1e-12


def test_implicit_reports_the_residual_at_y_T_and_it_bounds_the_distance_to_y_star():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.Implicit(ul, um, ll, lm, 0.2, 50, lower_loop=7, fixed_point_tol=math.inf)
    solver.compute_gradients(None, None, None, None)
    y7 = lm.y.detach()
    res = (0.2 * (P["A"] @ y7 - P["B"] @ P["x0"])).norm().item()  # ||Phi(y) - y|| in closed form
    d = solver.diagnostics
    assert abs(d["fp_residual"] - res) <= 1e-12 * res and d["fp_residual_rel"] > 1e-3
    rho = 1 - 0.2 * 1.0  # Phi = y - 0.2 (A y - B x) contracts with max |1 - 0.2 lambda| over lambda in [1, 4]
    assert (y7 - P["y_star"](P["x0"])).norm().item() <= res / (1 - rho)


def test_bvfim_reports_z_and_y_loop_residuals():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    solver = methods.BVFIM(ul, um, ll, ll_model=lm, lower_loop=20, y_loop=20, z_lr=0.2, y_lr=0.05)
    solver.compute_gradients(None, None, None, None)
    z = P["y0"].clone()
    zs = [z]
    for _ in range(20):  # the z-loop written here: gradient steps on f + mu1/2 |z|^2
        zs.append(zs[-1] - 0.2 * (P["A"] @ zs[-1] - P["B"] @ P["x0"] + 0.1 * zs[-1]))
    d = solver.diagnostics
    res = (zs[-1] - zs[-2]).norm().item()
    assert abs(d["fp_residual"] - res) <= 1e-10 * res
    # the y-loop's undamped step is y_lr times its last gradient; small after 20 steps
    assert abs(d["y_fp_residual"] - 0.05 * d["y_grad_norm"]) <= 1e-10 * d["y_fp_residual"]
    assert 0 < d["y_fp_residual_rel"] < 1e-4


# ---------------------------------------------------------------- 3. BVFIM in float32 and with offsets
def barrier_reference(p, x, z, mu1, mu2, theta, tau, shift=0.0):
    """Danskin's gradient at the exact minimizer of the barrier problem for the given z, in float64:
    Newton's method on psi(y) = F + theta/2 |y|^2 - tau ln(f(z) + mu1/2 |z|^2 + mu2 - f(y))."""
    A, B, x, z = p["A"], p["B"], x.to(DT), z.to(DT)

    def f(xx, y):
        return 0.5 * y @ A @ y - y @ B @ xx + shift

    def gap(xx, y):
        return (f(xx, z) - f(xx, y)) + 0.5 * mu1 * (z @ z) + mu2

    def psi(y):
        return p["F"](x, y) + 0.5 * theta * (y @ y) - tau * torch.log(gap(x, y))

    y = z.clone()
    for _ in range(50):
        g = torch.autograd.functional.jacobian(psi, y)
        H = torch.autograd.functional.hessian(psi, y)
        step = torch.linalg.solve(H, g)
        t = 1.0
        while gap(x, y - t * step) <= 0:
            t /= 2
        y = y - t * step
    assert torch.autograd.functional.jacobian(psi, y).norm() <= 1e-10
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p["F"](xx, y) - tau * torch.log(gap(xx, y)), xx)
    return grad


def run_bvfim(dtype, shift=0.0, **kw):
    A, B = P["A"].to(dtype), P["B"].to(dtype)
    f = lambda y, h: 0.5 * y[0] @ A @ y[0] - y[0] @ B @ h[0] + shift  # noqa: E731
    F = lambda y, h: P["F"](h[0].to(DT), y[0].to(DT)).to(dtype)  # noqa: E731
    x = P["x0"].to(dtype).clone().requires_grad_(True)
    return methods.bvfim_hypergradient([P["y0"].to(dtype)], [x], f, F, z_loop=50, y_loop=50, z_lr=0.2, y_lr=0.05,
                                       set_grad=False, **kw)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_bvfim_reaches_the_barrier_minimizer_in_both_dtypes(dtype, tol):
    """Before: float32 backtracked ~500 times, stopped at a y-gradient of 1e-3 and a 1e-2 error."""
    r = run_bvfim(dtype)
    ref = barrier_reference(P, P["x0"], r.z[0], r.mu1, r.mu2, r.theta, r.tau)
    assert rel_err(r.grads[0].to(DT), ref) <= tol
    assert r.y_grad_norm <= tol


@pytest.mark.parametrize("dtype, shift, tol", [(torch.float64, 1e6, 1e-9), (torch.float32, 1e3, 1e-4)])
def test_bvfim_offset_invariance_where_the_dtype_resolves_the_slack(dtype, shift, tol):
    """f + c gives the gradient of f. Before: float64 with c = 1e6 had a 2e-3 error (a stalled y-loop)."""
    r = run_bvfim(dtype, shift)
    ref = barrier_reference(P, P["x0"], r.z[0], r.mu1, r.mu2, r.theta, r.tau)  # without the offset
    assert rel_err(r.grads[0].to(DT), ref) <= tol


def test_bvfim_unresolvable_slack_is_a_clear_error():
    """float32 with f ~ 1e6: the slack ~1 carries a rounding error ~0.1. Before: 145% change in the gradient."""
    with pytest.raises(methods.SlackResolutionError, match=r"float32.*float64.*mu2"):
        run_bvfim(torch.float32, 1e6)
    r = run_bvfim(torch.float32, 1e6, slack_rtol=1.0)  # explicitly accepted: a number, flagged by the option
    assert torch.isfinite(r.grads[0]).all()


# ---------------------------------------------------------------- 4. BDA schedules
@pytest.mark.parametrize("schedule, t", [(lambda t: 1.0, 0), (lambda t: -0.1 if t == 3 else 0.2, 3),
                                         (lambda t: float("nan"), 0), (lambda t: 1.5 / (t + 1), 0)])
def test_alpha_schedule_outside_0_1_is_an_error_at_construction(schedule, t):
    ll, ul = quadratic_objectives(P)
    with pytest.raises(ValueError, match=rf"alpha_schedule\({t}\).*\[0, 1\)"):
        methods.Dynamic(ll, 10, Vec(P["x0"], "x"), ul, Vec(P["y0"], "y"), alpha=0.5, alpha_schedule=schedule)


def test_alpha_schedule_with_alpha_zero_is_an_error_not_ignored():
    ll, ul = quadratic_objectives(P)
    with pytest.raises(ValueError, match="alpha_schedule.*alpha=0"):
        methods.Dynamic(ll, 10, Vec(P["x0"], "x"), ul, Vec(P["y0"], "y"), alpha_schedule=lambda t: 0.3)


def test_alpha_schedule_is_followed():
    ll, ul = quadratic_objectives(P)
    um, lm = Vec(P["x0"], "x"), Vec(P["y0"], "y")
    sched = lambda t: 0.3 + 0.05 * t  # noqa: E731
    methods.Dynamic(ll, 10, um, ul, lm, lr=0.2, alpha=0.5, alpha_schedule=sched).compute_gradients(None, None,
                                                                                                  None, None)
    x = P["x0"].clone().requires_grad_(True)
    y = P["y0"].clone().requires_grad_(True)
    for t in range(10):  # y <- y - lr grad_y[(1 - a_t) f + a_t F], written here
        a = sched(t)
        (g,) = torch.autograd.grad((1 - a) * P["f"](x, y) + a * P["F"](x, y), y, create_graph=True)
        y = y - 0.2 * g
    (ref,) = torch.autograd.grad(P["F"](x, y), x)
    assert rel_err(um.x.grad, ref) <= 1e-12


# ---------------------------------------------------------------- 5. modules are not shadowed
@pytest.mark.parametrize("module, cls, fn", [("dynamic", "Dynamic", "dynamic_hypergradient"),
                                             ("implicit", "Implicit", "implicit_hypergradient"),
                                             ("bvfim", "BVFIM", "bvfim_hypergradient")])
def test_submodules_are_modules(module, cls, fn):
    md = importlib.import_module(f"methods.{module}")
    assert getattr(methods, module) is md
    assert getattr(md, cls) is getattr(methods, cls)
    assert getattr(md, fn) is getattr(methods, fn)


# ---------------------------------------------------------------- 6. float32 through Dynamic and Implicit
def test_dynamic_and_implicit_in_float32_match_float64_references():
    f32, F32 = losses(P, torch.float32)
    x32 = P["x0"].float().requires_grad_(True)
    r = methods.dynamic_hypergradient([P["y0"].float()], [x32], f32, F32, 20, 0.2, set_grad=False)
    x = P["x0"].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(P["F"](x, plain_rad(x, P["y0"], 20, 0.2)[-1]), x)
    assert r.grads[0].dtype == torch.float32 and rel_err(r.grads[0].double(), ref) <= 1e-5
    r = methods.implicit_hypergradient([P["y0"].float()], [x32], f32, F32, 100, 0.2, K=20, set_grad=False)
    ref = P["implicit_grad"](P["x0"], r.params[0].double())
    assert rel_err(r.grads[0].double(), ref) <= 1e-5 and r.fp_residual_rel <= 1e-6
    assert r.converged, r  # the absolute tolerance 1e-10 is floored at float32's reach (100 eps relative)


def test_implicit_float64_keeps_the_reference_documentations_absolute_tolerance():
    f64, F64 = losses(P, torch.float64)
    x = P["x0"].clone().requires_grad_(True)
    loose = methods.implicit_hypergradient([P["y0"]], [x], f64, F64, 100, 0.2, K=50, tol=1e-2, set_grad=False)
    tight = methods.implicit_hypergradient([P["y0"]], [x], f64, F64, 100, 0.2, K=50, tol=1e-12, set_grad=False)
    assert loose.iterations < tight.iterations and loose.residual <= 1e-2 and tight.residual <= 1e-12


@pytest.mark.parametrize("lr, T, top", [(0.55, 30, 1.0), (0.525, 50, 1.0), (0.6, 40, 1e-6), (0.7, 30, 1e-10)])
def test_divergence_just_above_2_over_L_is_caught_even_when_the_loss_stays_below_its_start(lr, T, top):
    """|1 - lr L| = 1.05..1.8 per step on the top mode, which may start tiny (the loss then never passes f_0)."""
    evals, Q = torch.linalg.eigh(P["A"])
    y0 = P["y_star"](P["x0"]) + 0.5 * Q[:, 0] + top * Q[:, -1]
    ll, ul = quadratic_objectives(P)
    for make in (lambda um, lm: methods.Dynamic(ll, T, um, ul, lm, lr=lr),
                 lambda um, lm: methods.Implicit(ul, um, ll, lm, lr, 20, lower_loop=T)):
        um, lm = Vec(P["x0"], "x"), Vec(y0, "y")
        with pytest.raises(DivergenceError, match="lr"):
            make(um, lm).compute_gradients(None, None, None, None)
