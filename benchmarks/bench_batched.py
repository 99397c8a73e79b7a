"""Batched hypergradients of many small tasks in one call, against the per-task Python loop.

B independent logistic-regression tasks (n samples, d features each) with a shared meta-initialization
and a shared log-L2 strength, as in iMAML. The loop calls ``hypergrad.hypergradient`` once per task;
the batched call is ``hypergrad.batched_hypergradient`` on the stacked problem. Both run CG with the same
K and tolerance and must agree to 1e-10 (checked). Reported: time(batched) / time(loop), measured
interleaved in one run (target <= 0.3 at B = 64).

Run: ``python benchmarks/bench_batched.py [--quick]``; writes results/bench_batched.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import hypergrad as hg


def tasks(B: int, n: int, d: int, seed: int = 0, dtype=torch.float64):
    """Stacked task data, the inner solutions (200 batched GD steps), and the maps and losses, which
    take ``rows`` to serve one task (the loop) or all of them (the batch)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, d, generator=g, dtype=dtype) / d ** 0.5
    Y = (torch.randn(B, n, generator=g, dtype=dtype) > 0).to(dtype)
    Xq = torch.randn(B, n, d, generator=g, dtype=dtype) / d ** 0.5
    Yq = (torch.randn(B, n, generator=g, dtype=dtype) > 0).to(dtype)
    theta = (0.1 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_(True)
    log_lam = torch.tensor(0.0, dtype=dtype, requires_grad=True)
    step = 0.5

    def inner(W, h, rows):
        ce = F.binary_cross_entropy_with_logits((X[rows] @ W[..., None])[..., 0], Y[rows], reduction="none")
        return ce.mean(-1).sum() + 0.5 * h[1].exp() * ((W - h[0]) ** 2).sum()

    def fp_map(params, hparams, rows=slice(None)):
        W = params[0]
        return [W - step * torch.autograd.grad(inner(W, hparams, rows), W, create_graph=True)[0]]

    def outer(params, hparams, rows=slice(None)):
        logits = (Xq[rows] @ params[0][..., None])[..., 0]
        return F.binary_cross_entropy_with_logits(logits, Yq[rows], reduction="none").mean(-1)

    W = theta.detach().expand(B, d).clone()
    for _ in range(200):
        W = fp_map([W.requires_grad_(True)], [theta, log_lam])[0].detach()
    return dict(W=W, hparams=[theta, log_lam], fp_map=fp_map, outer=outer, B=B)


def batched(p, K, tol):
    return hg.batched_hypergradient([p["W"]], p["hparams"], p["fp_map"], p["outer"], K=K, tol=tol,
                                    set_grad=False).grads


def loop(p, K, tol):
    total = None
    for b in range(p["B"]):
        rows = slice(b, b + 1)
        g = hg.hypergradient([p["W"][rows]], p["hparams"], lambda w, h: p["fp_map"](w, h, rows),
                             lambda w, h: p["outer"](w, h, rows).sum(), K=K, tol=tol, set_grad=False).grads
        total = g if total is None else [a + c for a, c in zip(total, g)]
    return total


def measure(B: int, n: int, d: int, K: int, tol: float, repeats: int) -> dict:
    p = tasks(B, n, d)
    gb, gl = batched(p, K, tol), loop(p, K, tol)
    err = max(((a - c).norm() / c.norm()).item() for a, c in zip(gb, gl))
    if err > 1e-10:
        raise AssertionError(f"batched and looped hypergradients differ by {err:.2e} (B={B}, d={d})")
    tb, tloop = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        t0 = time.perf_counter(); batched(p, K, tol); tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); loop(p, K, tol); tloop.append(time.perf_counter() - t0)
    mb, ml = statistics.median(tb), statistics.median(tloop)
    return dict(B=B, n=n, d=d, K=K, tol=tol, batched_s=mb, loop_s=ml, ratio=mb / ml, max_rel_diff=err)


def run(quick: bool = False, threads: int = 1) -> dict:
    """Rows of (B, d) configurations; the headline is B = 64."""
    torch.set_num_threads(threads)
    configs = [(64, 20, 10)] if quick else [(8, 20, 10), (64, 20, 10), (256, 20, 10), (64, 50, 100)]
    rows = []
    from tqdm import tqdm
    for B, n, d in tqdm(configs, desc="batched vs loop", disable=None):
        rows.append(measure(B, n, d, K=20, tol=1e-10, repeats=3 if quick else 7))
    return dict(rows=rows, threads=threads)


def table(res: dict) -> str:
    lines = ["| tasks B | samples/task | d | batched (s) | loop (s) | batched / loop | max rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['B']} | {r['n']} | {r['d']} | {r['batched_s']:.4f} | {r['loop_s']:.4f} | "
                     f"**{r['ratio']:.3f}** | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Seconds per hypergradient of all B tasks, batched and looped, against B (d = 10 rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted((r for r in res["rows"] if r["d"] == 10), key=lambda r: r["B"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog([r["B"] for r in rows], [r["loop_s"] for r in rows], "o-", label="loop over tasks")
    ax.loglog([r["B"] for r in rows], [r["batched_s"] for r in rows], "o-", label="batched_hypergradient")
    ax.set(xlabel="tasks B", ylabel="seconds per hypergradient (all tasks)", title="batched vs looped (CG, K = 20)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B = 64 only, 3 repeats (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    res = run(args.quick, args.threads)
    print(table(res))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_batched.json"), "w") as f:
        json.dump(dict(res, torch=torch.__version__, python=sys.version.split()[0]), f, indent=1)
    plot(res, os.path.join(args.out, "bench_batched.png"))
    return res


if __name__ == "__main__":
    main()
