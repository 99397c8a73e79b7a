"""SOBA against its update written here with closed-form derivatives, and its convergence on the quadratic."""
import math

import pytest
import torch

from methods.stochastic import SOBA
from stochastic_problems import (DT, cross, grad_x, grad_y, hvp, oracles, random_state, small_problem,
                                 sq_grad_norm, x_star)


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_soba_steps_equal_the_paper_update(batch_size):
    pb = small_problem()
    inner, outer = oracles(pb, batch_size)
    twin_i, twin_o = oracles(pb, batch_size)
    s = SOBA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=0.3, outer_ratio=2.0)
    y, v, x = random_state(s)
    for t in range(4, 9):
        s.step()
        bi, bo = twin_i.sample(), twin_o.sample()
        rho = 0.3 / math.sqrt(t + 1)
        gamma = rho / 2.0
        d_y = grad_y(pb.inner, y, x, bi)
        d_v = hvp(pb.inner, v, bi) + grad_y(pb.outer, y, x, bo)
        d_x = cross(pb.inner, v, bi) + grad_x(pb.outer, y, x, bo)
        y, v, x = y - rho * d_y, v - rho * d_v, x - gamma * d_x
        for got, want in ((s.y, y), (s.v, v), (s.x, x)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    assert s.t == 9


def test_soba_converges_on_the_quadratic():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    s = SOBA(inner, outer, torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5)
    start = sq_grad_norm(pb, s.x)
    res = s.run(3000, eval_every=1000, callback=lambda s: sq_grad_norm(pb, s.x))
    values = [h["value"] for h in res.history]
    assert values[0] == start and start > 1.0
    assert values[-1] < 1e-3 * start, values                 # the stated target within 3000 steps
    assert values[1] > values[2] > values[3]                 # and still falling
    assert res.oracle_calls == 3000 * 3 and res.approximate


def test_soba_full_batch_constant_steps_is_the_deterministic_dynamics_converging_linearly_to_x_star():
    pb = small_problem()
    inner, outer = oracles(pb, "full")
    s = SOBA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0, decay=0.0)
    xs = x_star(pb)
    errs = []
    for _ in range(4):
        s.run(200)
        errs.append(float((s.x - xs).norm()))
    rates = [b / a for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 1e-12 * float(xs.norm()), errs
    assert max(rates) < 1e-2 and max(rates) / min(rates) < 1.5, rates   # a constant factor per 200 steps


def test_soba_too_large_steps_raise_divergence_naming_the_step_size():
    from hypergrad import DivergenceError
    pb = small_problem()
    s = SOBA(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0,
             outer_ratio=0.5, decay=0.0)
    with pytest.raises(DivergenceError, match="reduce step_size=1.0"):
        s.run(500)
