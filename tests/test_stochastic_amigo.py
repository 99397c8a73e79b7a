"""AmIGO against its update written here with closed-form derivatives, its convergence on the quadratic, and its
full-batch reduction to exact hypergradient descent (converging to x*)."""
import pytest
import torch

from methods.stochastic.amigo import AmIGO
from stochastic_problems import (DT, cross, grad_h, grad_x, grad_y, hvp, oracles, small_problem, sq_grad_norm,
                                 x_star, y_star)


def set_random_state(solver, names=("y", "v", "x"), seed=3, t=4):
    """Random flat y / v / x (and iteration t) on the solver; returns clones of them in ``names``' order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in names:
        setattr(solver, n, torch.randn(getattr(solver, n).shape, generator=g, dtype=DT))
        out.append(getattr(solver, n).clone())
    solver.t = t
    return out


def assert_close(pairs):
    for got, want in pairs:
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-13), (got, want)


def replay_steps(cls, batch_size, ref_solve, **kw):
    """Five steps of ``cls`` (step_size 0.3, outer_ratio 2, 3 inner steps, from a random y, v, x at t = 4) against
    the two-loop update written with the closed forms of stochastic_problems and twin oracles (same batches, in
    the documented order); ``ref_solve(pb, y, x, v, g_y, twin_inner) -> w`` is the method's approximation of
    +H^-1 g_y (and the solver's v after the step). Shared with test_stochastic_stocbio."""
    pb = small_problem()
    inner, outer = oracles(pb, batch_size)
    twin_i, twin_o = oracles(pb, batch_size)
    s = cls(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=0.3, outer_ratio=2.0,
            n_inner_steps=3, **kw)
    y, v, x = set_random_state(s)
    for _ in range(5):                                         # constant steps: rho = 0.3, gamma = 0.3 / 2
        s.step()
        for _ in range(3):
            y = y - 0.3 * grad_y(pb.inner, y, x, twin_i.sample())
        bo = twin_o.sample()
        g_y, g_x = grad_y(pb.outer, y, x, bo), grad_x(pb.outer, y, x, bo)
        v = ref_solve(pb, y, x, v, g_y, twin_i)
        x = x - 0.15 * (g_x - cross(pb.inner, v, twin_i.sample()))
        assert_close(((s.y, y), (s.v, v), (s.x, x)))
        assert (inner.samples_drawn, outer.samples_drawn) == (twin_i.samples_drawn, twin_o.samples_drawn)
    assert s.t == 9


def amigo_v(pb, y, x, v, g_y, twin_inner):
    for _ in range(3):                                         # SGD on 1/2 v^T H v - g_y . v, warm started
        v = v - 0.3 * (hvp(pb.inner, v, twin_inner.sample()) - g_y)
    return v


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_amigo_steps_equal_the_paper_update(batch_size):
    replay_steps(AmIGO, batch_size, amigo_v)


def run_to_target(solver, pb, n_steps, calls_per_step):
    """Runs from x = -2 (||grad h||^2 = 7.9) for n_steps; asserts ||grad h(x)||^2 < 1e-3 x its start at the end,
    still falling at the thirds, and the oracle calls; returns the values at 0, 1/3, 2/3, 3/3 of the run."""
    start = sq_grad_norm(pb, solver.x)
    res = solver.run(n_steps, eval_every=n_steps // 3, callback=lambda s: sq_grad_norm(pb, s.x))
    values = [h["value"] for h in res.history]
    assert values[0] == start and start > 1.0
    assert values[-1] < 1e-3 * start, values                   # the stated target within n_steps
    assert values[1] > values[2] > values[3], values           # and still falling
    assert res.oracle_calls == n_steps * calls_per_step
    return values


def test_amigo_converges_on_the_quadratic_with_the_benchmark_defaults():
    pb = small_problem()
    s = AmIGO(*oracles(pb, 64), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT))  # 0.1, 1, 10 inner steps
    # measured: 7.9 -> 2.5e-2, 4.3e-3, 7.5e-4 at steps 100, 200, 300
    run_to_target(s, pb, 300, 3 * 10 + 3)     # 10 grads + 10 HVPs (2 each) + 1 cross (2) + 1 outer grad


def test_amigo_full_batch_many_inner_steps_is_one_step_of_exact_hypergradient_descent():
    """Full batches, 300 inner steps from a bad (y, v): y -> y*(x), v -> +H^-1 grad_y F (the sign of this
    module), and the x step is x - gamma grad h(x)."""
    pb = small_problem()
    s = AmIGO(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0,
              outer_ratio=4.0, n_inner_steps=300)
    y0, v0, x = set_random_state(s)
    s.step()
    f, F = pb.inner, pb.outer
    ys = y_star(pb, x)
    v_star = torch.linalg.solve(f.H, F.H @ ys + F.C.T @ x + F.l)
    # measured errors: 2.5e-12 (y), 6.3e-12 (v), 5.3e-14 (x); the x step itself is 0.25 |grad h| = 0.30
    assert torch.allclose(s.y, ys, rtol=0, atol=1e-10) and float((y0 - ys).norm()) > 1.0
    assert torch.allclose(s.v, v_star, rtol=0, atol=1e-10) and float((v0 - v_star).norm()) > 1.0
    assert torch.allclose(s.x, x - 0.25 * grad_h(pb, x), rtol=0, atol=1e-12)


def test_amigo_full_batch_constant_steps_converges_linearly_to_x_star():
    pb = small_problem()
    s = AmIGO(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0,
              n_inner_steps=5)
    xs = x_star(pb)
    res = s.run(300, eval_every=100, callback=lambda s: float((s.x - xs).norm()))
    errs = [h["value"] for h in res.history][1:]
    rates = [b / a for a, b in zip(errs, errs[1:])]
    # measured: |x - x*| = 1.8e-4, 1.5e-8, 1.2e-12 after 100, 200, 300 steps (|x*| = 1.7; rate 8.3e-5)
    assert errs[-1] < 1e-10 * float(xs.norm()), errs
    assert max(rates) < 1e-3 and max(rates) / min(rates) < 1.5, rates   # a constant factor per 100 steps


@pytest.mark.parametrize("kw, name", [(dict(n_inner_steps=0), "n_inner_steps"),
                                      (dict(n_inner_steps=2.0), "n_inner_steps"),
                                      (dict(n_inner_steps=True), "n_inner_steps"), (dict(step_size=-0.1), "step_size"),
                                      (dict(outer_ratio=0.0), "outer_ratio")])
def test_amigo_rejects_bad_arguments_naming_them(kw, name):
    pb = small_problem()
    with pytest.raises(ValueError, match=name):
        AmIGO(*oracles(pb, 16), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), **kw)
