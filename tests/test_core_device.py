"""Device and dtype follow the inputs; on CUDA (when present) no host synchronisation per iteration.

Without a GPU the CUDA tests are skipped; the dtype tests and the source scan below run everywhere."""
import ast
import os
import warnings

import pytest
import torch

import hypergrad as hg
from core_problems import ridge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRUCTORS = {"zeros", "ones", "full", "eye", "tensor", "arange", "empty", "randn", "rand", "linspace",
                "logspace", "as_tensor"}


def _read(path):
    with open(path) as f:
        return f.read()


def test_library_never_creates_a_tensor_without_a_device():
    """Every torch.<constructor>(...) in the library names its device (the *_like forms inherit it)."""
    missing = []
    for pkg in ("hypergrad", "methods", "constrained"):
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(ROOT, pkg, name)
            for node in ast.walk(ast.parse(_read(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in CONSTRUCTORS and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                    missing.append(f"{pkg}/{name}:{node.lineno} torch.{node.func.attr}")
    assert not missing, missing


def _as(p, dtype, device="cpu"):
    """The ridge problem with its data cast: maps rebuilt on the new dtype/device."""
    X, y = p["X"].to(device, dtype), p["y"].to(device, dtype)
    lam = p["lam"].detach().to(device, dtype).requires_grad_(True)
    w = p["w_star"].to(device, dtype)
    step = p["step"]
    Xv = torch.randn(30, X.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device, dtype)

    def fp_map(params, hparams):
        return [params[0] - step * (X.T @ (X @ params[0] - y) + hparams[0].exp() * params[0])]

    def outer(params, hparams):
        return 0.5 * ((Xv @ params[0]) ** 2).sum()

    return w, lam, fp_map, outer


def _batched(p, dtype, device="cpu"):
    """The ridge map applied row-wise to a [B, d] batch of iterates."""
    X, y = p["X"].to(device, dtype), p["y"].to(device, dtype)
    return lambda ps, hs: [ps[0] - p["step"] * ((ps[0] @ X.T - y) @ X + hs[0].exp() * ps[0])]


SOLVER_NAMES = sorted(hg.SOLVERS)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_float32_in_float32_out(solver):
    p = ridge(cond=None)
    ref = hg.hypergradient(*_as(p, torch.float64)[:1], [_as(p, torch.float64)[1]], *_as(p, torch.float64)[2:],
                           solver=solver, K=300, tol=1e-12, set_grad=False)
    w, lam, fp_map, outer = _as(p, torch.float32)
    r = hg.hypergradient([w], [lam], fp_map, outer, solver=solver, K=300, tol=1e-5, set_grad=False)
    assert r.grads[0].dtype == torch.float32 and r.v[0].dtype == torch.float32
    assert ((r.grads[0].double() - ref.grads[0]).norm() / ref.grads[0].norm()).item() < 1e-3


def test_float32_batched_and_checkpointed():
    p = ridge(cond=None)
    w, lam, fp_map, outer = _as(p, torch.float32)
    r = hg.batched_hypergradient([torch.stack([w, 2 * w])], [lam], _batched(p, torch.float32),
                                 lambda ps, hs: 0.5 * (ps[0] ** 2).sum(1), K=100, tol=1e-5, set_grad=False)
    assert r.grads[0].dtype == torch.float32 and r.residual.dtype == torch.float32
    g = hg.reverse_checkpointed([w], [lam], fp_map, 9, outer, set_grad=False)
    assert g[0].dtype == torch.float32


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "fixed_point", "neumann"])
def test_cuda_matches_cpu_with_few_host_syncs(solver):
    p = ridge(cond=None)
    w, lam, fp_map, outer = _as(p, torch.float64)
    cpu = hg.hypergradient([w], [lam], fp_map, outer, solver=solver, K=40, tol=0.0, set_grad=False)
    w, lam, fp_map, outer = _as(p, torch.float64, "cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = hg.hypergradient([w], [lam], fp_map, outer, solver=solver, K=40, tol=0.0, set_grad=False,
                                 check_every=10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [c for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) <= 40 // 10 * 4 + 12, len(syncs)  # a few per check, none per iteration
    assert r.grads[0].device.type == "cuda"
    assert torch.allclose(r.grads[0].cpu(), cpu.grads[0], rtol=1e-9, atol=0)


@cuda
def test_cuda_batched_and_checkpointed_match_cpu():
    p = ridge(cond=None)
    out = {}
    for dev in ("cpu", "cuda"):
        w, lam, fp_map, outer = _as(p, torch.float64, dev)
        rb = hg.batched_hypergradient([torch.stack([w, 2 * w])], [lam], _batched(p, torch.float64, dev),
                                      lambda ps, hs: 0.5 * (ps[0] ** 2).sum(1), K=30, tol=0.0, set_grad=False)
        rc = hg.reverse_checkpointed([w], [lam], fp_map, 16, outer, set_grad=False)
        out[dev] = (rb.grads[0].cpu(), rc[0].cpu())
    for a, b in zip(out["cpu"], out["cuda"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=0)
