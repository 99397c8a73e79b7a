"""Data-parallel hypergradient: 2 processes each holding half the data vs 1 process holding all of it.

Logistic regression with per-feature log-weight-decay hparams, n training rows and n/4 validation rows,
d features: the data dominate (every Hessian-vector product reads the n x d matrix). One hypergradient =
``hypergrad.hypergradient(solver="cg", K, tol=0)`` (exactly K products) with ``fp_map`` a gradient step
on the inner loss. One job of 2 processes (gloo, 127.0.0.1, 1 torch thread each) measures, interleaved
repetition by repetition so that both see the same machine load:

- ``t1``: rank 0 alone, all the rows, plain functions (no collective), rank 1 waiting;
- ``t1_wrapped``: the same through ``data_parallel`` over a 1-process group (the wrappers' own cost);
- ``t2``: both ranks, half the rows each, through ``data_parallel`` (wall time of the slowest rank);
- ``t2_local``: both ranks, each its own half unwrapped, no collective: what the free cores allow (control);
- ``ratio`` = t2 / t1 (ideal 0.5 with two free cores), ``ratio_local`` = t2_local / t1, and ``rel_diff``: the
  2-process hypergradient against the 1-process one.

Feature scales span a decade and the bias is not regularized (the inner Hessian's condition number is ~700),
so CG is far from converged after K iterations and never breaks down at tol = 0. float64 by
default, so that ``rel_diff`` checks the result (1e-14 .. 1e-13: rounding, amplified by CG). In float32 the
same comparison gives 4e-6 at the full sizes but 1e-2 at the quick size (K = 5, where float32 and float64
CG iterates themselves differ by ~1e-1): it measures CG's sensitivity to rounding, not correctness.
``--dtype float32`` times float32 all the same.
Times are medians over ``reps`` after one warm-up; the load average is recorded (the machine may be shared).

    python benchmarks/bench_distributed.py [--quick] [--dtype float32]   # writes results/bench_distributed.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import hypergrad as hg
from hypergrad.distributed import data_parallel

CHUNK = 10_000  # rows come in seeded chunks: any process makes any block of rows, the same in every run
WORLD = 2


def rows(start: int, stop: int, d: int, salt: int, dtype: torch.dtype):
    """Rows [start, stop) of the data set (X, y), generated chunk by chunk from per-chunk seeds."""
    w_true = torch.randn(d, generator=torch.Generator().manual_seed(12345), dtype=dtype)
    scales = torch.logspace(0, -1, d, dtype=dtype) / d ** 0.5
    first = start // CHUNK
    Xs, ys = [], []
    for c in range(first, -(-stop // CHUNK)):
        g = torch.Generator().manual_seed(1_000_003 * salt + c)
        X = torch.randn(CHUNK, d, generator=g, dtype=dtype) * scales
        Xs.append(X)
        ys.append((X @ w_true + 0.3 * torch.randn(CHUNK, generator=g, dtype=dtype) / d ** 0.5 > 0).to(dtype))
    keep = slice(start - first * CHUNK, stop - first * CHUNK)
    return torch.cat(Xs)[keep].contiguous(), torch.cat(ys)[keep].contiguous()


def shard_data(n: int, d: int, start: int, stop: int, dtype) -> Dict:
    """Training rows [start, stop) of n and the matching quarter-size block of validation rows."""
    (Xtr, ytr), (Xva, yva) = rows(start, stop, d, 0, dtype), rows(start // 4, stop // 4, d, 1, dtype)
    return dict(Xtr=Xtr, ytr=ytr, Xva=Xva, yva=yva, n=n)


def problem(data: Dict, wrap: Callable) -> Callable[[int], List]:
    """``hypergradient(K)`` of this data (local data terms are sums over the rows / global n, so that
    ``data_parallel(..., reduce="sum")`` of them is the global mean)."""
    n, d, dtype = data["n"], data["Xtr"].shape[1], data["Xtr"].dtype

    def train_ce(params, hparams):
        return F.binary_cross_entropy_with_logits(data["Xtr"] @ params[0] + params[1], data["ytr"], reduction="sum") / n

    def val_ce(params, hparams):
        return F.binary_cross_entropy_with_logits(data["Xva"] @ params[0] + params[1], data["yva"],
                                                  reduction="sum") / (n // 4)

    train_ce, outer = wrap(train_ce), wrap(val_ce)

    def inner(params, hparams):
        return train_ce(params, hparams) + 0.5 * (torch.exp(hparams[0]) * params[0] ** 2).sum()

    g = torch.Generator().manual_seed(7)
    params = [torch.randn(d, generator=g, dtype=dtype).requires_grad_(True),
              torch.zeros((), dtype=dtype, requires_grad=True)]
    hparams = [torch.full((d,), -8.0, dtype=dtype, requires_grad=True)]
    fp_map = hg.GradientDescent(inner, float(d))  # CG solves (step * Hessian) v = g: the step only scales it
    return lambda K: hg.hypergradient(params, hparams, fp_map, outer, solver="cg", K=K, tol=0.0, set_grad=False).grads


def _timed(fn: Callable, active: bool):
    """Wall time of ``fn()`` on the ranks where ``active`` (the slowest of them) and its result."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn() if active else None
    dt = torch.tensor(time.perf_counter() - t0 if active else 0.0, dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt), out


