"""SABA against its update written here with closed-form derivatives and per-block memories, the unbiasedness of
its SAGA directions for any memory, its full-memory start, and its linear convergence on a finite sum."""
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from methods.stochastic import SOBA, FiniteSum
from methods.stochastic.saba import SABA
from stochastic_problems import (DT, cross, grad_x, grad_y, hvp, oracles, small_problem, sq_grad_norm, x_star,
                                 zeros, reads)

from stochastic_problems import random_state as shared_random_state  # noqa: E402

NAMES = ("inner_grad", "hvp", "cross_v", "grad_in_outer", "grad_out_outer")



def random_state(solver, seed=3, t=4):
    """A random (y, v, x) and random memory tables (their means consistent); returns copies."""
    g = torch.Generator().manual_seed(seed)
    y, v, x = shared_random_state(solver, t=t, g=g)
    for k in NAMES:
        solver.memory[k] = torch.randn(solver.memory[k].shape, generator=g, dtype=DT)
        solver.memory_mean[k] = solver.memory[k].mean(0)
    return y, v, x, {k: m.clone() for k, m in solver.memory.items()}


def block_quantities(pb, y, v, x, bi, bo):
    """The five per-batch quantities in closed form, by memory name."""
    return {"inner_grad": grad_y(pb.inner, y, x, bi), "hvp": hvp(pb.inner, v, bi), "cross_v": cross(pb.inner, v, bi),
            "grad_in_outer": grad_y(pb.outer, y, x, bo), "grad_out_outer": grad_x(pb.outer, y, x, bo)}


