"""Every core method side by side: accuracy per Hessian-vector product, and cost as the model grows.

1. accuracy: ridge regression with per-feature L2 weights (d = 300) whose hypergradient has a closed
   form; relative error of each solver's hypergradient against the number of products with dPhi/dw^T
   (each one Hessian-vector product), for a well-conditioned (kappa = 10) and an ill-conditioned
   (kappa = 1e4) inner problem. Phi = w - grad L / L_max, so fixed-point/Neumann contract at 1 - 1/kappa.
2. cost: time of one hypergradient (20 products, tol = 0) of an MLP regression with 10^3 ... 10^6 inner
   parameters, for each implicit solver and for reverse mode through 20 GD steps (``reverse_unroll``,
   ``reverse_checkpointed``), over the time of 20 raw Hessian-vector products of the inner loss, all in
   one run.

Run: ``python benchmarks/bench_solvers.py [--quick] [--device cuda]``; writes results/bench_solvers.{json,png}.
"""
from __future__ import annotations

import argparse
import math
import json
import os
import statistics
import sys
import time

import torch

import hypergrad as hg

SOLVERS = ["cg", "minres", "gmres", "fixed_point", "neumann", "cg_normaleq"]


def ridge(d: int, cond: float, device, seed: int = 0, dtype=torch.float64):
    """Inner 1/2||Xw - y||^2 + 1/2 sum e^lam w^2 with A = X^T X + diag(e^lam) of condition ~cond;
    outer 1/2||Xv w - yv||^2; closed form dE/dlam = -e^lam w* A^-1 grad E."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * d
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    X = (U * torch.logspace(0, 0.5 * torch.log10(torch.tensor(cond)).item(), d, dtype=dtype)) @ V.T
    y, Xv, yv = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype), None
    yv = torch.randn(n, generator=g, dtype=dtype)
    X, y, Xv, yv = (t.to(device) for t in (X, y, Xv, yv))
    lam = torch.full((d,), -6.0, dtype=dtype, device=device, requires_grad=True)
    A = X.T @ X + torch.diag(lam.detach().exp())
    w = torch.linalg.solve(A, X.T @ y)
    ref = -lam.detach().exp() * w * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    step = 1.0 / torch.linalg.eigvalsh(A).max().item()

    def fp_map(params, hparams):
        p = params[0]
        return [p - step * (X.T @ (X @ p - y) + hparams[0].exp() * p)]

    def outer(params, hparams):
        return 0.5 * ((Xv @ params[0] - yv) ** 2).sum()

    return w, lam, fp_map, outer, ref


def bench_accuracy(quick: bool, device) -> list:
    d = 100 if quick else 300
    Ks = [1, 2, 4, 8, 16, 32, 64, 128, 256] + ([] if quick else [512, 1024])
    rows = []
    from tqdm import tqdm
    for cond in (10.0, 1e4):
        w, lam, fp_map, outer, ref = ridge(d, cond, device)
        for solver in tqdm(SOLVERS, desc=f"accuracy, kappa={cond:g}", disable=None):
            for K in Ks:
                try:
                    r = hg.hypergradient([w], [lam], fp_map, outer, solver=solver, K=K, tol=0.0, set_grad=False)
                    err = ((r.grads[0] - ref).norm() / ref.norm()).item()
                    rows.append(dict(cond=cond, solver=solver, K=K, hvps=r.iterations, rel_err=err))
                except hg.HypergradError as e:  # report, never hide, a failed solve
                    rows.append(dict(cond=cond, solver=solver, K=K, hvps=K, rel_err=None, error=str(e)[:80]))
    return rows


def mlp_problem(n_params: int, device, dtype=torch.float32, n: int = 256, d_in: int = 32, seed: int = 0):
    """MLP d_in -> h -> 1 regression with one log-weight-decay per layer; h sized to ~n_params."""
    h = max(1, round((n_params - 1) / (d_in + 2)))
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d_in, generator=g, dtype=dtype).to(device), torch.randn(n, generator=g, dtype=dtype).to(device)
    w = [(torch.randn(d_in, h, generator=g, dtype=dtype) / d_in ** 0.5).to(device), torch.zeros(h, dtype=dtype, device=device),
         (torch.randn(h, generator=g, dtype=dtype) / h ** 0.5).to(device)]
    lam = torch.full((2,), -3.0, dtype=dtype, device=device, requires_grad=True)

    def inner(p, hp):
        pred = torch.tanh(X @ p[0] + p[1]) @ p[2]
        return ((pred - y) ** 2).mean() + 0.5 * (hp[0][0].exp() * (p[0] ** 2).sum() + hp[0][1].exp() * (p[2] ** 2).sum())

    def outer(p, hp):
        return ((torch.tanh(X @ p[0] + p[1]) @ p[2] - y) ** 2).mean()

    return w, lam, inner, outer, sum(t.numel() for t in w)


def _median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_cost(quick: bool, device, K: int = 20) -> list:
    sizes = [1e3, 1e4] if quick else [1e3, 1e4, 1e5, 1e6]
    repeats = 2 if quick else 5
    rows = []
    from tqdm import tqdm
    for size in tqdm(sizes, desc="cost vs inner parameters", disable=None):
        w, lam, nonconvex, outer, n = mlp_problem(int(size), device)
        c = 1.05 * _curvature(nonconvex, w, [lam])  # |eigenvalues| <= c: + c/2 ||w||^2 makes the Hessian PD,
        inner = lambda p, hp, c=c: nonconvex(p, hp) + 0.5 * c * sum((t ** 2).sum() for t in p)  # as CG needs
        gd = hg.GradientDescent(inner, 0.5 / (2 * c))  # a step that keeps Phi contracting

        def raw_hvps():
            p = [t.detach().requires_grad_(True) for t in w]
            g = torch.autograd.grad(inner(p, [lam]), p, create_graph=True)
            v = [torch.ones_like(t) for t in p]
            for _ in range(K):
                v = list(torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True))

        methods = {s: (lambda s=s: hg.hypergradient(w, [lam], gd, outer, solver=s, K=K, tol=0.0, set_grad=False,
                                                    fixed_point_tol=math.inf))  # cost only: any w will do
                   for s in ("cg", "minres", "gmres", "fixed_point", "neumann")}

        def unroll():
            p = [t.detach().requires_grad_(True) for t in w]
            for _ in range(K):
                p = gd(p, [lam])
            hg.reverse_unroll(p, [lam], outer, set_grad=False)

        methods["reverse_unroll"] = unroll
        methods["reverse_checkpointed"] = lambda: hg.reverse_checkpointed(w, [lam], gd, K, outer, set_grad=False)
        base = _median_time(raw_hvps, repeats, device)
        for name, fn in methods.items():
            try:
                t = _median_time(fn, repeats, device)
                rows.append(dict(params=n, method=name, seconds=t, hvp_seconds=base, ratio=t / base))
            except hg.HypergradError as e:  # report, never hide, a failed solve
                rows.append(dict(params=n, method=name, seconds=None, hvp_seconds=base, ratio=None, error=str(e)[:80]))
    return rows


def _curvature(inner, w, hparams, iters: int = 30) -> float:
    """|largest eigenvalue| of the inner Hessian at w, by power iteration on Hessian-vector products."""
    p = [t.detach().requires_grad_(True) for t in w]
    g = torch.autograd.grad(inner(p, hparams), p, create_graph=True)
    v = [torch.randn_like(t) for t in p]
    lam = 1.0
    for _ in range(iters):
        norm = torch.sqrt(sum((t ** 2).sum() for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
        lam = float(torch.sqrt(sum((t ** 2).sum() for t in hv)))
        v = list(hv)
    return lam


def plot(acc: list, cost: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, cond in enumerate((10.0, 1e4)):
        for s in SOLVERS:
            pts = [(r["hvps"], r["rel_err"]) for r in acc if r["cond"] == cond and r["solver"] == s
                   and r["rel_err"] is not None]
            if pts:
                ax[i].loglog(*zip(*pts), "o-", ms=3, label=s)
        ax[i].set(xlabel="products with dPhi/dw^T (Hessian-vector products)", ylabel="relative error",
                  title=f"ridge, kappa = {cond:g}", ylim=(1e-16, 10))
        ax[i].legend(fontsize=7)
    for m in dict.fromkeys(r["method"] for r in cost):
        pts = [(r["params"], r["ratio"]) for r in cost if r["method"] == m]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax[2].semilogx(*zip(*pts), "o-", ms=3, label=m)
    ax[2].axhline(1.0, color="gray", lw=0.8)
    ax[2].set(xlabel="inner parameters", ylabel="time / time of 20 raw HVPs", title="cost (20 products or steps)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, device: str = "cpu", threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    return dict(accuracy=bench_accuracy(quick, dev), cost=bench_cost(quick, dev), device=device, threads=threads)


def tables(res: dict) -> str:
    out = ["| kappa | solver | rel. error after 16 / 64 / 256 products |", "|---|---|---|"]
    for cond in (10.0, 1e4):
        for s in SOLVERS:
            errs = {r["K"]: r["rel_err"] for r in res["accuracy"] if r["cond"] == cond and r["solver"] == s}
            cells = " / ".join("fails" if errs.get(K) is None else f"{errs[K]:.1e}" for K in (16, 64, 256))
            out.append(f"| {cond:g} | {s} | {cells} |")
    methods = list(dict.fromkeys(r["method"] for r in res["cost"]))
    sizes = sorted({r["params"] for r in res["cost"]})
    out += ["", "| inner parameters | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in sizes:
        ratio = {r["method"]: r["ratio"] for r in res["cost"] if r["params"] == n}
        out.append(f"| {n:,} | " + " | ".join("fails" if ratio[m] is None else f"{ratio[m]:.2f}" for m in methods) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller problems, fewer sizes (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    res = run(args.quick, args.device, args.threads)
    print(tables(res))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_solvers.json"), "w") as f:
        json.dump(dict(res, torch=torch.__version__, python=sys.version.split()[0]), f, indent=1)
    plot(res["accuracy"], res["cost"], os.path.join(args.out, "bench_solvers.png"))
    return res


if __name__ == "__main__":
    main()
