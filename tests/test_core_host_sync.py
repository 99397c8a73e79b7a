"""Off the CPU fast path, the solvers read the device only every `check_every` iterations.

Tensors with a graph take the device path (0-d tensor scalars) on the CPU too, so the number of host
reads (bool/float/item on a tensor) can be counted here without a GPU."""
import pytest
import torch

from hypergrad.linear_solvers import SOLVERS


def _spd(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(-3, 0, n, dtype=torch.float64)) @ Q.T  # slow: 40 steps stay busy


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "fixed_point", "neumann"])
def test_host_reads_scale_with_checks_not_iterations(solver, host_reads):
    M = _spd()
    b = [torch.ones(30, dtype=torch.float64, requires_grad=True)]  # a graph: device path
    K, every = 40, 10
    x, info = SOLVERS[solver](lambda u: [M @ u[0]], b, maxiter=K, tol=0.0, check_every=every)
    checks = K // every
    assert info.iterations >= K - 1  # fixed_point: the first of K steps needs no product
    host_reads["stop"]()
    assert host_reads["n"] <= 4 * checks + 8, host_reads["n"]  # a few reads per check, none per iteration
    assert torch.isfinite(x[0]).all()
    assert (M @ x[0] - b[0]).norm() < b[0].norm()