def measure(rank: int, n: int, d: int, K: int, reps: int, dtype, solo) -> Dict:
    """The four timings of one size, interleaved over ``reps`` + 1 repetitions (the first is a warm-up)."""
    start, stop = n * rank // WORLD, n * (rank + 1) // WORLD
    mine = shard_data(n, d, start, stop, dtype)
    everything = shard_data(n, d, 0, n, dtype) if rank == 0 else None
    plain = lambda fn: fn  # noqa: E731
    runs = {  # name: (hypergradient of K, active on this rank)
        "t1": (problem(everything, plain) if rank == 0 else None, rank == 0),
        "t1_wrapped": (problem(everything, lambda fn: data_parallel(fn, group=solo, reduce="sum"))
                       if rank == 0 else None, rank == 0),
        "t2": (problem(mine, lambda fn: data_parallel(fn, reduce="sum")), True),
        "t2_local": (problem(mine, plain), True),
    }
    times: Dict[str, List[float]] = {name: [] for name in runs}
    grads = {}
    for _ in range(reps + 1):
        for name, (hypergrad_of, active) in runs.items():
            dt, grads[name] = _timed(lambda: hypergrad_of(K), active)
            times[name].append(dt)
    row = dict(n=n, d=d, K=K, dtype=str(dtype).replace("torch.", ""),
               **{name: statistics.median(ts[1:]) for name, ts in times.items()})
    if rank == 0:
        ref, got = hg.cat_list_to_tensor(grads["t1"]), hg.cat_list_to_tensor(grads["t2"])
        row.update(ratio=row["t2"] / row["t1"], ratio_local=row["t2_local"] / row["t1"],
                   rel_diff=float((got - ref).norm() / ref.norm()))
    return row


def _worker(rank: int, port: int, configs: List[Dict], out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=10))
    try:
        solo = dist.new_group([0])  # every rank takes part in creating it; rank 0 alone uses it
        rows_ = [measure(rank, **c, solo=solo) for c in configs]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(rows_, out_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _importable_worker() -> Callable:
    """``_worker`` of this file imported under its module name (spawn pickles functions by name), however
    this file itself was loaded (as a script, or from its path by another entry point)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    return importlib.import_module("bench_distributed")._worker


def run(quick: bool, dtype: torch.dtype = torch.float64) -> Dict:
    """Measure every size in one 2-process job; returns ``{"rows": [...], ...}`` (one row per (n, d))."""
    sizes = [(20_000, 100)] if quick else [(200_000, 100), (200_000, 300), (200_000, 1000)]
    configs = [dict(n=n, d=d, K=5 if quick else 10, reps=2 if quick else 5, dtype=dtype) for n, d in sizes]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        mp.start_processes(_importable_worker(), args=(_free_port(), configs, out_path), nprocs=WORLD,
                           start_method="spawn")
        rows_ = torch.load(out_path)
    return dict(rows=rows_, torch=torch.__version__, hypergrad=hg.__version__, threads_per_process=1,
                cpus=os.cpu_count(), backend="gloo", load_average_before=load_before,
                load_average_after=os.getloadavg())


def print_table(rows_: List[Dict]) -> None:
    """A markdown table (benchmarks/run_all.py puts it into the report as it is)."""
    print("| n | d | K | dtype | t1 (s) | t1 wrapped (s) | t2 (s) | t2 local (s) | t2 / t1 | t2 local / t1 "
          "| rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_:
        print(f"| {r['n']:,} | {r['d']} | {r['K']} | {r['dtype']} | {r['t1']:.3f} | {r['t1_wrapped']:.3f} | "
              f"{r['t2']:.3f} | {r['t2_local']:.3f} | {r['ratio']:.2f} | {r['ratio_local']:.2f} | "
              f"{r['rel_diff']:.1e} |")


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small size (seconds)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    results = run(args.quick, getattr(torch, args.dtype))
    print_table(results["rows"])
    print("load average (1, 5, 15 min) before: {:.1f} {:.1f} {:.1f}, after: {:.1f} {:.1f} {:.1f}".format(
        *results["load_average_before"], *results["load_average_after"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_distributed.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
