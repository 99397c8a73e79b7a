"""The minibatch oracle, the solvers' shared base and the deterministic solvers over the same interface."""
import math

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

import hypergrad
from methods import implicit_hypergradient
from methods.stochastic import SOBA, FiniteSum, FullBatchImplicit, FullBatchRAD
from stochastic_problems import (DT, grad_h, grad_x, grad_y, oracles, small_problem, sq_grad_norm, value, x_star,
                                 y_star)


# -- FiniteSum --------------------------------------------------------------------------------------
def test_each_epoch_visits_every_block_once_and_twins_draw_the_same_batches():
    f = FiniteSum(lambda p, h, i: i.double().mean(), 100, 16, seed=5)
    twin, other = FiniteSum(f.loss, 100, 16, seed=5), FiniteSum(f.loss, 100, 16, seed=6)
    blocks = [f.sample().block for _ in range(3 * f.n_blocks)]
    assert f.n_blocks == 7 and [b.numel() for b in f.blocks] == [16] * 6 + [4]
    for e in range(3):
        assert sorted(blocks[7 * e:7 * e + 7]) == list(range(7))
    assert blocks[:7] != blocks[7:14]                                   # a new order each epoch
    assert [twin.sample().block for _ in range(21)] == blocks
    assert [other.sample().block for _ in range(21)] != blocks
    assert torch.equal(torch.cat(f.blocks), torch.arange(100))
    shuffled = FiniteSum(f.loss, 100, 16, shuffle_samples=True)
    assert torch.equal(torch.cat(shuffled.blocks).sort().values, torch.arange(100))
    assert not torch.equal(torch.cat(shuffled.blocks), torch.arange(100))


@pytest.mark.parametrize("batch_size", [16, 48, "full"])
def test_block_estimates_are_unbiased_with_an_incomplete_last_block(batch_size):
    pb = small_problem()
    inner, _ = oracles(pb, batch_size)
    g = torch.Generator().manual_seed(1)
    y, x = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    est = [inner.value([y], [x], inner.block(k)) for k in range(inner.n_blocks)]
    full = value(pb.inner, y, x, inner.full())
    assert torch.allclose(torch.stack(est).mean(), full, rtol=1e-13)
    assert torch.allclose(inner([y], [x]), full, rtol=1e-14)          # calling the oracle: the full mean
    if batch_size == 16:
        assert all(inner.block(k).scale == 1.0 for k in range(inner.n_blocks))


def test_a_batch_sampler_replaces_the_blocks():
    sampler = BatchSampler(RandomSampler(range(10), generator=torch.Generator().manual_seed(0)), 4, False)
    f = FiniteSum(lambda p, h, i: i.double().mean(), 10, 4, sampler=sampler)
    batches = [f.sample() for _ in range(6)]
    assert all(b.block is None and b.scale == 1.0 for b in batches)
    assert [b.size for b in batches] == [4, 4, 2] * 2
    assert sorted(torch.cat([b.idx for b in batches[:3]]).tolist()) == list(range(10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss=1, n_samples=10), "loss must be a callable"),
    (dict(n_samples=0), "n_samples must be a positive int"),
    (dict(n_samples=10, batch_size=0), r"batch_size must be an int in \[1, n_samples=10\]"),
    (dict(n_samples=10, batch_size=11), "batch_size"),
    (dict(n_samples=10, batch_size=2.0), "batch_size"),
])
def test_bad_oracle_arguments_are_named(kwargs, match):
    kwargs = {"loss": lambda p, h, i: i.sum(), "batch_size": 4, **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        FiniteSum(**kwargs)


def test_a_loss_that_is_not_a_real_scalar_is_refused():
    f = FiniteSum(lambda p, h, i: p[0] * 1.0, 10, 5)
    with pytest.raises(TypeError, match="real \\(floating\\) scalar tensor, got shape \\(3,\\)"):
        f([torch.zeros(3, dtype=DT)], [torch.zeros(1, dtype=DT)])


# -- the same oracle feeds the core and the deterministic solvers -----------------------------------
def test_the_oracle_is_a_core_loss():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    x = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(2)).requires_grad_()
    res = implicit_hypergradient([y_star(pb, x.detach())], [x], inner, outer, 0, 0.5, K=50, tol=1e-13,
                                 set_grad=False)
    assert torch.allclose(res.grads[0], grad_h(pb, x.detach()), rtol=1e-10, atol=1e-12)


