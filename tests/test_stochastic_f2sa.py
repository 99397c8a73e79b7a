"""F2SA against its update written here with closed-form derivatives, its convergence on the quadratic, and
its full-batch reduction: with a fixed multiplier lambda and constant steps the iteration converges to the
minimizer x_lambda of the penalty function, which the test computes by dense solves and which is O(1/lambda)
from x* (measured: lambda ||x_lambda - x*|| = 0.74, 0.40, 0.48, 0.49 at lambda = 1, 10, 100, 1000)."""
import pytest
import torch

from hypergrad import DivergenceError
from methods.stochastic.f2sa import F2SA
from stochastic_problems import DT, grad_x, grad_y, oracles, small_problem, sq_grad_norm, x_star, y_star


def random_state(solver, seed=3, t=4, lmbda=2.5):
    g = torch.Generator().manual_seed(seed)
    solver.y = torch.randn(solver.y.shape, generator=g, dtype=DT)
    solver.z = torch.randn(solver.z.shape, generator=g, dtype=DT)
    solver.x = torch.randn(solver.x.shape, generator=g, dtype=DT)
    solver.t, solver.lmbda = t, lmbda
    return solver.y.clone(), solver.z.clone(), solver.x.clone()


# 48: 256 = 5 x 48 + 16, an incomplete last block; the outer oracle has its own batch size
@pytest.mark.parametrize("batch_size,outer_batch_size", [(16, 32), (48, 16), ("full", "full")])
def test_f2sa_steps_equal_the_paper_update(batch_size, outer_batch_size):
    pb = small_problem()
    inner, outer = oracles(pb, batch_size, outer_batch_size=outer_batch_size)
    ti, to = oracles(pb, batch_size, outer_batch_size=outer_batch_size)
    n_in, c, ratio, dl = 3, 0.3, 2.0, 0.2
    s = F2SA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=c, outer_ratio=ratio,
             delta_lmbda=dl, n_inner_steps=n_in)
    y, z, x = random_state(s)
    lam = 2.5
    for t in range(4, 8):
        s.step()
        alpha, gamma = c / (t + 1) ** (5 / 7), c / (t + 1) ** (4 / 7)
        xi, delta = c / ratio / (t + 1) ** (4 / 7), dl / (t + 1) ** (1 / 7)
        for _ in range(n_in):
            b1, b2, b3 = ti.sample(), ti.sample(), to.sample()       # y's f batch, z's batch, y's F batch
            y, z = (y - alpha * (lam * grad_y(pb.inner, y, x, b1) + grad_y(pb.outer, y, x, b3)),
                    z - gamma * grad_y(pb.inner, z, x, b2))
        b4, b5, b6 = to.sample(), ti.sample(), ti.sample()           # x's F batch, f at y, f at z
        x = x - xi * (grad_x(pb.outer, y, x, b4) + lam * (grad_x(pb.inner, y, x, b5) - grad_x(pb.inner, z, x, b6)))
        lam = lam + delta
        for got, want in ((s.y, y), (s.z, z), (s.x, x)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
        assert s.lmbda == pytest.approx(lam, rel=1e-15)
    assert s.t == 8
    if batch_size == 16:   # 3 x (2 inner + 1 outer) + 1 outer + 2 inner gradients per iteration, 4 iterations
        assert s.oracle_calls == 4 * 12


def test_f2sa_default_multiplier_schedule_and_carried_z():
    pb = small_problem()
    s = F2SA(*oracles(pb, 16), torch.zeros(8, dtype=DT), -torch.ones(3, dtype=DT))
    assert (s.step_size, s.outer_ratio, s.lmbda, s.delta_lmbda, s.n_inner_steps) == (0.01, 1.0, 1.0, 0.1, 10)
    assert not s.uses_v and len(s._state()) == 3 and s._state()[2] is s.z
    s.run(3)
    assert s.lmbda == pytest.approx(1 + 0.1 * sum((k + 1) ** (-1 / 7) for k in range(3)), rel=1e-14)
    z = s.z
    s.z = torch.full_like(z, 1e12)            # z is watched by the per-step safety check
    with pytest.raises(DivergenceError, match="exceeds max_norm"):
        s.step()


def test_f2sa_converges_on_the_quadratic():
    """Tuned steps (the benchmark's 0.01 default moves x slowly on this problem): 1500 iterations of 3 inner
    steps at batch 64 (the benchmark's batch size), lambda 2 -> 8.2 with delta_lmbda 0.01 (the benchmark's
    tuned value for quadratics). Measured: ||grad h||^2 = 7.92 -> 1.5e-2, 3.2e-3, 2.6e-3 at 500, 1000, 1500
    (3.3e-4 x start; seeds 1, 2: 3.0e-4, 3.6e-4 x start)."""
    pb = small_problem()
    s = F2SA(*oracles(pb, 64), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5,
             lmbda0=2.0, delta_lmbda=0.01, n_inner_steps=3)
    start = sq_grad_norm(pb, s.x)
    res = s.run(1500, eval_every=500, callback=lambda s: sq_grad_norm(pb, s.x))
    values = [h["value"] for h in res.history]
    assert values[0] == start and start > 7.0
    assert values[-1] < 1e-3 * start, values                  # the stated target within 1500 iterations
    assert values[1] > values[2] and values[1] > values[3], values
    assert res.oracle_calls == 1500 * 12 and res.approximate


# -- full batches: the penalty problem in closed form ----------------------------------------------
def y_lam(pb, x, lam):
    """argmin_y F(y, x) + lam f(y, x)."""
    f, F = pb.inner, pb.outer
    return -torch.linalg.solve(F.H + lam * f.H, F.C.T @ x + F.l + lam * (f.C.T @ x + f.l))


def penalty_grad(pb, x, lam):
    """The gradient of x -> min_y L_lam(y, y*(x), x): grad_x F(y_lam) + lam (grad_x f(y_lam) - grad_x f(y*))."""
    f, F = pb.inner, pb.outer
    yl = y_lam(pb, x, lam)
    return F.G @ x + F.C @ yl + F.m + lam * (f.C @ (yl - y_star(pb, x)))


def x_lam(pb, lam):
    """The minimizer of the (quadratic) penalty function: its gradient is affine in x."""
    b = penalty_grad(pb, torch.zeros(3, dtype=DT), lam)
    A = torch.stack([penalty_grad(pb, e, lam) - b for e in torch.eye(3, dtype=DT)], 1)
    return torch.linalg.solve(A, -b)


@pytest.mark.parametrize("lam", [1.0, 10.0, 100.0, 1000.0])
def test_f2sa_full_batch_fixed_point_is_the_penalty_minimizer_O_1_over_lambda_from_x_star(lam):
    pb = small_problem()
    xl = x_lam(pb, lam)
    s = F2SA(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=0.5 / lam,
             lmbda0=lam, delta_lmbda=0.0, n_inner_steps=2)    # the default decaying schedules (any steps do)
    s.y, s.z, s.x = y_lam(pb, xl, lam), y_star(pb, xl), xl.clone()
    s.run(3)
    for got, want in ((s.y, y_lam(pb, xl, lam)), (s.z, y_star(pb, xl)), (s.x, xl)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    bias = lam * float((xl - x_star(pb)).norm())
    assert 0.35 < bias < 0.8, bias                            # ||x_lam - x*|| = O(1/lam), constant ~0.49 / lam


def test_f2sa_full_batch_constant_steps_converge_linearly_to_the_penalty_minimizer():
    """lambda = 4, constant steps (decay 0): measured ||x - x_lambda|| = 4.6e-4, 2.7e-7, 7.1e-11 after 100,
    200, 300 iterations (factors 6.0e-4, 2.6e-4 per 100); x_lambda is 0.098 from x* (0.39 / lambda)."""
    pb = small_problem()
    lam = 4.0
    xl, xs = x_lam(pb, lam), x_star(pb)
    s = F2SA(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=0.4,
             outer_ratio=0.4, lmbda0=lam, delta_lmbda=0.0, n_inner_steps=5, decay=(0, 0, 0, 0))
    errs = []
    for _ in range(3):
        s.run(100)
        errs.append(float((s.x - xl).norm()))
    rates = [b / a for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 1e-9, errs
    assert max(rates) < 1.5e-3, rates                                     # (at least) linear
    assert torch.allclose(s.z, y_star(pb, s.x), atol=1e-9) and torch.allclose(s.y, y_lam(pb, s.x, lam), atol=1e-9)
    assert 0.3 < lam * float((s.x - xs).norm()) < 0.5


@pytest.mark.parametrize("kw,name", [({"step_size": 0.0}, "step_size"), ({"outer_ratio": -1.0}, "outer_ratio"),
                                     ({"lmbda0": 0.0}, "lmbda0"), ({"delta_lmbda": -0.1}, "delta_lmbda"),
                                     ({"n_inner_steps": 0}, "n_inner_steps"), ({"n_inner_steps": 2.0}, "n_inner_steps"),
                                     ({"decay": (1, 2, 3)}, "decay"), ({"decay": (0, 0, -1, 0)}, r"decay\[2\]")])
def test_f2sa_bad_arguments_raise_naming_them(kw, name):
    pb = small_problem()
    with pytest.raises(ValueError, match=name):
        F2SA(*oracles(pb, 16), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), **kw)
