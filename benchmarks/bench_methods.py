"""Upper-gradient time per outer iteration of BVFIM, Implicit (CG) and RAD as the lower level grows.

Data hyper-cleaning on synthetic data (the BVFIM paper's setting): the lower model is an MLP
64 -> h -> 10 trained on sigmoid(x_i)-weighted cross-entropy, the upper variables x are the per-sample
weights, the upper loss is the validation cross-entropy. h is chosen so that the lower model has
about 10^3 ... 10^6 parameters. All methods use the same inner loop length T: RAD unrolls T steps,
Implicit takes T lower steps and at most T CG iterations, BVFIM takes T z-steps and T y-steps.

Times are medians over ``--reps`` calls of ``compute_gradients`` after one warm-up call, all in one run,
and printed as ratios to BVFIM. Results go to ``--out`` (CSV and JSON).

    python benchmarks/bench_methods.py            # 1e3 .. 1e6 lower parameters
    python benchmarks/bench_methods.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import methods  # noqa: E402


class Weights(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(n))

    def forward(self):
        return self.x


def mlp(h: int, d: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, classes))


def hidden_for(params: int, d: int = 64, classes: int = 10) -> int:
    return max(1, round((params - classes) / (d + 1 + classes)))


def ll_objective(state):
    w = torch.sigmoid(state["upper_model"]())
    losses = Fn.cross_entropy(state["lower_model"](state["data"]), state["target"], reduction="none")
    return (w * losses).mean()


def ul_objective(state):
    return Fn.cross_entropy(state["lower_model"](state["data"]), state["target"])


METHODS = ("BVFIM", "Implicit", "RAD")


def build(method: str, h: int, n: int, T: int, lr: float, seed: int):
    torch.manual_seed(seed)
    um, lm = Weights(n), mlp(h)
    if method == "RAD":
        s = methods.Dynamic(ll_objective, T, um, ul_objective, lm, lr=lr)
    elif method == "Implicit":
        s = methods.Implicit(ul_objective, um, ll_objective, lm, lr, T, lower_loop=T)
    elif method == "BVFIM":
        s = methods.BVFIM(ul_objective, um, ll_objective, ll_model=lm, lower_loop=T, y_loop=T, z_lr=lr, y_lr=lr)
    else:
        raise ValueError(method)
    return s, um


def time_size(h, n, T, lr, reps, data, seed):
    """Median seconds per ``compute_gradients`` of each method. The calls are interleaved (one of each
    method per round, after one warm-up round) so that background load affects all methods alike."""
    solvers = {m: build(m, h, n, T, lr, seed) for m in METHODS}
    times = {m: [] for m in METHODS}
    for r in range(reps + 1):
        for m, (solver, um) in solvers.items():
            um.x.grad = None
            t0 = time.perf_counter()
            solver.compute_gradients(*data)
            if r > 0:
                times[m].append(time.perf_counter() - t0)
    return {m: (statistics.median(times[m]), solvers[m][0].diagnostics) for m in METHODS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6],
                    help="numbers of lower-level parameters (default 1e3 1e4 1e5 1e6)")
    ap.add_argument("--T", type=int, default=20, help="inner loop length, equal for all methods (default 20)")
    ap.add_argument("--n", type=int, default=512, help="training samples = upper variables (default 512)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per method and size (default 3)")
    ap.add_argument("--lr", type=float, default=0.1, help="lower step size (default 0.1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="small sizes, T=5, 1 rep (seconds)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.T, args.reps, args.n = [1e3, 1e4], 5, 1, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(args.n, 64, generator=g), torch.randint(0, 10, (args.n,), generator=g),
            torch.randn(args.n, 64, generator=g), torch.randint(0, 10, (args.n,), generator=g))
    data = (data[2], data[3], data[0], data[1])  # (ul_data, ul_target, ll_data, ll_target)
    rows = []
    for size in tqdm([int(s) for s in args.sizes], desc="bench_methods", unit="size"):
        h = hidden_for(size)
        n_params = sum(p.numel() for p in mlp(h).parameters())
        for method, (t, diag) in time_size(h, args.n, args.T, args.lr, args.reps, data, seed=1).items():
            rows.append(dict(target_params=size, lower_params=n_params, hidden=h, method=method, T=args.T,
                             seconds=t, cg_iterations=diag.get("iterations", ""),
                             bvfim_backtracks=diag.get("backtracks", "")))
    print(f"\nUpper-gradient time per outer iteration, T={args.T}, n={args.n}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'lower params':>12} {'BVFIM s':>9} {'Implicit s':>10} {'RAD s':>9} {'Implicit/BVFIM':>15} "
          f"{'RAD/BVFIM':>10}")
    summary = []
    for size in args.sizes:
        r = {row["method"]: row for row in rows if row["target_params"] == int(size)}
        b, i, d = r["BVFIM"]["seconds"], r["Implicit"]["seconds"], r["RAD"]["seconds"]
        summary.append(dict(lower_params=r["BVFIM"]["lower_params"], bvfim_s=b, implicit_s=i, rad_s=d,
                            implicit_over_bvfim=i / b, rad_over_bvfim=d / b))
        print(f"{r['BVFIM']['lower_params']:>12} {b:9.4f} {i:10.4f} {d:9.4f} {i / b:15.2f} {d / b:10.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_methods.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "bench_methods.json"), "w") as fh:
        json.dump(dict(args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(), rows=rows,
                       summary=summary), fh, indent=1)
    print(f"wrote {args.out}/bench_methods.csv and .json")
    return summary


if __name__ == "__main__":
    main()
