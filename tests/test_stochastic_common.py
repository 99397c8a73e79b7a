"""What holds for every solver of methods.stochastic: one interface (switching method is changing the class),
the caller's tensors untouched, float32 kept, the core's safety rules, counted oracle calls, the device."""
import math

import pytest
import torch

import hypergrad
from methods import stochastic as ms
from stochastic_problems import DT, small_problem, sq_grad_norm

ALL = ["SOBA", "SABA", "SRBA", "AmIGO", "StocBiO", "MRBO", "VRBO", "F2SA", "BOME", "FullBatchImplicit",
       "FullBatchRAD"]


def make(name, pb, dtype=DT, device="cpu", **kw):
    q_in, q_out = (pb.inner.to(dtype=dtype, device=device), pb.outer.to(dtype=dtype, device=device))
    inner = ms.FiniteSum(q_in.batch_loss, q_in.n, 16, seed=0, device=device)
    outer = ms.FiniteSum(q_out.batch_loss, q_out.n, 16, seed=1, device=device)
    y0 = torch.zeros(8, dtype=dtype, device=device)
    x0 = -torch.ones(3, dtype=dtype, device=device)
    return getattr(ms, name)(inner, outer, y0, x0, **kw), y0, x0


@pytest.mark.parametrize("name", ALL)
def test_every_solver_speaks_one_interface_and_makes_progress(name):
    pb = small_problem()
    s, y0, x0 = make(name, pb)
    start = sq_grad_norm(pb, x0)
    res = s.run(60)
    assert torch.equal(y0, torch.zeros(8, dtype=DT)) and torch.equal(x0, -torch.ones(3, dtype=DT))
    assert res.steps == 60 == s.t and res.approximate and res.oracle_calls == s.oracle_calls > 0
    assert res.hparams[0].shape == (3,) and res.params[0].shape == (8,)
    assert sq_grad_norm(pb, res.hparams[0]) < start, name


@pytest.mark.parametrize("name", ALL)
def test_every_solver_keeps_float32(name):
    pb = small_problem()
    s, _, _ = make(name, pb, dtype=torch.float32)
    s.run(5)
    assert s.x.dtype == s.y.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in s._state())


@pytest.mark.parametrize("name", ALL)
def test_every_solver_raises_on_a_nan_loss(name):
    pb = small_problem()
    s, _, _ = make(name, pb)
    s.run(2)
    loss = s.inner.loss
    s.inner.loss = lambda p, h, i: loss(p, h, i) * math.nan
    with pytest.raises(hypergrad.NonFiniteError, match="NaN"):
        s.run(3)


@pytest.mark.parametrize("name", ALL)
def test_every_solver_flags_divergence(name):
    pb = small_problem()
    s, _, _ = make(name, pb, max_norm=1e3)
    s.x = 1e4 * torch.ones(3, dtype=DT)
    with pytest.raises(hypergrad.DivergenceError, match="exceeds max_norm"):
        s.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_every_solver_runs_on_cuda_like_on_cpu(name):
    pb = small_problem()
    cpu, _, _ = make(name, pb)
    gpu, _, _ = make(name, pb, device="cuda")
    cpu.run(10)
    gpu.run(10)
    assert gpu.x.device.type == "cuda"
    assert torch.allclose(gpu.x.cpu(), cpu.x, rtol=1e-9, atol=1e-12)
