"""Stochastic bilevel solvers on benchmark_bilevel's quadratic setting: ||grad h(x)||^2 against wall time and
against oracle calls, median and quartiles over seeds, with the deterministic methods on the same problem.

The setting (benchopt's ``config/quadratics_021424_best_params.yml``): n_inner = 32768, n_outer = 1024,
dim_inner = 100, dim_outer = 10, mu = 0.1, L_cross = 0.1, batch 64, x0 = -2, y0 = 0, and its tuned step sizes
(SABA, SRBA, StocBiO, VRBO, F2SA: 0.1 with outer ratio 1; AmIGO 0.01, ratio 0.1; MRBO 0.1, ratio 0.1); SOBA,
BOME and the deterministic methods (Implicit CG, RAD; full batch) with their defaults (step 0.1, ratio 1)
since the tuned file has none for them. ||grad h||^2 is exact (closed form by dense solves, outside the timed
steps). One problem (its random_state 2442), 10 solver seeds (the batch orders). float64, one thread.

    python benchmarks/bench_stochastic.py             # the full setting, 10 seeds, 6 s per run (~15 min)
    python benchmarks/bench_stochastic.py --quick     # n_inner 4096, 2 seeds, 1 s per run

Writes results/bench_stochastic.{json,csv,md,png} (the README's figure is docs/bench_stochastic.png, a copy).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from methods.stochastic import FiniteSum  # noqa: E402
from methods.stochastic.quadratics import make_quadratic_bilevel  # noqa: E402

#: label -> (module, class, kwargs); the step sizes of the benchmark's tuned quadratic config
METHODS = {
    "SOBA": ("soba", "SOBA", dict(step_size=0.1, outer_ratio=1.0)),
    "SABA": ("saba", "SABA", dict(step_size=0.1, outer_ratio=1.0)),
    "SRBA": ("srba", "SRBA", dict(step_size=0.1, outer_ratio=1.0, period_frac=0.5)),
    "AmIGO": ("amigo", "AmIGO", dict(step_size=0.01, outer_ratio=0.1, n_inner_steps=10)),
    "StocBiO": ("stocbio", "StocBiO", dict(step_size=0.1, outer_ratio=1.0, n_inner_steps=10, n_shia_steps=10)),
    "MRBO": ("mrbo", "MRBO", dict(step_size=0.1, outer_ratio=0.1, n_shia_steps=10, eta=0.5)),
    "VRBO": ("vrbo", "VRBO", dict(step_size=0.1, outer_ratio=1.0, n_inner_steps=10, n_shia_steps=10,
                                  period_frac=0.01)),
    "F2SA": ("f2sa", "F2SA", dict(step_size=0.1, outer_ratio=1.0, n_inner_steps=10, lmbda0=1.0,
                                  delta_lmbda=0.01)),
    "BOME": ("bome", "BOME", dict(step_size=0.1, outer_ratio=1.0, n_inner_steps=10, eta=0.5)),
    "Implicit CG (full batch)": ("full_batch", "FullBatchImplicit", dict(step_size=0.1, n_inner_steps=10, k=10)),
    "RAD (full batch)": ("full_batch", "FullBatchRAD", dict(step_size=0.1, n_inner_steps=10)),
}


def solver_class(module: str, name: str):
    return getattr(importlib.import_module(f"methods.stochastic.{module}"), name)


def value_gradient(pb):
    """grad h(x) = A x + b (h is quadratic): A and b from dense solves, so the metric costs one matvec."""
    f, F = pb.inner, pb.outer
    J = -torch.linalg.solve(f.H, f.C.T)
    A = pb.value_hessian()
    y0 = -torch.linalg.solve(f.H, f.l)                        # y*(0)
    b = F.C @ y0 + F.m + J.T @ (F.H @ y0 + F.l)                 # grad h(0)
    return lambda x: float((A @ x + b).square().sum())


def run_one(pb, metric, cls, kwargs, seed: int, batch: int, budget: float, points: int = 60):
    """One run until ``budget`` seconds of steps; the metric recorded on a log grid of step time."""
    inner = FiniteSum(pb.inner.batch_loss, pb.inner.n, batch, seed=2 * seed)
    outer = FiniteSum(pb.outer.batch_loss, pb.outer.n, batch, seed=2 * seed + 1)
    dt = pb.inner.a.dtype
    s = cls(inner, outer, torch.zeros(pb.inner.a.shape[1], dtype=dt), -2 * torch.ones(pb.inner.b.shape[1], dtype=dt),
            **kwargs)
    grid = [budget * 10 ** (-3 + 3 * k / (points - 1)) for k in range(points)]
    rec = [(0.0, 0.0, 0, metric(s.x))]
    spent, k, status = 0.0, 0, "ok"
    while spent < budget:
        t0 = time.perf_counter()
        try:
            s.step()
        except Exception as e:  # a diverging method is a result, not a crash of the benchmark
            status = f"{type(e).__name__}"
            break
        spent += time.perf_counter() - t0
        if k < len(grid) and spent >= grid[k] or spent >= budget:
            rec.append((spent, s.oracle_calls, s.t, metric(s.x)))
            while k < len(grid) and spent >= grid[k]:
                k += 1
    return dict(time=[r[0] for r in rec], calls=[r[1] for r in rec], steps=[r[2] for r in rec],
                value=[r[3] for r in rec], status=status)


def at(xs, ys, grid):
    """The last recorded y at or before each grid point (NaN before the first and after the run's end)."""
    out, j = [], 0
    for g in grid:
        if g > xs[-1] * (1 + 1e-9):
            out.append(math.nan)
            continue
        while j + 1 < len(xs) and xs[j + 1] <= g:
            j += 1
        out.append(ys[j] if xs[j] <= g else math.nan)
    return out


def quantiles(rows):
    qs = []
    for col in zip(*rows):
        v = sorted(c for c in col if not math.isnan(c))
        if 2 * len(v) < len(col):            # fewer than half the runs got there: no median
            qs.append((math.nan,) * 3)
            continue
        if not v:
            qs.append((math.nan,) * 3)
            continue
        q = lambda p: v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]  # noqa: E731
        qs.append((q(0.25), q(0.5), q(0.75)))
    return qs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-inner", type=int, default=32768)
    ap.add_argument("--n-outer", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of steps per run (default 6)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", nargs="+", default=None, help="a subset of the methods")
    ap.add_argument("--quick", action="store_true", help="n_inner 4096, 2 seeds, 1 s per run")
    ap.add_argument("--out", default="results")
    ap.add_argument("--from-json", default=None, help="redo the tables and plot from a previous run's JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_inner, args.seeds, args.budget = 4096, 2, 1.0
    torch.set_num_threads(1)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        for k in ("n_inner", "n_outer", "seeds", "budget", "batch"):
            setattr(args, k, saved["args"][k])
        return report(saved["runs"], args)
    from tqdm.auto import tqdm

    pb = make_quadratic_bilevel(args.n_inner, args.n_outer, 100, 10, mu=0.1, L_cross_inner=0.1,
                                L_cross_outer=0.1, seed=2442)
    metric = value_gradient(pb)
    names = args.only or list(METHODS)
    runs = {}
    with tqdm(total=len(names) * args.seeds, desc="runs") as bar:
        for seed in range(1, args.seeds + 1):          # seeds interleaved: machine drift hits every method alike
            for name in names:
                module, cls, kw = METHODS[name]
                runs.setdefault(name, []).append(run_one(pb, metric, solver_class(module, cls), kw, seed,
                                                         args.batch, args.budget))
                bar.update()
    return report(runs, args)


def report(runs, args):
    """Tables, JSON/CSV and the plot from the runs."""
    t_grid = [args.budget * 10 ** (-3 + 3 * k / 59) for k in range(60)]
    max_calls = max(r["calls"][-1] for rs in runs.values() for r in rs)
    c_grid = [max_calls * 10 ** (-4 + 4 * k / 59) for k in range(60)]
    start = next(iter(runs.values()))[0]["value"][0]
    summary = {}
    for name, rs in runs.items():
        qt = quantiles([at(r["time"], r["value"], t_grid) for r in rs])
        qc = quantiles([at(r["calls"], r["value"], c_grid) for r in rs])
        final = sorted(r["value"][-1] for r in rs)
        reach = {}
        for thr in (1e-2, 1e-6, 1e-10):
            ts = sorted(next((t for t, v in zip(r["time"], r["value"]) if v <= thr * start), math.inf) for r in rs)
            reach[thr] = ts[len(ts) // 2]
        summary[name] = dict(time_quartiles=qt, calls_quartiles=qc, final_median=final[len(final) // 2],
                             final_q1=final[len(final) // 4], final_q3=final[(3 * len(final)) // 4],
                             steps_median=sorted(r["steps"][-1] for r in rs)[len(rs) // 2],
                             calls_median=sorted(r["calls"][-1] for r in rs)[len(rs) // 2],
                             time_to=reach, failures=[r["status"] for r in rs if r["status"] != "ok"])

    order = sorted(summary, key=lambda n: summary[n]["final_median"])
    lines = [f"Quadratic setting: n_inner={args.n_inner}, n_outer={args.n_outer}, dim 100/10, batch {args.batch}, "
             f"{args.seeds} seeds, {args.budget:g} s of steps per run; ||grad h(x0)||^2 = {start:.3g}.", "",
             "| method | median final ‖∇h‖² (q1 – q3) | steps | oracle calls | time to 1e-2 / 1e-6 / 1e-10 × start (s, median) |",
             "|---|---|---|---|---|"]
    for n in order:
        s = summary[n]
        tt = " / ".join("—" if math.isinf(s["time_to"][t]) else f"{s['time_to'][t]:.2g}" for t in (1e-2, 1e-6, 1e-10))
        fail = f" ({len(s['failures'])} failed: {s['failures'][0]})" if s["failures"] else ""
        lines.append(f"| {n} | {s['final_median']:.2e} ({s['final_q1']:.1e} – {s['final_q3']:.1e}){fail} | "
                     f"{s['steps_median']} | {s['calls_median']:.3g} | {tt} |")
    print("\n".join(lines))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_stochastic.json"), "w") as fh:
        json.dump(dict(args=vars(args), start=start, summary={n: {k: v for k, v in s.items()} for n, s in
                                                              summary.items()}, time_grid=t_grid, calls_grid=c_grid,
                       runs=runs), fh, default=str)
    with open(os.path.join(args.out, "bench_stochastic.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "time_s", "oracle_calls", "steps", "sq_grad_norm"])
        for n, rs in runs.items():
            for seed, r in enumerate(rs, 1):
                for row in zip(r["time"], r["calls"], r["steps"], r["value"]):
                    w.writerow([n, seed, *row])
    with open(os.path.join(args.out, "bench_stochastic.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(summary, t_grid, c_grid, start, args, order)


def plot(summary, t_grid, c_grid, start, args, order):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax in axes:
        ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
    for n in order:
        s = summary[n]
        style = "--" if "full batch" in n else ":" if n in ("BOME", "F2SA", "VRBO") else "-"
        for ax, grid, key in ((axes[0], t_grid, "time_quartiles"), (axes[1], c_grid, "calls_quartiles")):
            q1, med, q3 = zip(*s[key])
            (line,) = ax.plot(grid, med, style, label=n)
            ax.fill_between(grid, q1, q3, alpha=0.2, color=line.get_color())
    for ax, xl in ((axes[0], "wall time of steps (s)"), (axes[1], "oracle calls (minibatch derivative evaluations)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("‖∇h(x)‖²  (median, quartile band)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Quadratic bilevel (n_inner={args.n_inner}, {args.seeds} seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench_stochastic.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
