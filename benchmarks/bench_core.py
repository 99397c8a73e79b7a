"""Core benchmarks, reported as ratios measured in one run (machines are noisy; ratios travel better).

1. cost:   time of ``hypergrad.cg`` with K = 20 over the time of 20 raw Hessian-vector products of the
           inner loss (reverse-over-reverse, graph built once); logistic regression, n = 2000 samples,
           d in {100, 1000, 10000}. Targets: <= 1.25 at d = 100, <= 1.05 at d = 10000.
   tensors: the same ratio on a 20-layer MLP, its 40 parameter tensors as a list and as one vector
           (the solvers see one flat vector either way: no per-tensor work per iteration).
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
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import hypergrad as hg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _memory, also when imported from elsewhere
import _memory  # noqa: E402


def logreg(n, d, dtype, seed=0, col_scale_decades=0.0):
    """L2-regularized logistic regression with per-feature weights e^lam; validation loss as E.
    ``col_scale_decades`` > 0 scales the feature columns from 1 down to 10^-decades (ill-conditioning)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype) / d ** 0.5
    X = X * torch.logspace(0, -col_scale_decades, d, dtype=dtype)
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
    warnings.filterwarnings("ignore", category=hg.FixedPointWarning)  # cost only: w is any point
    for d in dims:
        # columns scaled over 2 decades: 20 CG iterations stay far from convergence, so both sides do
        # exactly K products (CG stops early at the rounding floor on well-conditioned problems)
        inner, outer = logreg(2000, d, dtype, col_scale_decades=2.0)
        lam = torch.full((d,), -2.0, dtype=dtype, requires_grad=True)
        w = torch.randn(d, dtype=dtype) * 0.1
        fp = hg.GradientDescent(inner, 1.0)

        def ours():
            hg.cg([w], [lam], K, fp, outer, tol=0.0, set_grad=False)

        its = hg.hypergradient([w], [lam], fp, outer, solver="cg", K=K, tol=0.0, set_grad=False).iterations
        if its != K:
            raise RuntimeError(f"cg did {its} products instead of {K}: the comparison would be unfair")

        def raw_hvp():
            wl = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(inner([wl], [lam]), wl, create_graph=True)
            v = torch.ones_like(wl)
            for _ in range(K):
                (v,) = torch.autograd.grad(g, wl, grad_outputs=v, retain_graph=True)

        def minimal_cg():
            """The least a CG hypergradient must do, hand-written: no input or NaN checks, no lists, no
            convergence monitor; it shows what the library's safety costs."""
            wl = w.detach().requires_grad_(True)
            (gw,) = torch.autograd.grad(outer([wl], [lam]), wl)
            (g,) = torch.autograd.grad(inner([wl], [lam]), wl, create_graph=True)
            mapped = wl - g
            x, r = torch.zeros_like(gw), gw.clone()
            p, rr = r, torch.dot(r, r).item()
            for _ in range(K):
                (jt,) = torch.autograd.grad(mapped, wl, grad_outputs=p, retain_graph=True)
                Ap = p - jt
                a = rr / torch.dot(p, Ap).item()
                x, r = x.add(p, alpha=a), r.add(Ap, alpha=-a)
                rn = torch.dot(r, r).item()
                p, rr = r.add(p, alpha=rn / rr), rn
            torch.autograd.grad(mapped, lam, grad_outputs=x)

        for f in (ours, raw_hvp, minimal_cg):  # warm-up
            f()
        t_ours, t_raw, t_min = [], [], []
        for _ in range(repeats):  # interleaved, so drift hits all alike
            t_ours += _time(ours, 1)
            t_raw += _time(raw_hvp, 1)
            t_min += _time(minimal_cg, 1)
        med = {k: statistics.median(v) for k, v in (("ours", t_ours), ("raw", t_raw), ("min", t_min))}
        rows.append(dict(d=d, cg_ms=1e3 * med["ours"], hvp_ms=1e3 * med["raw"], minimal_cg_ms=1e3 * med["min"],
                         ratio=med["ours"] / med["raw"], minimal_ratio=med["min"] / med["raw"]))
        print(f"  d={d:6d}: cg(K={K}) {rows[-1]['cg_ms']:.3f} ms, {K} raw HVPs {rows[-1]['hvp_ms']:.3f} ms, "
              f"ratio {rows[-1]['ratio']:.3f} (a hand-written unchecked CG loop: {rows[-1]['minimal_ratio']:.3f})")
    return rows


