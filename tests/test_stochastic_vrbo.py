"""VRBO against its update written here with closed-form derivatives (full-batch refreshes, then an inner loop of
recursive corrections with the joint Neumann series), its period, its corrections taken at the current x, and its
convergence."""
import pytest
import torch

from methods.stochastic.vrbo import VRBO
from stochastic_problems import (DT, cross, grad_x, grad_y, hvp, oracles, small_problem, sq_grad_norm, x_star,
                                 zeros, neumann)




def random_state(s, seed=3, t=10):
    g = torch.Generator().manual_seed(seed)
    names = ("y", "x", "y_old", "d_y", "d_x")
    for n in names:
        setattr(s, n, torch.randn(getattr(s, n).shape, generator=g, dtype=DT))
    s.t = t
    return [getattr(s, n).clone() for n in names]


def reference_step(pb, t, period, state, inner, twin_i, twin_o, c=0.3, ratio=2.0, n_inner=2, K=2):
    """One VRBO outer iteration as in benchmark_bilevel's solvers/vrbo.py and inner_loop_vrbo (closed-form
    derivatives, twin batches); returns the new state, the last Neumann result and the oracle calls."""
    y, x, y0, dy, dx = state
    f, F = pb.inner, pb.outer
    rho = eta = c
    gamma = c / ratio
    b_in, b_out = twin_i.batch_size, twin_o.batch_size
    calls, w = 0.0, None
    if t % period == 0:                                               # full-batch directions at (y, x)
        fi, fo = inner.full(), twin_o.full()
        w = neumann(grad_y(F, y, x, fo), [lambda v: hvp(f, v, fi)] * K, eta)
        dy, dx = grad_y(f, y, x, fi), grad_x(F, y, x, fo) - cross(f, w, fi)
        calls += (2 + 2 * K) * f.n / b_in + F.n / b_out
    x = x - gamma * dx
    for _ in range(n_inner):                                          # corrections between y_old and y, current x
        bi, bo = twin_i.sample(), twin_o.sample()
        batches = [twin_i.sample() for _ in range(K)]
        hvps = [lambda v, B=B: hvp(f, v, B) for B in batches]
        dy = dy + grad_y(f, y, x, bi) - grad_y(f, y0, x, bi)
        w = neumann(grad_y(F, y, x, bo), hvps, eta)
        w0 = neumann(grad_y(F, y0, x, bo), hvps, eta)
        dx = dx + (grad_x(F, y, x, bo) - cross(f, w, bi)) - (grad_x(F, y0, x, bo) - cross(f, w0, bi))
        y0, y = y, y - rho * dy
        calls += (4 * bi.size + 4 * sum(B.size for B in batches)) / b_in + 2 * bo.size / b_out
    return [y, x, y0, dy, dx], w, calls


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_vrbo_steps_equal_the_paper_update(batch_size):
    pb = small_problem()
    inner, outer = oracles(pb, batch_size)
    twin_i, twin_o = oracles(pb, batch_size)
    s = VRBO(inner, outer, *zeros(), step_size=0.3, outer_ratio=2.0, n_inner_steps=2, n_shia_steps=2,
             period_frac=0.125)
    period = max(1, int((256 + 128) * 0.125 / inner.batch_size))      # the benchmark's period
    assert s.period == period == {16: 3, 48: 1, "full": 1}[batch_size]
    state = random_state(s)
    calls, refreshes = 0.0, 0
    for t in range(10, 16):                                           # batch 16: refreshes at t = 12 and 15
        s.step()
        state, w, c = reference_step(pb, t, period, state, inner, twin_i, twin_o)
        calls += c
        refreshes += t % period == 0
        for got, want in zip((s.y, s.x, s.y_old, s.d_y, s.d_x, s.v), state + [w]):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert s.t == 16 and refreshes == {16: 2, 48: 6, "full": 6}[batch_size]
    assert s.oracle_calls == pytest.approx(calls, rel=1e-14)
    assert inner.samples_drawn == twin_i.samples_drawn and outer.samples_drawn == twin_o.samples_drawn