def test_full_batch_implicit_step_equals_gradient_descent_and_the_implicit_formula():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    g = torch.Generator().manual_seed(4)
    y0, x0 = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = FullBatchImplicit(inner, outer, y0, x0, step_size=0.5, outer_ratio=4.0, n_inner_steps=7, k=50, tol=1e-14)
    s.step()
    full_i, full_o = inner.full(), outer.full()
    y = y0.clone()
    for _ in range(7):
        y = y - 0.5 * grad_y(pb.inner, y, x0, full_i)
    F = pb.outer
    gy, gx = grad_y(F, y, x0, full_o), grad_x(F, y, x0, full_o)
    hg = gx - pb.inner.C @ torch.linalg.solve(pb.inner.H, gy)       # the implicit formula at y_T
    assert torch.allclose(s.y, y, rtol=1e-13)
    assert torch.allclose(s.x, x0 - 0.125 * hg, rtol=1e-10, atol=1e-12)
    assert s.oracle_calls == (7 + s.last.iterations + 1) * 256 / 16 + 128 / 16


def test_full_batch_rad_step_equals_autograd_through_the_steps():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    g = torch.Generator().manual_seed(4)
    y0, x0 = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = FullBatchRAD(inner, outer, y0, x0, step_size=0.5, outer_ratio=2.0, n_inner_steps=5)
    s.step()
    x = x0.clone().requires_grad_()
    y = y0.clone()
    for _ in range(5):
        y = y - 0.5 * grad_y(pb.inner, y, x, inner.full())
    (hg,) = torch.autograd.grad(value(pb.outer, y, x, outer.full()), x)
    assert torch.allclose(s.y, y.detach(), rtol=1e-13)
    assert torch.allclose(s.x, x0 - 0.25 * hg, rtol=1e-12, atol=1e-13)


def test_full_batch_implicit_converges_to_x_star():
    pb = small_problem()
    s = FullBatchImplicit(*oracles(pb, 16), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0,
                          n_inner_steps=20)
    xs = x_star(pb)
    s.run(200)
    assert float((s.x - xs).norm()) < 1e-6 * float(xs.norm())
    assert sq_grad_norm(pb, s.x) < 1e-12


def test_full_batch_rad_converges_to_a_point_whose_bias_falls_like_the_contraction_to_the_T():
    """Warm-started RAD differentiates T steps only: its limit is off x* by O(rho^T), rho = 1 - lr mu."""
    pb = small_problem()
    xs = x_star(pb)
    rho = 1 - float(torch.linalg.eigvalsh(pb.inner.H)[0])
    errs = []
    for T in (20, 40):
        s = FullBatchRAD(*oracles(pb, 16), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.0,
                         n_inner_steps=T)
        s.run(200)
        errs.append(float((s.x - xs).norm()))
    assert 0.7 < (errs[1] / errs[0]) / rho ** 20 < 1.4, (errs, rho ** 20)


# -- the base: safety, inputs, dtypes ---------------------------------------------------------------
def test_caller_tensors_are_never_written_and_params_come_back_in_shape():
    pb = small_problem()
    inner = FiniteSum(lambda p, h, i: pb.inner.loss(torch.cat([p[0].reshape(-1), p[1]]), h[0], i), 256, 16)
    outer = FiniteSum(lambda p, h, i: pb.outer.loss(torch.cat([p[0].reshape(-1), p[1]]), h[0], i), 128, 16)
    y0 = [torch.ones(2, 3, dtype=DT), torch.ones(2, dtype=DT)]
    x0 = torch.ones(3, dtype=DT)
    keep = [t.clone() for t in y0] + [x0.clone()]
    s = SOBA(inner, outer, y0, x0)
    res = s.run(20)
    assert all(torch.equal(a, b) for a, b in zip(y0 + [x0], keep))
    assert [p.shape for p in res.params] == [(2, 3), (2,)] and res.hparams[0].shape == (3,)
    assert res.steps == 20 and not torch.equal(res.hparams[0], x0)


def test_a_nan_loss_raises_naming_the_iteration():
    pb = small_problem()
    calls = {"n": 0}

    def loss(p, h, i):
        calls["n"] += 1
        out = pb.inner.batch_loss(p, h, i)
        return out * math.nan if calls["n"] == 6 else out

    s = SOBA(FiniteSum(loss, 256, 16), oracles(pb)[1], torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT))
    with pytest.raises(hypergrad.NonFiniteError, match="SOBA iteration 6: the state became NaN"):
        s.run(10)