def log_slope(points):
    """Least-squares slope of log(value) against the step."""
    t = torch.tensor([s for s, _ in points], dtype=DT)
    A = torch.stack([t, torch.ones_like(t)], 1)
    logs = torch.tensor([v for _, v in points], dtype=DT).log()[:, None]
    return float(torch.linalg.lstsq(A, logs).solution[0, 0])


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_saba_steps_equal_the_paper_update(batch_size):
    pb = small_problem()
    inner, outer = oracles(pb, batch_size)
    twin_i, twin_o = oracles(pb, batch_size)
    s = SABA(inner, outer, *zeros(), step_size=0.3, outer_ratio=2.0)
    y, v, x, mem = random_state(s)
    rho, gamma = 0.3, 0.15                                           # constant steps
    calls = 0.0
    for _ in range(20):                                              # > 1 epoch of each oracle: rows get reused
        s.step()
        bi, bo = twin_i.sample(), twin_o.sample()
        q = block_quantities(pb, y, v, x, bi, bo)
        calls += 2 * bi.size / inner.batch_size + bo.size / outer.batch_size
        d = {}
        for k in NAMES:                                              # SAGA: phi_k - m_k + mean of the table
            b = bi.block if k in ("inner_grad", "hvp", "cross_v") else bo.block
            d[k] = q[k] - mem[k][b] + mem[k].mean(0)
            mem[k] = mem[k].clone()
            mem[k][b] = q[k]
        y, v, x = (y - rho * d["inner_grad"], v - rho * (d["hvp"] + d["grad_in_outer"]),
                   x - gamma * (d["cross_v"] + d["grad_out_outer"]))
        for got, want in ((s.y, y), (s.v, v), (s.x, x)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
        for k in NAMES:
            assert torch.allclose(s.memory[k], mem[k], rtol=1e-12, atol=1e-13)
            assert torch.allclose(s.memory_mean[k], mem[k].mean(0), rtol=1e-12, atol=1e-13)  # running = true mean
    assert s.t == 24 and s.oracle_calls == pytest.approx(calls, rel=1e-15)
    assert s.memory["inner_grad"].shape == (inner.n_blocks, 8)
    assert s.memory["grad_out_outer"].shape == (outer.n_blocks, 3)


def test_saba_directions_are_unbiased_for_any_memory():
    """E over the sampled blocks of the SAGA directions = the full-batch directions, whatever the memory."""
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    assert inner.n_blocks == 2 * outer.n_blocks
    ds = []
    for k in range(inner.n_blocks):                                  # inner block k with outer block k mod 8
        s = SABA(inner, outer, *zeros(), step_size=1.0)              # rho = gamma = 1: the step is the direction
        y, v, x, _ = random_state(s)
        s.inner.sample = lambda k=k: inner.block(k)
        s.outer.sample = lambda k=k: outer.block(k % outer.n_blocks)
        s.step()
        ds.append(torch.cat([y - s.y, v - s.v, x - s.x]))
    full_i, full_o = inner.full(), outer.full()
    want = torch.cat([grad_y(pb.inner, y, x, full_i), hvp(pb.inner, v, full_i) + grad_y(pb.outer, y, x, full_o),
                      cross(pb.inner, v, full_i) + grad_x(pb.outer, y, x, full_o)])
    got = torch.stack(ds).mean(0)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert (torch.stack(ds) - want).abs().max() > 0.1                # while each single direction is not


def test_saba_full_memory_first_direction_is_the_full_batch_direction():
    pb = small_problem()
    inner, outer = oracles(pb, 48)                                   # incomplete last blocks on both sides
    g = torch.Generator().manual_seed(7)
    y0, x0 = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = SABA(inner, outer, y0, x0, step_size=0.3, outer_ratio=2.0, init_memory="full")
    # the fill: every block at (y0, v0 = 0, x0), one pass over each oracle, counted
    assert s.oracle_calls == 2 * 256 / 48 + 128 / 48
    v0 = torch.zeros(8, dtype=DT)
    for k in range(inner.n_blocks):
        assert torch.allclose(s.memory["inner_grad"][k], grad_y(pb.inner, y0, x0, inner.block(k)), rtol=1e-12)
    for k in range(outer.n_blocks):
        assert torch.allclose(s.memory["grad_out_outer"][k], grad_x(pb.outer, y0, x0, outer.block(k)), rtol=1e-12)
    s.step()
    # phi_k - m_k = 0 at the starting point: the step is the deterministic (full-batch) step of the framework
    fi, fo = inner.full(), outer.full()
    y1 = y0 - 0.3 * grad_y(pb.inner, y0, x0, fi)
    v1 = v0 - 0.3 * (hvp(pb.inner, v0, fi) + grad_y(pb.outer, y0, x0, fo))
    x1 = x0 - 0.15 * (cross(pb.inner, v0, fi) + grad_x(pb.outer, y0, x0, fo))
    for got, want in ((s.y, y1), (s.v, v1), (s.x, x1)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    # with zero memory the first direction is the block's own estimate instead (not the full one)
    z = SABA(*oracles(pb, 48), y0, x0, step_size=0.3, outer_ratio=2.0)
    twin_i, _ = oracles(pb, 48)
    z.step()
    assert z.oracle_calls == 3
    assert torch.allclose(z.y, y0 - 0.3 * grad_y(pb.inner, y0, x0, twin_i.sample()), rtol=1e-12)
    assert not torch.allclose(z.y, y1, rtol=1e-3)


def test_saba_converges_linearly_on_a_finite_sum_down_to_the_float64_floor_where_soba_is_sublinear():
    pb = small_problem()
    s = SABA(*oracles(pb, 16), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5)
    res = s.run(1500, eval_every=10, callback=lambda s: sq_grad_norm(pb, s.x))
    pts = [(h["step"], h["value"]) for h in res.history]
    vals = dict(pts)
    assert vals[0] > 1.0
    # log ||grad h||^2 against t, after a 100-step transient: a straight line of slope ~ -0.046 (measured
    # -0.045 .. -0.048 over 5 seeds), the same over both halves of the window (linear, not a slowing rate)
    for a, b in ((100, 700), (100, 400), (400, 700)):
        assert log_slope([p for p in pts if a <= p[0] <= b]) < -0.035, (a, b)
    assert vals[1200] < 1e-20                                        # measured: below 1e-20 from step ~950
    assert vals[1500] < 1e-28                                        # measured 3e-32 .. 4e-31: the float64 floor
    assert res.oracle_calls == 1500 * 3
    # SOBA from the same start (its default decreasing steps, same constant): its rate fades, ~1e-2 at 700 steps
    soba = SOBA(*oracles(pb, 16), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5)
    pts = [(h["step"], h["value"]) for h in
           soba.run(700, eval_every=10, callback=lambda s: sq_grad_norm(pb, s.x)).history]
    assert log_slope([p for p in pts if 400 <= p[0] <= 700]) > -0.005  # measured -0.0007 .. -0.0016
    assert dict(pts)[700] > 1e-3


def test_saba_full_memory_converges_linearly_too():
    pb = small_problem()
    s = SABA(*oracles(pb, 16), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5,
             init_memory="full")
    res = s.run(1000, eval_every=10, callback=lambda s: sq_grad_norm(pb, s.x))
    pts = [(h["step"], h["value"]) for h in res.history]
    assert log_slope([p for p in pts if 100 <= p[0] <= 700]) < -0.035   # measured -0.045 .. -0.048
    assert dict(pts)[1000] < 1e-18                                     # measured 1e-21 .. 1e-20


def test_saba_full_batch_is_the_deterministic_dynamics_converging_to_x_star():
    """One block: phi - m + m = phi, so SABA is gradient descent on the framework's three directions."""
    pb = small_problem()
    inner, outer = oracles(pb, "full")
    s = SABA(inner, outer, *zeros(), step_size=1.0, outer_ratio=1.0)
    fi, fo = inner.full(), outer.full()
    y, x = zeros()
    v = torch.zeros(8, dtype=DT)
    for _ in range(50):
        s.step()
        y, v, x = (y - grad_y(pb.inner, y, x, fi), v - (hvp(pb.inner, v, fi) + grad_y(pb.outer, y, x, fo)),
                   x - (cross(pb.inner, v, fi) + grad_x(pb.outer, y, x, fo)))
        for got, want in ((s.y, y), (s.v, v), (s.x, x)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    s.run(750)
    xs = x_star(pb)
    assert float((s.x - xs).norm()) < 1e-12 * float(xs.norm())


def test_saba_bad_arguments_raise_naming_them():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    with pytest.raises(ValueError, match="init_memory"):
        SABA(inner, outer, *zeros(), init_memory="ones")
    with pytest.raises(ValueError, match="step_size"):
        SABA(inner, outer, *zeros(), step_size=-0.1)
    with pytest.raises(ValueError, match="outer_ratio"):
        SABA(inner, outer, *zeros(), outer_ratio=0.0)
    custom = FiniteSum(pb.inner.batch_loss, pb.inner.n, 16,
                       sampler=BatchSampler(SequentialSampler(range(pb.inner.n)), 16, False))
    with pytest.raises(ValueError, match="SABA needs FiniteSum's blocks"):
        SABA(custom, outer, *zeros())
    s = SABA(inner, outer, *zeros())
    inner.sampler = custom.sampler                                   # a sampler attached after construction
    with pytest.raises(ValueError, match="SABA needs FiniteSum's blocks"):
        s.step()


def test_saba_too_large_steps_raise_divergence_naming_the_step_size():
    from hypergrad import DivergenceError
    pb = small_problem()
    s = SABA(*oracles(pb, 16), *zeros(), step_size=5.0)
    with pytest.raises(DivergenceError, match="reduce step_size=5.0"):
        s.run(500)



def test_saba_step_reads_the_host_only_for_the_base_safety_check(host_reads):
    """Within an epoch (a new epoch's block order is one read of the oracle's own), like SOBA's step."""
    pb = small_problem()
    soba, saba = (cls(*oracles(pb, 16), *zeros()) for cls in (SOBA, SABA))
    soba.step(), saba.step()
    base = reads(host_reads, soba.step)
    assert 1 <= base <= 2 and reads(host_reads, lambda: (saba.step(), saba.step())) == 2 * base