def test_vrbo_period_and_first_iteration_refresh():
    pb = small_problem()
    f, F = pb.inner, pb.outer
    inner, outer = oracles(pb, 16)
    assert VRBO(inner, outer, *zeros(), period_frac=128).period == int(384 * 128 / 16) == 3072   # its solver file's
    assert VRBO(inner, outer, *zeros()).period == 1                                    # our default, 0.01
    assert VRBO(inner, outer, *zeros(), period_frac=0.01).period == 1                  # its tuned setting: >= 1
    assert VRBO(*oracles(pb, 16, outer_batch_size=32), *zeros(), period_frac=0.125).period == 3   # inner batch
    g = torch.Generator().manual_seed(5)
    y0, x0 = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = VRBO(inner, outer, y0, x0, step_size=0.3, n_inner_steps=1, n_shia_steps=0, period_frac=128)
    assert torch.equal(s.y_old, y0)
    s.step()
    fi, fo = inner.full(), outer.full()
    d_y = grad_y(f, y0, x0, fi)                           # y_old = y0: the first correction is zero
    d_x = grad_x(F, y0, x0, fo) - cross(f, 0.3 * grad_y(F, y0, x0, fo), fi)
    for got, want in ((s.d_y, d_y), (s.x, x0 - 0.3 * d_x), (s.y_old, y0), (s.y, y0 - 0.3 * d_y)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    assert inner.samples_drawn == outer.samples_drawn == 16                             # only the inner step draws
    assert s.oracle_calls == (2 * 256 / 16 + 128 / 16) + (4 + 2)


def test_vrbo_corrections_track_y_at_the_current_x_so_the_directions_keep_the_refresh_x():
    """The benchmark's order: between refreshes, every correction compares (y, x) with (y_old, x) at the current
    x, so with full batches the directions stay exactly those of the last refresh's x at the latest y_old."""
    pb = small_problem()
    f, F = pb.inner, pb.outer
    inner, outer = oracles(pb, "full")
    fi, fo = inner.full(), outer.full()
    g = torch.Generator().manual_seed(6)
    y0, x0 = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = VRBO(inner, outer, y0, x0, step_size=0.3, n_inner_steps=3, n_shia_steps=4, period_frac=128)  # one refresh

    def p(y, x):
        return grad_x(F, y, x, fo) - cross(f, neumann(grad_y(F, y, x, fo), [lambda v: hvp(f, v, fi)] * 4, 0.3), fi)

    for _ in range(4):
        s.step()
        assert torch.allclose(s.d_y, grad_y(f, s.y_old, x0, fi), rtol=1e-12, atol=1e-13)
        assert torch.allclose(s.d_x, p(s.y_old, x0), rtol=1e-12, atol=1e-13)
    assert s.period == 192 and float((s.x - x0).norm()) > 0.1 and s.t == 4                # x has moved


def test_vrbo_converges_on_the_quadratic():
    """period_frac 0.01 (the benchmark's tuned setting; period 1 here), step_size 0.5, outer_ratio 0.5, 3 inner
    steps with 5 Neumann terms each."""
    pb = small_problem()
    s = VRBO(*oracles(pb, 16), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5,
             outer_ratio=0.5, n_inner_steps=3, n_shia_steps=5, period_frac=0.01)
    res = s.run(60, eval_every=20, callback=lambda s: sq_grad_norm(pb, s.x))
    values = {h["step"]: h["value"] for h in res.history}
    assert values[0] > 7.0
    assert values[60] < 1e-3 * values[0], values                  # measured 1.6e-4 x start (seeds 0-2)
    assert values[20] > values[40] > values[60]
    assert res.oracle_calls == 60 * ((2 + 10) * 16 + 8 + 3 * (24 + 2))


def test_vrbo_full_batch_with_period_1_converges_to_x_star():
    """A well-conditioned problem (grad2_yy f in [0.8, 1.1]: 10 Neumann terms with step 1 leave 4e-11) so the
    truncated hypergradient's stationary point is x* to that accuracy; full batches, a refresh every iteration."""
    pb = small_problem(mu=0.9, L_cross_inner=0.5, n_inner=1024)
    s = VRBO(*oracles(pb, "full"), *zeros(), step_size=1.0, outer_ratio=2.0, n_inner_steps=2, n_shia_steps=10,
             period_frac=0.01)
    assert s.period == 1
    xs = x_star(pb)
    errs = [float((s.run(n).hparams[0] - xs).norm() / xs.norm()) for n in (10, 40)]
    assert errs[1] < 1e-8 and errs[1] < 1e-5 * errs[0], errs          # measured 1.1e-2, then 6.7e-10


def test_vrbo_bad_arguments_raise_naming_them():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    for bad in (0.0, -0.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="period_frac"):
            VRBO(inner, outer, *zeros(), period_frac=bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_inner_steps"):
            VRBO(inner, outer, *zeros(), n_inner_steps=bad)
    for bad in (-1, 2.0, False):
        with pytest.raises(ValueError, match="n_shia_steps"):
            VRBO(inner, outer, *zeros(), n_shia_steps=bad)
    with pytest.raises(ValueError, match="step_size"):
        VRBO(inner, outer, *zeros(), step_size=-0.1)
    with pytest.raises(ValueError, match="outer_ratio"):
        VRBO(inner, outer, *zeros(), outer_ratio=0.0)
