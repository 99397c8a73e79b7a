"""MRBO against its update written here with closed-form derivatives (STORM recursions at two points with the same
batches, the joint Neumann series), the zero memories of its first iteration, the joint Neumann routine against
the dense truncated series and against per-point Hessians of a non-quadratic loss, and its convergence."""
import math

import pytest
import torch

from methods.stochastic import FiniteSum
from methods.stochastic.mrbo import MRBO, joint_neumann
from stochastic_problems import (DT, cross, grad_x, grad_y, hvp, oracles, small_problem, sq_grad_norm, x_star,
                                 zeros, neumann)



def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)



def dense_series(H, b, K, eta):
    I = torch.eye(H.shape[0], dtype=DT)
    return eta * sum(torch.linalg.matrix_power(I - eta * H, k) for k in range(K + 1)) @ b


# -- the joint Neumann routine ----------------------------------------------------------------------
def test_joint_neumann_full_batch_is_the_dense_truncated_series_at_both_points():
    pb = small_problem()
    g = torch.Generator().manual_seed(1)
    p1, p2 = (randn(g, 8), randn(g, 3)), (randn(g, 8), randn(g, 3))
    b1, b2 = randn(g, 8), randn(g, 8)
    H = pb.inner.H
    want = dense_series(H, b1, 7, 0.3), dense_series(H, b2, 7, 0.3)
    s = MRBO(*oracles(pb, "full"), *zeros())
    got = joint_neumann(s, (p1, p2), (b1, b2), 7, 0.3)
    s16 = MRBO(*oracles(pb, 16), *zeros())
    got_fb = joint_neumann(s16, (p1, p2), (b1, b2), 7, 0.3, full=True)      # full=True: no draw
    for a, b in zip(got + got_fb, want + want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert s16.inner.samples_drawn == 0 and s16.oracle_calls == 2 * 7 * 2 * 256 / 16
    single = joint_neumann(s, (p2,), (b2,), 7, 0.3)                            # the single-point series
    assert len(single) == 1 and torch.allclose(single[0], want[1], rtol=1e-12, atol=1e-14)
    assert torch.equal(joint_neumann(s, (p1,), (b1,), 0, 0.3)[0], 0.3 * b1)   # K = 0: eta b
    with pytest.raises(ValueError, match="one right-hand side per point"):
        joint_neumann(s, (p1, p2), (b1,), 3, 0.3)


def nonquadratic(pb, batch_size, seed=0):
    """f_i(y, x) = 1/2 (1 + (b_i.x)^2) (a_i.y)^2 + 1/12 (a_i.y)^4: a Hessian (1 + (b_i.x)^2 + (a_i.y)^2) a_i a_i^T
    that depends on both y and x, as FiniteSum oracle and closed-form batch Hessian-vector product."""
    A, Bx = pb.inner.a, pb.inner.b

    def loss(params, hparams, idx):
        ay, bx = A[idx] @ params[0], Bx[idx] @ hparams[0]
        return (0.5 * (1 + bx ** 2) * ay ** 2 + ay ** 4 / 12).mean()

    def hvp_nq(y, x, v, batch):
        a, b = A[batch.idx], Bx[batch.idx]
        w = 1 + (b @ x) ** 2 + (a @ y) ** 2
        return batch.scale * (a * (w * (a @ v))[:, None]).mean(0)

    return FiniteSum(loss, pb.inner.n, batch_size, seed=seed), hvp_nq


@pytest.mark.parametrize("batch_size", [16, 48])
def test_joint_neumann_shares_its_batches_and_takes_each_hessian_at_its_own_point(batch_size):
    pb = small_problem()
    inner, hvp_nq = nonquadratic(pb, batch_size)
    twin, _ = nonquadratic(pb, batch_size)
    s = MRBO(inner, oracles(pb, 16)[1], *zeros())
    g = torch.Generator().manual_seed(2)
    (y1, x1), (y2, x2) = (randn(g, 8), randn(g, 3)), (randn(g, 8), randn(g, 3))
    b1, b2 = randn(g, 8), randn(g, 8)
    w1, w2 = joint_neumann(s, ((y1, x1), (y2, x2)), (b1, b2), 5, 0.2)
    batches = [twin.sample() for _ in range(5)]                             # one batch per factor, shared
    want1 = neumann(b1, [lambda v, B=B: hvp_nq(y1, x1, v, B) for B in batches], 0.2)
    want2 = neumann(b2, [lambda v, B=B: hvp_nq(y2, x2, v, B) for B in batches], 0.2)
    assert torch.allclose(w1, want1, rtol=1e-12, atol=1e-14)
    assert torch.allclose(w2, want2, rtol=1e-12, atol=1e-14)
    wrong = neumann(b2, [lambda v, B=B: hvp_nq(y1, x1, v, B) for B in batches], 0.2)
    assert not torch.allclose(w2, wrong, rtol=1e-3)                          # the points' Hessians differ
    assert inner.samples_drawn == twin.samples_drawn == sum(B.size for B in batches)
    assert s.oracle_calls == pytest.approx(2 * 2 * sum(B.size for B in batches) / batch_size, rel=1e-14)


# -- MRBO's iteration ---------------------------------------------------------------------------------
def random_state(s, seed=3, t=4):
    g = torch.Generator().manual_seed(seed)
    names = ("y", "x", "y_old", "x_old", "d_y", "d_x")
    for n in names:
        setattr(s, n, randn(g, *getattr(s, n).shape))
    s.t = t
    return [getattr(s, n).clone() for n in names]


def reference_step(pb, t, state, twin_i, twin_o, c=0.3, ratio=2.0, eta=0.7, K=3):
    """One MRBO iteration as in benchmark_bilevel's solvers/mrbo.py, closed-form derivatives, twin batches."""
    y, x, y0, x0, dy, dx = state
    f, F = pb.inner, pb.outer
    rho, eta_n = c / (t + 1) ** (1 / 3), c
    eta_t, gamma = eta / (t + 1) ** (2 / 3), c / ratio / (t + 1) ** (1 / 3)
    bi = twin_i.sample()                                                    # step 1: inner direction
    dy = grad_y(f, y, x, bi) + (1 - eta_t) * (dy - grad_y(f, y0, x0, bi))
    bo = twin_o.sample()                                                    # step 2: hypergradients
    batches = [twin_i.sample() for _ in range(K)]
    w = neumann(grad_y(F, y, x, bo), [lambda v, B=B: hvp(f, v, B) for B in batches], eta_n)
    w0 = neumann(grad_y(F, y0, x0, bo), [lambda v, B=B: hvp(f, v, B) for B in batches], eta_n)
    p = grad_x(F, y, x, bo) - cross(f, w, bi)
    p0 = grad_x(F, y0, x0, bo) - cross(f, w0, bi)
    dx = eta_t * p + (1 - eta_t) * (dx + p - p0)                          # step 3: outer direction
    calls = (4 * bi.size + 4 * sum(B.size for B in batches)) / twin_i.batch_size + 2 * bo.size / twin_o.batch_size
    return [y - rho * dy, x - gamma * dx, y, x, dy, dx], w, calls           # steps 4-5


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_mrbo_steps_equal_the_paper_update(batch_size):
    pb = small_problem()
    inner, outer = oracles(pb, batch_size)
    twin_i, twin_o = oracles(pb, batch_size)
    s = MRBO(inner, outer, *zeros(), step_size=0.3, outer_ratio=2.0, eta=0.7, n_shia_steps=3)
    state = random_state(s)
    calls = 0.0
    for t in range(4, 10):
        s.step()
        state, w, c = reference_step(pb, t, state, twin_i, twin_o)
        calls += c
        for got, want in zip((s.y, s.x, s.y_old, s.x_old, s.d_y, s.d_x, s.v), state + [w]):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    assert s.t == 10
    assert s.oracle_calls == pytest.approx(calls, rel=1e-14)
    assert inner.samples_drawn == twin_i.samples_drawn and outer.samples_drawn == twin_o.samples_drawn


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_mrbo_first_iteration_uses_zero_memories_whose_bias_decays_as_the_momentum_product(eta):
    """Full batches: every estimate is exact, so d_y - grad_y f(y_t, x_t) = -prod_{s<=t} (1 - eta_s) grad_y f(0, 0)
    (the old point starts at the origin, d_y at 0), and likewise d_x with the Neumann hypergradient at (0, 0);
    with eta = 1 the first factor is 0: MRBO is then exactly gradient descent on the full directions."""
    pb = small_problem()
    f, F = pb.inner, pb.outer
    inner, outer = oracles(pb, "full")
    fi, fo = inner.full(), outer.full()
    g = torch.Generator().manual_seed(5)
    y0, x0 = randn(g, 8), randn(g, 3)
    s = MRBO(inner, outer, y0, x0, step_size=0.3, eta=eta, n_shia_steps=3)
    for m in (s.y_old, s.x_old, s.d_y, s.d_x):
        assert not m.any()

    def p(y, x):     # the full-batch hypergradient with the truncated Neumann series
        return grad_x(F, y, x, fo) - cross(f, dense_series(f.H, grad_y(F, y, x, fo), 3, 0.3), fi)

    o_y, o_x = zeros()
    g_origin, p_origin = grad_y(f, o_y, o_x, fi), p(o_y, o_x)
    prod = 1.0
    for t in range(25):
        s.step()
        prod *= 1 - eta / (t + 1) ** (2 / 3)
        y, x = s.y_old, s.x_old                                     # where this iteration's directions were taken
        if t == 0:
            assert torch.equal(y, y0) and torch.equal(x, x0)
        assert torch.allclose(s.d_y, grad_y(f, y, x, fi) - prod * g_origin, rtol=1e-12, atol=1e-13)
        assert torch.allclose(s.d_x, p(y, x) - prod * p_origin, rtol=1e-12, atol=1e-13)
        assert torch.allclose(s.y, y - 0.3 / (t + 1) ** (1 / 3) * s.d_y, rtol=1e-13, atol=1e-14)
    assert (prod == 0.0) == (eta == 1.0) and prod < 0.03                 # 0.027 for eta = 0.5


def test_mrbo_converges_on_the_quadratic():
    """The benchmark's batch size 64, step_size 0.5, outer_ratio 0.5, eta 0.5, 10 Neumann terms (whose truncation
    leaves a floor ||grad h||^2 = 6e-5 here). The benchmark's tuned quadratic steps (0.1, outer_ratio 0.1) at batch
    16 also get there, slower: 4.0e-4 .. 7.1e-4 x start after 700 steps (5 seeds)."""
    pb = small_problem()
    s = MRBO(*oracles(pb, 64), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.5,
             outer_ratio=0.5)
    res = s.run(300, eval_every=50, callback=lambda s: sq_grad_norm(pb, s.x))
    values = {h["step"]: h["value"] for h in res.history}
    assert values[0] > 7.0
    assert values[300] < 1e-3 * values[0], values                # measured 1e-5 .. 4.2e-4 x start over 5 seeds
    assert values[50] > values[150] > values[300]                 # still falling
    assert res.oracle_calls == 300 * (44 + 2)


def test_mrbo_full_batch_with_eta_1_is_gradient_descent_converging_to_x_star():
    """A well-conditioned problem (grad2_yy f in [0.8, 1.1]: the Neumann series with step 1 has converged to
    4e-11 after 10 terms) so that the truncated hypergradient's stationary point is x* to that accuracy."""
    pb = small_problem(mu=0.9, L_cross_inner=0.5, n_inner=1024)
    s = MRBO(*oracles(pb, "full"), *zeros(), step_size=1.0, outer_ratio=1.2, eta=1.0, n_shia_steps=10)
    xs = x_star(pb)
    errs = [float((s.run(50).hparams[0] - xs).norm() / xs.norm()) for _ in range(3)]
    assert errs[2] < 1e-8 and errs[2] < 1e-3 * errs[0], errs      # measured 3.7e-5, 3.8e-8, 3.0e-10


def test_mrbo_bad_arguments_raise_naming_them():
    pb = small_problem()
    inner, outer = oracles(pb, 16)
    for bad in (0.0, -0.5, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="eta"):
            MRBO(inner, outer, *zeros(), eta=bad)
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="n_shia_steps"):
            MRBO(inner, outer, *zeros(), n_shia_steps=bad)
    with pytest.raises(ValueError, match="step_size"):
        MRBO(inner, outer, *zeros(), step_size=0.0)
    with pytest.raises(ValueError, match="outer_ratio"):
        MRBO(inner, outer, *zeros(), outer_ratio=-1.0)
    s = MRBO(inner, outer, *zeros(), n_shia_steps=0, eta=1.0)    # the bounds themselves are allowed
    s.step()
    assert math.isfinite(float(s.x.norm()))
