"""The port of benchmark_bilevel's quadratic generator: spectra, the full-batch quadratic, the value Hessian."""
import pytest
import torch

from methods.stochastic.quadratics import make_quadratic_bilevel
from stochastic_problems import DT, grad_h, small_problem


def test_the_mean_quadratic_is_the_full_batch_loss():
    pb = small_problem()
    g = torch.Generator().manual_seed(0)
    for q in (pb.inner, pb.outer):
        y, x = torch.randn(8, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
        dense = 0.5 * y @ q.H @ y + 0.5 * x @ q.G @ x + x @ q.C @ y + q.l @ y + q.m @ x
        assert torch.allclose(q.loss(y, x, torch.arange(q.n)), dense, rtol=1e-13)


def test_spectra_are_the_requested_ones():
    pb = make_quadratic_bilevel(20000, 20000, 20, 5, mu=0.1, L_inner_inner=1.0, L_outer_outer=1.0,
                                L_cross_inner=0.5, seed=1)
    eig = torch.linalg.eigvalsh(pb.inner.H)
    assert eig[0] == pytest.approx(0.1, rel=0.1) and eig[-1] == pytest.approx(1.0, rel=0.1)
    g_eig = torch.linalg.eigvalsh(pb.outer.G)
    assert abs(float(g_eig[0])) < 1e-2 and g_eig[-1] == pytest.approx(1.0, rel=0.1)   # one zero direction
    s = torch.linalg.svdvals(pb.inner.C)
    assert s[0] == pytest.approx(0.5, rel=0.1) and s[-1] == pytest.approx(0.1, rel=0.15)
    assert all(torch.linalg.matrix_rank(pb.inner.a[i:i + 1].T @ pb.inner.a[i:i + 1]) == 1 for i in range(3))


def test_value_hessian_is_the_jacobian_of_the_closed_form_gradient_and_positive_definite():
    pb = small_problem()
    x = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(2))
    jac = torch.autograd.functional.jacobian(lambda x: grad_h(pb, x), x)
    assert torch.allclose(pb.value_hessian(), jac, rtol=1e-11, atol=1e-13)
    assert pb.min_eig == pytest.approx(float(torch.linalg.eigvalsh(jac)[0]), rel=1e-10) and pb.min_eig > 0


def test_same_seed_same_problem():
    a, b = make_quadratic_bilevel(64, 32, 6, 2, seed=7), make_quadratic_bilevel(64, 32, 6, 2, seed=7)
    assert torch.equal(a.inner.a, b.inner.a) and torch.equal(a.outer.m_, b.outer.m_)