def mlp_problem(layers=20, width=8, n=256, seed=0, dtype=torch.float32, one_tensor=False):
    """A ``layers``-layer tanh MLP regression (2 * layers parameter tensors), one log weight decay per
    tensor as hparams; ``one_tensor``: the same parameters as one flat vector (sliced inside the loss)."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(n, width, generator=g, dtype=dtype), torch.randn(n, width, generator=g, dtype=dtype)
    shapes = [s for _ in range(layers) for s in ((width, width), (width,))]
    params = [torch.randn(s, generator=g, dtype=dtype) * (0.5 / width ** 0.5 if len(s) == 2 else 0.1) for s in shapes]
    lam = torch.full((len(shapes),), -3.0, dtype=dtype, requires_grad=True)

    def tensors(ps):
        return hg.tensor_list.unflatten(ps[0], params) if one_tensor else ps

    def forward(ps):
        h = X
        for W, b in zip(ps[0::2], ps[1::2]):
            h = torch.tanh(h @ W + b)
        return h

    def inner(ps, hs):
        ps = tensors(ps)
        return ((forward(ps) - Y) ** 2).mean() + 0.5 * sum(e * (p * p).sum() for e, p in zip(hs[0].exp(), ps))

    def outer(ps, hs):
        return ((forward(tensors(ps)) - 0.5 * Y) ** 2).mean()

    return ([hg.tensor_list.flatten(params)] if one_tensor else params), lam, inner, outer


def bench_tensors(repeats, K=20, layers=20):
    """``hg.cg`` over K raw HVPs on a 20-layer MLP: its 40 parameter tensors as they are, and as one flat
    vector (the same problem), with the hand-written unchecked CG loop over the list for reference."""
    rows = []
    warnings.filterwarnings("ignore", category=hg.FixedPointWarning)
    for one in (False, True):
        params, lam, inner, outer = mlp_problem(layers=layers, one_tensor=one)
        fp = hg.GradientDescent(inner, 0.5)

        def ours():
            hg.cg(params, [lam], K, fp, outer, tol=0.0, set_grad=False)

        its = hg.hypergradient(params, [lam], fp, outer, solver="cg", K=K, tol=0.0, set_grad=False).iterations
        if its != K:
            raise RuntimeError(f"cg did {its} products instead of {K}: the comparison would be unfair")

        def raw_hvp():
            ws = [p.detach().requires_grad_(True) for p in params]
            gs = torch.autograd.grad(inner(ws, [lam]), ws, create_graph=True)
            v = [torch.ones_like(w) for w in ws]
            for _ in range(K):
                v = torch.autograd.grad(gs, ws, grad_outputs=v, retain_graph=True)

        def minimal_cg():
            ws = [p.detach().requires_grad_(True) for p in params]
            gw = torch.autograd.grad(outer(ws, [lam]), ws)
            mapped = [w - 0.5 * g for w, g in zip(ws, torch.autograd.grad(inner(ws, [lam]), ws, create_graph=True))]
            dot = lambda a, b: sum(torch.dot(u.reshape(-1), z.reshape(-1)) for u, z in zip(a, b)).item()
            x, r = [torch.zeros_like(t) for t in gw], [t.clone() for t in gw]
            p, rr = r, dot(r, r)
            for _ in range(K):
                Ap = [a - j for a, j in zip(p, torch.autograd.grad(mapped, ws, grad_outputs=p, retain_graph=True))]
                a = rr / dot(p, Ap)
                x, r = [u.add(q, alpha=a) for u, q in zip(x, p)], [u.add(q, alpha=-a) for u, q in zip(r, Ap)]
                rn = dot(r, r)
                p, rr = [u.add(q, alpha=rn / rr) for u, q in zip(r, p)], rn
            torch.autograd.grad(mapped, lam, grad_outputs=x)

        for f in (ours, raw_hvp, minimal_cg):
            f()
        t = {"ours": [], "raw": [], "min": []}
        for _ in range(repeats):
            for k, f in (("ours", ours), ("raw", raw_hvp), ("min", minimal_cg)):
                t[k] += _time(f, 1)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append(dict(tensors=len(params), cg_ms=1e3 * med["ours"], hvp_ms=1e3 * med["raw"],
                         minimal_cg_ms=1e3 * med["min"], ratio=med["ours"] / med["raw"],
                         minimal_ratio=med["min"] / med["raw"]))
        print(f"  {layers}-layer MLP, {len(params):2d} tensor(s): cg(K={K}) {rows[-1]['cg_ms']:.3f} ms, {K} raw HVPs "
              f"{rows[-1]['hvp_ms']:.3f} ms, ratio {rows[-1]['ratio']:.3f} (hand-written unchecked CG loop over the "
              f"list: {rows[-1]['minimal_ratio']:.3f})")
    return rows


def bench_warm(steps=30, d=100, rtol=1e-6, outer_opt="sgd", first_step=0.05, dtype=torch.float64):
    """Warm vs cold adjoint solves along a real outer trajectory (inner solved by Newton's method).

    ``outer_opt``: "sgd" (hypergradient descent, the first step moves lambda by at most ``first_step``,
    later steps shrink with the hypergradient) or "adam" (lr ``first_step``: every step moves each
    lambda_j by about that much). The warm start saves log(||r0|| / ||b||) of the log(1/rtol) decades
    CG must gain, so the ratio depends on how far consecutive outer steps move."""
    inner, outer = logreg(2000, d, dtype)
    lam = torch.full((d,), -1.0, dtype=dtype, requires_grad=True)
    opt = None
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
        if opt is None:  # scale the outer step size once, from the first hypergradient
            opt = torch.optim.Adam([lam], lr=first_step) if outer_opt == "adam" else \
                torch.optim.SGD([lam], lr=first_step / r.grads[0].abs().max().item())
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
    res = dict(steps=steps, d=d, rtol=rtol, outer_opt=outer_opt, first_step=first_step, warm_products=warm_products, warm_max_rel_err=target,
               cold_K=K, cold_products=cold_products, cold_max_rel_err=max(errs),
               ratio=warm_products / cold_products)
    print(f"  outer {outer_opt} (first step {first_step}), rtol {rtol:.0e}: warm start: {warm_products} products (max rel. error {target:.1e}); cold start needs K={K}: "
          f"{cold_products} products (max rel. error {max(errs):.1e}); ratio {res['ratio']:.3f}")
    return res


_MEM_CHILD = r"""
import sys, torch, hypergrad as hg
from _memory import peak_growth_kib, reset_peak
torch.set_num_threads(1)
mode, T, n, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
X, y = torch.randn(n, 20, generator=g), torch.randn(n, 1, generator=g)
def inner(p, h):  # 2-layer MLP regression, one log weight decay per layer
    out = torch.tanh(X @ p[0] + p[1]) @ p[2]
    return ((out - y) ** 2).mean() + 0.5 * (h[0][0].exp() * (p[0] ** 2).sum() + h[0][1].exp() * (p[2] ** 2).sum())
outer = lambda p, h: (p[2] ** 2).sum()
lam = torch.full((2,), -3.0, requires_grad=True)
gd = hg.GradientDescent(inner, 0.1)
w0 = [torch.randn(20, hidden, generator=g) * 0.2, torch.zeros(hidden), torch.randn(hidden, 1, generator=g) * 0.2]
w0 = [t.requires_grad_(True) for t in w0]
hg.reverse_unroll(gd(w0, [lam]), [lam], outer, set_grad=False)  # warm up allocator, kernels, autograd
hg.reverse([[t.detach() for t in w0], [t.detach() for t in gd(w0, [lam])]], [lam], [gd], outer, set_grad=False)
base = reset_peak()  # import-time peaks do not count
if mode == "unroll":
    w = w0
    for _ in range(T):
        w = gd(w, [lam])
    hg.reverse_unroll(w, [lam], outer, set_grad=False)
else:
    hist = [[t.detach() for t in w0]]
    for _ in range(T):
        hist.append([t.detach() for t in gd([t.requires_grad_(True) for t in hist[-1]], [lam])])
    hg.reverse(hist, [lam], [gd] * T, outer, set_grad=False)
print(peak_growth_kib(base))
"""


def bench_memory(T=100, n=1000, hidden=64):
    """Peak resident-memory growth of a fresh process: T gradient steps of a 2-layer MLP (the per-step
    graph holds activations of size n x hidden; an iterate holds only the parameters)."""
    peak = {}
    for mode in ("unroll", "reverse"):
        peak[mode] = int(_memory.run_child(_MEM_CHILD, mode, T, n, hidden))  # KiB
    res = dict(T=T, n=n, hidden=hidden, reverse_unroll_kib=peak["unroll"], reverse_kib=peak["reverse"],
               ratio=peak["reverse"] / peak["unroll"])
    print(f"  T={T}: peak memory growth reverse_unroll {peak['unroll'] / 1024:.1f} MiB, reverse "
          f"{peak['reverse'] / 1024:.1f} MiB, ratio {res['ratio']:.3f}")
    return res


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[1, 1.3]))
    rows = results["cost"]
    ax[0].plot([r["d"] for r in rows], [r["ratio"] for r in rows], "o-", label="hypergrad.cg, K=20")
    if "minimal_ratio" in rows[0]:
        ax[0].plot([r["d"] for r in rows], [r["minimal_ratio"] for r in rows], "s--", label="unchecked hand-written CG")
    ax[0].axhline(1.0, color="gray", lw=0.8, ls="--", label="20 raw HVPs")
    ax[0].set(xscale="log", xlabel="features d", ylabel="time / time of 20 HVPs", title="CG overhead")
    ax[0].legend(fontsize=8)
    warm = results["warm"]
    labels = [f"{w['outer_opt']} step {w['first_step']}, rtol {w['rtol']:.0e}" for w in warm]
    labels.append("reverse/unroll peak memory")
    vals = [w["ratio"] for w in warm] + [results["memory"]["ratio"]]
    ax[1].barh(range(len(vals)), vals, color=["C0"] * len(warm) + ["C1"])
    ax[1].set_yticks(range(len(vals)), labels, fontsize=7)
    ax[1].invert_yaxis()
    ax[1].axvline(0.5, color="C0", ls=":", lw=1, label="warm-start target 0.5")
    ax[1].axvline(0.2, color="C1", ls=":", lw=1, label="memory target 0.2")
    ax[1].set(xlabel="ratio", title="warm/cold Hessian-vector products; memory")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (seconds)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    torch.set_num_threads(args.threads)
    parts = ["cost", "tensors", "warm", "memory"]
    results = dict(torch=torch.__version__, hypergrad=hg.__version__, threads=torch.get_num_threads())
    for part in tqdm(parts, desc="benchmarks", file=sys.stderr):
        print(f"[{part}]")
        if part == "cost":
            results[part] = bench_cost([100, 1000] if args.quick else [100, 1000, 10000],
                                       repeats=5 if args.quick else 41)
        elif part == "tensors":
            results[part] = bench_tensors(repeats=5 if args.quick else 41)
        elif part == "warm":
            settings = [("adam", 0.05), ("sgd", 0.05), ("sgd", 0.005)]
            results[part] = [bench_warm(steps=5 if args.quick else 30, rtol=rtol, outer_opt=o, first_step=s)
                             for o, s in settings[: 1 if args.quick else 3] for rtol in (1e-4, 1e-6, 1e-8)]
        else:
            results[part] = bench_memory(T=20 if args.quick else 100)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_core.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(args.out, "bench_core.png"))
    return results


if __name__ == "__main__":
    main()
