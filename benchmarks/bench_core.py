"""Core benchmarks, reported as ratios measured in one run (machines are noisy; ratios travel better).

1. cost:   time of ``hypergrad.cg`` with K = 20 over the time of 20 raw Hessian-vector products of the
           inner loss (reverse-over-reverse, graph built once); logistic regression, n = 2000 samples,
           d in {100, 1000, 10000}. Targets: <= 1.25 at d = 100, <= 1.10 at d = 10000.
2. warm:   an outer loop of 30 hyperparameter steps; total Hessian-vector products with warm start
           (v0 = previous adjoint) and a relative tolerance, over a cold start with the fixed K that
           reaches the same hypergradient accuracy. Target <= 0.5.
3. memory: peak memory of ``reverse`` over ``reverse_unroll`` for T = 100 inner steps, each measured
           as the peak resident-memory growth of a fresh process. Target <= 0.2.

Run: ``python benchmarks/bench_core.py [--quick]``; writes results/bench_core.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import hypergrad as hg


def logreg(n, d, dtype, seed=0):
    """L2-regularized logistic regression with per-feature weights e^lam; validation loss as E."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype) / d ** 0.5
    w_true = torch.randn(d, generator=g, dtype=dtype)
    y = (X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=dtype) > 0).to(dtype)
    Xv = torch.randn(n // 2, d, generator=g, dtype=dtype) / d ** 0.5
    yv = (Xv @ w_true > 0).to(dtype)

    def inner(params, hparams):
        return F.binary_cross_entropy_with_logits(X @ params[0], y) + 0.5 * (torch.exp(hparams[0]) * params[0] ** 2).sum() / n

    def outer(params, hparams):
        return F.binary_cross_entropy_with_logits(Xv @ params[0], yv)

    return inner, outer


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_cost(dims, repeats, dtype=torch.float32, K=20):
    rows = []
    for d in dims:
        inner, outer = logreg(2000, d, dtype)
        lam = torch.full((d,), -2.0, dtype=dtype, requires_grad=True)
        w = torch.randn(d, dtype=dtype) * 0.1
        fp = hg.GradientDescent(inner, 1.0)

        def ours():
            hg.cg([w], [lam], K, fp, outer, tol=0.0, set_grad=False)

        def raw_hvp():
            wl = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(inner([wl], [lam]), wl, create_graph=True)
            v = torch.ones_like(wl)
            for _ in range(K):
                (v,) = torch.autograd.grad(g, wl, grad_outputs=v, retain_graph=True)

        for f in (ours, raw_hvp):  # warm-up
            f()
        t_ours, t_raw = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            t_ours += _time(ours, 1)
            t_raw += _time(raw_hvp, 1)
        rows.append(dict(d=d, cg_ms=1e3 * statistics.median(t_ours), hvp_ms=1e3 * statistics.median(t_raw),
                         ratio=statistics.median(t_ours) / statistics.median(t_raw)))
        print(f"  d={d:6d}: cg(K={K}) {rows[-1]['cg_ms']:.3f} ms, {K} raw HVPs {rows[-1]['hvp_ms']:.3f} ms, "
              f"ratio {rows[-1]['ratio']:.3f}")
    return rows


def bench_warm(steps=30, d=100, rtol=1e-6, dtype=torch.float64):
    """Warm vs cold adjoint solves along a real outer trajectory (inner solved by Newton's method)."""
    inner, outer = logreg(2000, d, dtype)
    lam = torch.full((d,), -1.0, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=0.05)
    fp = hg.GradientDescent(inner, 1.0)
    w = torch.zeros(d, dtype=dtype)
    v_prev, warm_products, warm_errs, states = None, 0, [], []
    for _ in range(steps):
        for _ in range(8):  # Newton on the inner problem (not counted: the same for both)
            g = torch.autograd.functional.jacobian(lambda u: inner([u], [lam.detach()]), w)
            H = torch.autograd.functional.hessian(lambda u: inner([u], [lam.detach()]), w)
            w = w - torch.linalg.solve(H, g)
        ref = hg.hypergradient([w], [lam], fp, outer, solver="dense", set_grad=False).grads[0]
        r = hg.hypergradient([w], [lam], fp, outer, solver="cg", K=500, tol=0.0, rtol=rtol, v0=v_prev,
                             set_grad=False)
        warm_products += r.iterations
        warm_errs.append(((r.grads[0] - ref).norm() / ref.norm()).item())
        states.append((w.clone(), lam.detach().clone(), ref))
        v_prev = r.v
        opt.zero_grad()
        lam.grad = r.grads[0].clone()
        opt.step()
    target = max(warm_errs)
    for K in range(1, 500):  # smallest fixed K whose cold-start error is <= the warm-start error everywhere
        errs = []
        for w_s, lam_s, ref in states:
            lam_s = lam_s.requires_grad_(True)
            g = hg.hypergradient([w_s], [lam_s], fp, outer, solver="cg", K=K, tol=0.0, set_grad=False).grads[0]
            errs.append(((g - ref).norm() / ref.norm()).item())
        if max(errs) <= target:
            break
    cold_products = steps * K
    res = dict(steps=steps, d=d, rtol=rtol, warm_products=warm_products, warm_max_rel_err=target,
               cold_K=K, cold_products=cold_products, cold_max_rel_err=max(errs),
               ratio=warm_products / cold_products)
    print(f"  warm start: {warm_products} products (max rel. error {target:.1e}); cold start needs K={K}: "
          f"{cold_products} products (max rel. error {max(errs):.1e}); ratio {res['ratio']:.3f}")
    return res


_MEM_CHILD = r"""
import resource, sys, torch, hypergrad as hg
torch.set_num_threads(1)
mode, T, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
X = torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5
y = torch.randn(n, generator=g, dtype=torch.float64)
lam = torch.zeros(d, dtype=torch.float64, requires_grad=True)
inner = lambda p, h: 0.5 * ((X @ p[0] - y) ** 2).sum() + 0.5 * (torch.exp(h[0]) * p[0] ** 2).sum()
outer = lambda p, h: 0.5 * (p[0] ** 2).sum()
gd = hg.GradientDescent(inner, 0.1)
w0 = torch.zeros(d, dtype=torch.float64, requires_grad=True)
gd([w0], [lam]); torch.autograd.grad(outer([w0], [lam]), w0)  # warm up allocator and autograd
import os
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # current RSS, KiB
if mode == "unroll":
    w = [w0]
    for _ in range(T):
        w = gd(w, [lam])
    hg.reverse_unroll(w, [lam], outer, set_grad=False)
else:
    hist = [[w0.detach()]]
    for _ in range(T):
        hist.append([t.detach() for t in gd([hist[-1][0].requires_grad_(True)], [lam])])
    hg.reverse(hist, [lam], [gd] * T, outer, set_grad=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def bench_memory(T=100, n=4000, d=2000):
    peak = {}
    for mode in ("unroll", "reverse"):
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, mode, str(T), str(n), str(d)],
                             capture_output=True, text=True, check=True)
        peak[mode] = int(out.stdout.strip().splitlines()[-1])  # KiB
    res = dict(T=T, n=n, d=d, reverse_unroll_kib=peak["unroll"], reverse_kib=peak["reverse"],
               ratio=peak["reverse"] / peak["unroll"])
    print(f"  T={T}: peak memory growth reverse_unroll {peak['unroll'] / 1024:.1f} MiB, reverse "
          f"{peak['reverse'] / 1024:.1f} MiB, ratio {res['ratio']:.3f}")
    return res


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    rows = results["cost"]
    ax[0].plot([r["d"] for r in rows], [r["ratio"] for r in rows], "o-", label="hypergrad.cg, K=20")
    ax[0].axhline(1.0, color="gray", lw=0.8, ls="--", label="20 raw HVPs")
    ax[0].set(xscale="log", xlabel="features d", ylabel="time / time of 20 HVPs", title="CG overhead")
    ax[0].legend()
    labels = ["warm/cold\nproducts", "reverse/unroll\npeak memory"]
    vals = [results["warm"]["ratio"], results["memory"]["ratio"]]
    ax[1].bar(labels, vals, color=["C0", "C1"])
    ax[1].axhline(0.5, color="C0", ls=":", lw=1)
    ax[1].axhline(0.2, color="C1", ls=":", lw=1)
    ax[1].set(ylabel="ratio (dotted: targets)", title="warm start and memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (seconds)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    parts = ["cost", "warm", "memory"]
    results = dict(torch=torch.__version__, hypergrad=hg.__version__, threads=torch.get_num_threads())
    for part in tqdm(parts, desc="benchmarks", file=sys.stderr):
        print(f"[{part}]")
        if part == "cost":
            results[part] = bench_cost([100, 1000] if args.quick else [100, 1000, 10000],
                                       repeats=5 if args.quick else 41)
        elif part == "warm":
            results[part] = bench_warm(steps=5 if args.quick else 30)
        else:
            results[part] = bench_memory(T=20 if args.quick else 100)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_core.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(args.out, "bench_core.png"))
    return results


if __name__ == "__main__":
    main()
