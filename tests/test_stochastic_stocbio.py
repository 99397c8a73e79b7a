"""StocBiO against its update written here with closed-form derivatives, its stochastic Neumann series against the
dense truncated series, its convergence on the quadratic, and its full-batch fixed point (the K-truncated one)."""
import pytest
import torch

from methods.stochastic.stocbio import StocBiO
from stochastic_problems import DT, hvp, oracles, small_problem, x_star
from test_stochastic_amigo import assert_close, replay_steps, run_to_target, set_random_state


def dense_neumann(H, b, eta, K):
    """eta sum_{k=0}^{K} (I - eta H)^k b, with matrix powers."""
    M = torch.eye(H.shape[0], dtype=DT) - eta * H
    return eta * sum(torch.linalg.matrix_power(M, k) @ b for k in range(K + 1))


def stocbio_w(pb, y, x, v, g_y, twin_inner):
    """The Neumann result from scratch (v, the last one, is not read)."""
    r = acc = g_y
    for _ in range(4):                       # r <- (I - eta H_B) r, a fresh batch per factor
        r = r - 0.3 * hvp(pb.inner, r, twin_inner.sample())
        acc = acc + r
    return 0.3 * acc


@pytest.mark.parametrize("batch_size", [16, 48, "full"])  # 48: 256 = 5 x 48 + 16, an incomplete last block
def test_stocbio_steps_equal_the_paper_update(batch_size):
    replay_steps(StocBiO, batch_size, stocbio_w, n_shia_steps=4)   # the random start v is never read


@pytest.mark.parametrize("K", [0, 1, 7, 40])
def test_stocbio_full_batch_neumann_is_the_dense_truncated_series(K):
    pb = small_problem()
    f, F = pb.inner, pb.outer
    s = StocBiO(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=0.7,
                n_inner_steps=2, n_shia_steps=K)
    y, _, x = set_random_state(s)
    s.step()
    for _ in range(2):                       # deterministic GD on y with the dense f
        y = y - 0.7 * (f.H @ y + f.C.T @ x + f.l)
    g_y, g_x = F.H @ y + F.C.T @ x + F.l, F.G @ x + F.C @ y + F.m
    w = dense_neumann(f.H, g_y, 0.7, K)
    assert_close(((s.y, y), (s.v, w), (s.x, x - 0.7 * (g_x - f.C @ w))))
    assert s.oracle_calls == 2 + 2 * K + 2 + 1


def test_stocbio_converges_on_the_quadratic():
    pb = small_problem()
    s = StocBiO(*oracles(pb, 64), torch.zeros(8, dtype=DT), -2 * torch.ones(3, dtype=DT), step_size=0.3,
                n_inner_steps=5)                                       # n_shia_steps 10, the default
    # measured: 7.9 -> 1.2e-2, 1.4e-3, 2.5e-4 at steps 100, 200, 300
    run_to_target(s, pb, 300, 5 + 2 * 10 + 2 + 1)  # 5 grads + 10 HVPs (2 each) + 1 cross (2) + 1 outer grad


def truncated_fixed_point(pb, eta, K):
    """The x where grad_x F - C_f P_K grad_y F = 0 at y = y*(x), P_K = eta sum_{k<=K} (I - eta H_f)^k: the
    full-batch fixed point of StocBiO with K Neumann steps (linear in x here)."""
    f, F = pb.inner, pb.outer
    P = dense_neumann(f.H, torch.eye(f.H.shape[0], dtype=DT), eta, K)
    dy = -torch.linalg.solve(f.H, f.C.T)                       # y*(x) = dy x + y0
    y0 = -torch.linalg.solve(f.H, f.l)
    A = F.G + F.C @ dy - f.C @ P @ (F.H @ dy + F.C.T)
    c = F.C @ y0 + F.m - f.C @ P @ (F.H @ y0 + F.l)
    return torch.linalg.solve(A, -c)


def test_stocbio_full_batch_converges_to_the_truncated_neumann_fixed_point():
    pb = small_problem()
    s = StocBiO(*oracles(pb, "full"), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), step_size=1.5,
                n_inner_steps=5, n_shia_steps=5)
    x_k, xs = truncated_fixed_point(pb, 1.5, 5), x_star(pb)
    assert torch.allclose(truncated_fixed_point(pb, 1.5, 2000), xs, rtol=0, atol=1e-12)  # K -> oo: x*
    s.run(300)
    # measured: |x - x_K| = 2.8e-10 after 300 steps, while |x_K - x*| = 0.072 (the truncation bias)
    assert float((s.x - x_k).norm()) < 1e-8, float((s.x - x_k).norm())
    assert float((x_k - xs).norm()) > 0.05


@pytest.mark.parametrize("kw, name", [(dict(n_shia_steps=-1), "n_shia_steps"), (dict(n_shia_steps=2.0), "n_shia_steps"),
                                      (dict(n_inner_steps=0), "n_inner_steps"), (dict(step_size=0), "step_size"),
                                      (dict(outer_ratio=-1.0), "outer_ratio")])
def test_stocbio_rejects_bad_arguments_naming_them(kw, name):
    pb = small_problem()
    with pytest.raises(ValueError, match=name):
        StocBiO(*oracles(pb, 16), torch.zeros(8, dtype=DT), torch.zeros(3, dtype=DT), **kw)
