"""Data-parallel hypergradients (hypergrad.distributed) equal the single-process ones on all the data.

One spawned job (2 processes, gloo on 127.0.0.1, float64, each rank holding half of the data, or 30/50
rows for reduce="sum") runs every case of ``distributed_cases`` and saves its results; the test process
computes the same cases on all the data without any wrapping, plus a dense implicit-function-theorem
reference, and compares to 1e-10 relative (they agree to ~1e-15).
"""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_cases as dc
import hypergrad as hg
from hypergrad import distributed as hgd

WORLD = 2
TOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs: int, timeout: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; kill them all if they take too long."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {nprocs} distributed workers did not finish in {timeout} s")


@pytest.fixture(scope="module")
def w_star():
    return dc.inner_solution()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, w_star):
    """Results of each rank, from one spawned job."""
    out = tmp_path_factory.mktemp("dist")
    spawn(dc.worker, (WORLD, free_port(), str(out), w_star), WORLD, timeout=120)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(w_star):
    """The same cases in this process, all the data, no wrapping."""
    data = dc.shard(dc.full_data(), 0, {"train": [dc.N_TRAIN], "val": [dc.N_VAL]})
    out = dc.all_cases(data, dc.identity_wrap, w_star)
    out.update(dc.case_sum_unequal(data, dc.identity_wrap, w_star))
    out.update(dc.case_methods(data, distributed=False))
    return out


def rel_err(xs, ys) -> float:
    x, y = hg.cat_list_to_tensor(xs), hg.cat_list_to_tensor(ys)
    return float((x - y).norm() / y.norm())


SOLVERS = ["cg", "minres", "gmres", "cg_normaleq", "dense", "fixed_point", "neumann"]
EQUAL_SHARD_CASES = SOLVERS + [s + "_dotgrad" for s in SOLVERS] + [
    "cg_wrapper", "cg_wrapped_map", "second_order", "trajectory", "reverse", "reverse_unroll", "module",
    "module_loaded", "methods_implicit", "methods_rad", "methods_bda", "methods_trad", "methods_bvfim"]


@pytest.mark.parametrize("case", EQUAL_SHARD_CASES + ["sum_cg", "sum_reverse_unroll"])
def test_two_processes_equal_one_process_with_all_data(ranks, reference, case):
    for r in range(WORLD):
        assert len(ranks[r][case]) == len(reference[case])
        assert rel_err(ranks[r][case], reference[case]) <= TOL, (case, r)


def test_ranks_agree_bitwise(ranks):
    """Every rank computes the same numbers, so the solvers' stopping decisions agree (no rank waits alone)."""
    for case in EQUAL_SHARD_CASES + ["sum_cg", "sum_reverse_unroll"]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][case], ranks[1][case])), case


def test_solvers_take_the_same_iterations(ranks, reference):
    for solver in SOLVERS:
        assert ranks[0][solver][-1] == reference[solver][-1] == ranks[1][solver][-1]


def test_implicit_reference_is_the_dense_ift_hypergradient(reference, w_star):
    """Independent check of the reference: grad = dE/dlambda - d2L/dlambda dw [d2L/dw2]^-1 dE/dw (dense)."""
    data = dc.full_data()
    inner, outer = dc.losses(data)
    h = hg.cat_list_to_tensor([t.detach() for t in dc.hparams0()])
    z = torch.cat([hg.cat_list_to_tensor(w_star), h])
    n = dc.D + 1

    def split(z):
        return [z[:dc.D], z[dc.D]], [z[n:n + dc.D], z[n + dc.D]]

    H = torch.autograd.functional.hessian(lambda z: inner(*split(z)), z)
    gE = torch.autograd.functional.jacobian(lambda z: outer(*split(z)), z)
    v = torch.linalg.solve(H[:n, :n], gE[:n])
    exact = gE[n:] - H[n:, :n] @ v
    for solver in ("cg", "minres", "gmres", "cg_normaleq", "dense", "cg_wrapper", "cg_wrapped_map", "sum_cg"):
        assert rel_err(reference[solver][:2], [exact[:dc.D], exact[dc.D]]) <= 1e-9, solver
    assert float(exact.norm()) > 1e-2  # not trivially zero


def test_shard_alone_gives_another_hypergradient(ranks, reference):
    """A rank's own shard, unwrapped, is far from the global answer: the all-reduce is what makes it right."""
    for r in range(WORLD):
        assert rel_err(ranks[r]["local_cg"], reference["cg"][:2]) > 0.1
    assert rel_err(ranks[0]["local_cg"], ranks[1]["local_cg"]) > 0.1
    assert rel_err(reference["reverse"], reference["cg"][:2]) > 1e-3  # T steps from 0 are not at w*


def test_ddp_module_is_unwrapped_and_loaded(ranks):
    for r in range(WORLD):
        assert float(ranks[r]["module_names_ok"][0]) == 1.0
        assert all(torch.equal(a, b) for a, b in zip(ranks[r]["module_loaded"], ranks[r]["module"][2:]))


def test_callers_tensors_are_untouched(ranks):
    assert all(float(ranks[r]["w_star_unchanged"][0]) == 1.0 for r in range(WORLD))


def test_errors_inside_a_group(ranks):
    for r in range(WORLD):
        e = ranks[r]["errors"]
        assert e["non_scalar"].startswith("ValueError") and "shape (10,)" in e["non_scalar"]
        assert e["not_a_list"].startswith("TypeError") and "lists of tensors" in e["not_a_list"]
        assert e["differs"].startswith("ValueError") and "hparams[1]" in e["differs"] and "index 1" in e["differs"]
        assert e["shape_differs"].startswith("ValueError") and "params[0]" in e["shape_differs"]
        assert e["same"] == "no error"
        assert e["cg_heavy_ball"].startswith("BreakdownError") and "gmres" in e["cg_heavy_ball"], e["cg_heavy_ball"]
        assert e["fixed_point_diverges"].startswith("DivergenceError"), e["fixed_point_diverges"]
    assert ranks[0]["errors"] == ranks[1]["errors"]  # every rank raises, none is left waiting


def test_not_initialized_names_the_fix():
    assert not torch.distributed.is_initialized()
    inner, _ = dc.losses(dc.full_data())
    for call in (lambda: hgd.data_parallel(inner), lambda: hgd.replicate(torch.ones(2)),
                 lambda: hgd.reduce_mean([torch.ones(2)]), lambda: hgd.assert_replicated([torch.ones(2)])):
        with pytest.raises(RuntimeError, match=r"init_process_group"):
            call()


def test_bad_reduce_is_rejected():
    with pytest.raises(ValueError, match="'mean'.*'sum'.*got 'max'"):
        hgd.data_parallel(lambda p, h: p[0].sum(), reduce="max")
    with pytest.raises(ValueError, match="got 'avg'"):
        hgd.replicate(torch.ones(2), reduce="avg")