def test_mixed_dtypes_and_bad_inputs_are_refused():
    pb = small_problem()
    inner, outer = oracles(pb)
    with pytest.raises(TypeError, match="share one dtype and device"):
        SOBA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3))
    with pytest.raises(TypeError, match="params must be a tensor"):
        SOBA(inner, outer, [], torch.zeros(3, dtype=DT))
    with pytest.raises(TypeError, match=r"hparams\[0\] has dtype torch.int64"):
        SOBA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="inner must be a methods.stochastic.FiniteSum"):
        SOBA(pb.inner.batch_loss, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        SOBA(inner, outer, torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=-1)
    with pytest.raises(hypergrad.NonFiniteError, match="params/hparams contain NaN"):
        SOBA(inner, outer, torch.full((8,), math.nan, dtype=DT), torch.zeros(3, dtype=DT))


def test_float32_stays_float32():
    pb = small_problem()
    f32 = type(pb.inner)(*(t.float() for t in (pb.inner.a, pb.inner.b, pb.inner.c, pb.inner.e, pb.inner.l_,
                                                pb.inner.m_)))
    F32 = type(pb.outer)(*(t.float() for t in (pb.outer.a, pb.outer.b, pb.outer.c, pb.outer.e, pb.outer.l_,
                                                pb.outer.m_)))
    s = SOBA(FiniteSum(f32.batch_loss, 256, 16), FiniteSum(F32.batch_loss, 128, 16), torch.zeros(8),
             -2 * torch.ones(3), step_size=0.5)
    s.run(300)
    assert s.x.dtype == s.y.dtype == s.v.dtype == torch.float32
    assert sq_grad_norm(pb, s.x.double()) < 1e-1 * sq_grad_norm(pb, -2 * torch.ones(3, dtype=DT))


def test_run_records_the_callback_and_stops_when_it_returns_false():
    pb = small_problem()
    s = SOBA(*oracles(pb), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT))
    res = s.run(50, eval_every=10, callback=lambda s: False if s.t >= 30 else s.t)
    assert [h["step"] for h in res.history] == [0, 10, 20, 30] and res.steps == 30
    assert [h["oracle_calls"] for h in res.history] == [0, 30, 60, 90]
    assert res.history[-1]["value"] is False and res.time > 0


def test_run_stops_at_max_time_and_skips_none_records():
    pb = small_problem()
    s = SOBA(*oracles(pb), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT))
    res = s.run(10 ** 7, max_time=0.2, callback=lambda s: s.t if s.t % 7 == 0 else None)
    assert 0.2 <= res.time < 0.5 and res.steps < 10 ** 7 and s.time_spent == res.time
    assert all(h["value"] % 7 == 0 for h in res.history) and len(res.history) >= 2
    with pytest.raises(ValueError, match="max_time"):
        s.run(5, max_time=0)


def test_losses_independent_of_a_variable_have_zero_derivatives_there():
    """A validation loss of y only (no x), an inner loss linear in y: zeros, not an autograd error."""
    from methods.stochastic import F2SA
    n = 32
    inner = FiniteSum(lambda p, h, i: (p[0] * h[0]).sum() * i.numel() / i.numel(), n, 8)   # linear in y
    outer = FiniteSum(lambda p, h, i: (p[0] ** 2).sum(), n, 8)                             # no x
    s = SOBA(inner, outer, torch.ones(3, dtype=DT), torch.ones(3, dtype=DT))
    y, x = s.y.clone(), s.x.clone()
    s.step()
    gy, hv, jv = s.grad_and_products(y, x, torch.ones(3, dtype=DT), inner.full())
    assert torch.equal(hv, torch.zeros(3, dtype=DT)) and torch.equal(gy, x)
    assert torch.equal(jv, torch.ones(3, dtype=DT))         # d/dx <grad_y f, v> = v
    (gx,) = s.grad(outer, y, x, outer.full(), "x")
    assert torch.equal(gx, torch.zeros(3, dtype=DT))
    F2SA(inner, outer, torch.ones(3, dtype=DT), torch.ones(3, dtype=DT)).run(2)


@pytest.mark.parametrize("batch, err, match", [
    (torch.arange(10) < 3, TypeError, "boolean mask"),
    ([0.5, 1.7], TypeError, "integer sample indices"),
    ([-1, 2], ValueError, r"outside \[0, n_samples=10\)"),
    ([3, 10], ValueError, "outside"),
])
def test_a_sampler_yielding_masks_floats_or_out_of_range_indices_is_refused(batch, err, match):
    f = FiniteSum(lambda p, h, i: i.double().mean(), 10, 4, sampler=[batch])
    with pytest.raises(err, match=match):
        f.sample()


def test_integer_losses_and_numpy_numbers():
    import numpy as np
    f = FiniteSum(lambda p, h, i: torch.tensor(1), 10, 5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        f([torch.zeros(3, dtype=DT)], [torch.zeros(1, dtype=DT)])
    pb = small_problem()
    s = SOBA(*oracles(pb), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=np.float32(0.1))
    assert s.run(np.int64(2)).steps == 2 and isinstance(s.step_size, float)
