"""Constrained-layer benchmark, reported as ratios measured in one run (interleaved repeats, medians).

Problem: a QP with n = 400 variables and m = 200 inequality constraints (100 active at a planted KKT point,
x in R^20 entering the linear term and the right-hand side), outer loss 1/2||y - y_t||^2 + 1/2||x||^2.

1. backward: time of ``constrained.hypergradient`` given the solved primal-dual pair, over the time of
   cvxpylayers' backward on the same problem (diffcp; SCS at eps=1e-10). Target <= 0.1, at a relative
   error <= 1e-6 to the exact QP formula. cvxpylayers' default derivative mode ("lsqr") and its accurate
   "dense" mode are both measured; the headline uses the accurate one.
2. end-to-end: cvxpy solve (Clarabel) + our hypergradient, over cvxpylayers forward + backward. Target <= 0.5.

Run: ``python benchmarks/bench_constrained.py [--quick] [--out results]``; writes
bench_constrained.json and .csv into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from constrained_problems import planted_cvxpy, planted_qp, rel_err  # noqa: E402  (the tests' reference QP)

import constrained as C  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--active", type=int, default=100)
    ap.add_argument("--d", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="n=100, m=50, 3 repeats (seconds)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch's, i.e. the cores, as numpy/scipy use them for cvxpylayers)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.m, args.active, args.repeats = 100, 50, 25, 3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    qp = planted_qp(n=args.n, m=args.m, k=0, d=args.d, n_active=args.active, seed=0)
    exact = qp.exact_hypergrad()
    problem = C.ConstrainedProblem(qp.objective, qp.ineq)
    prob, xp, y, ineq, _ = planted_cvxpy(qp)
    layer = C.DualLayer(prob, [xp], [y], ineq=ineq)
    lsqr_args = dict(C.cvxpy_bridge.DEFAULT_LAYER_ARGS)
    dense_args = dict(lsqr_args, mode="dense")
    x = qp.x.clone().requires_grad_(True)
    sol = C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq, torch_problem=problem)  # warm-up + the pair

    given_h = C.ConstrainedProblem(qp.objective, qp.ineq, hessian=lambda p, h, mu, nu: qp.Q)  # Q known
    ours = {"auto": dict(solver="auto"), "auto_given_hessian": dict(solver="auto", problem=given_h),
            "minres": dict(solver="minres"), "minres_matrix_free": dict(solver="minres", materialize=False)}
    times = {k: [] for k in list(ours) + ["cvxpy_solve", "layer_fwd_lsqr", "layer_bwd_lsqr", "layer_fwd_dense",
                                          "layer_bwd_dense"]}
    errors = {}
    for _ in range(args.repeats):
        for name, kw in ours.items():
            kw = dict(kw)
            prob_k = kw.pop("problem", problem)
            t, res = timed(lambda: C.hypergradient(prob_k, sol.params, [x], qp.outer_loss, sol.mu, set_grad=False,
                                                   **kw))
            times[name].append(t)
            errors[name] = rel_err(res.grads[0], exact)
            errors[name + "_solver"] = res.solver
        times["cvxpy_solve"].append(timed(lambda: C.solve_cvxpy(prob, [xp], [x], [y], ineq=ineq))[0])
        for mode, sargs in (("lsqr", lsqr_args), ("dense", dense_args)):
            t, ls = timed(lambda: layer(x, solver_args=sargs))
            times[f"layer_fwd_{mode}"].append(t)
            loss = qp.outer_loss(ls.params, [x])
            t, g = timed(lambda: torch.autograd.grad(loss, x)[0])
            times[f"layer_bwd_{mode}"].append(t)
            errors[f"cvxpylayers_{mode}"] = rel_err(g, exact)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name in ours:
        for mode in ("dense", "lsqr"):
            rows.append(dict(
                ours=name, ours_solver=errors[name + "_solver"], cvxpylayers_mode=mode,
                ours_ms=1e3 * med[name], layer_bwd_ms=1e3 * med[f"layer_bwd_{mode}"],
                backward_ratio=med[name] / med[f"layer_bwd_{mode}"],
                e2e_ratio=(med["cvxpy_solve"] + med[name]) / (med[f"layer_fwd_{mode}"] + med[f"layer_bwd_{mode}"]),
                ours_rel_err=errors[name], cvxpylayers_rel_err=errors[f"cvxpylayers_{mode}"]))
    print(f"QP n={args.n}, m={args.m} ({args.active} active), d={args.d}; medians of {args.repeats} interleaved "
          f"runs; cvxpy solve {1e3 * med['cvxpy_solve']:.1f} ms")
    print(f"{'ours':<20}{'vs layers':<10}{'ours ms':>9}{'bwd ms':>9}{'bwd ratio':>11}{'e2e ratio':>11}"
          f"{'our err':>10}{'layer err':>11}")
    for r in rows:
        print(f"{r['ours']:<20}{r['cvxpylayers_mode']:<10}{r['ours_ms']:>9.1f}{r['layer_bwd_ms']:>9.1f}"
              f"{r['backward_ratio']:>11.3f}{r['e2e_ratio']:>11.3f}{r['ours_rel_err']:>10.1e}"
              f"{r['cvxpylayers_rel_err']:>11.1e}")
    head = next(r for r in rows if r["ours"] == "auto" and r["cvxpylayers_mode"] == "dense")
    print(f"headline (auto vs cvxpylayers' accurate dense backward): backward ratio {head['backward_ratio']:.3f} "
          f"(target <= 0.1), end-to-end {head['e2e_ratio']:.3f} (target <= 0.5), error {head['ours_rel_err']:.1e} "
          f"(needs <= 1e-6)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_constrained.json"), "w") as f:
        json.dump(dict(config=vars(args), median_s=med, rows=rows, headline=head), f, indent=2)
    with open(os.path.join(args.out, "bench_constrained.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return head


if __name__ == "__main__":
    main()
