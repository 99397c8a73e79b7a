"""Peak memory against the number of inner steps T: reverse_unroll, reverse, checkpointed reverse.

Inner problem: T gradient steps on a 2-layer tanh MLP whose parameters (d x hidden + 2 hidden, about
1e5 float64 numbers, 0.8 MB) are large next to the minibatch (n = 32 samples), so memory is dominated by
what each method keeps per step:
- ``reverse_unroll`` through ``GradientDescent``: the graphs of all T steps, O(T);
- ``reverse`` (hypertorch style): all T + 1 iterates, one step's graph, O(T);
- ``checkpointed``: ``reverse_checkpointed`` with c = ceil(sqrt T) checkpoints, O(sqrt T);
- ``constant``: one checkpoint, segments not stored (O(1) memory, O(T^2) steps; small T only).

Each (method, T) runs in a fresh process and reports its peak resident-memory growth over the measured
call (after a warm-up; large blocks mapped and unmapped at once, so the RSS follows the live tensors);
times are measured in this process (one thread, the fastest of 2-3 interleaved runs). The
hypergradients of all methods must agree to 1e-9 relative. Run ``python benchmarks/bench_memory.py [--quick]``; writes
results/bench_memory.json and results/bench_memory.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch

import hypergrad as hg
from hypergrad.checkpointed import checkpointed_hypergradient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _memory, also when imported from elsewhere
import _memory  # noqa: E402

METHODS = ("reverse_unroll", "reverse", "checkpointed", "constant")
DT = torch.float64


def problem(d: int, hidden: int, n: int, seed: int = 0):
    """(w0, lam, step map, outer loss): gradient steps on a 2-layer tanh MLP regression with one log weight
    decay per layer; E = validation MSE."""
    g = torch.Generator().manual_seed(seed)
    X, y, Xv, yv = (torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT),
                    torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT))

    def net(p, A):
        return torch.tanh(A @ p[0] + p[1]) @ p[2]

    def inner(p, h):
        return ((net(p, X) - y) ** 2).mean() + 0.5 * (h[0][0].exp() * (p[0] ** 2).sum() +
                                                      h[0][1].exp() * (p[2] ** 2).sum())

    def outer(p, h):
        return ((net(p, Xv) - yv) ** 2).mean()

    w0 = [torch.randn(d, hidden, generator=g, dtype=DT) / d ** 0.5, torch.zeros(hidden, dtype=DT),
          torch.randn(hidden, 1, generator=g, dtype=DT) / hidden ** 0.5]
    lam = torch.full((2,), -3.0, dtype=DT, requires_grad=True)
    return w0, lam, hg.GradientDescent(inner, 0.05), outer


def hypergradient_by(method: str, T: int, prob) -> List[torch.Tensor]:
    """The hypergradient through T steps by one of METHODS."""
    w0, lam, gd, outer = prob
    if method == "reverse_unroll":
        w = [t.clone().requires_grad_(True) for t in w0]
        for _ in range(T):
            w = gd(w, [lam])
        return hg.reverse_unroll(w, [lam], outer, set_grad=False)
    if method == "reverse":
        hist = [w0]
        for _ in range(T):
            hist.append([t.detach() for t in gd([t.detach().requires_grad_(True) for t in hist[-1]], [lam])])
        return hg.reverse(hist, [lam], [gd] * T, outer, set_grad=False)
    c, store = (1, False) if method == "constant" else (None, True)
    return checkpointed_hypergradient(w0, [lam], gd, T, outer, checkpoints=c, store_segments=store,
                                      set_grad=False).grads


def _child(argv) -> None:
    """In a fresh process: warm up, then print the peak RSS growth (KiB) and hypergradient of one run."""
    method, T, d, hidden, n = argv[0], *map(int, argv[1:5])
    torch.set_num_threads(1)
    prob = problem(d, hidden, n)
    hypergradient_by(method, 2, prob)  # warm up allocator, kernels, autograd
    base = _memory.reset_peak()
    grads = hypergradient_by(method, T, prob)
    print(json.dumps(dict(kib=_memory.peak_growth_kib(base), grad=grads[0].tolist())))


_CHILD = "import sys, bench_memory; bench_memory._child(sys.argv[1:])"


def measure(method: str, T: int, d: int, hidden: int, n: int) -> dict:
    """One fresh process: peak RSS growth (MiB) and hypergradient of ``method`` at T steps. glibc maps and
    unmaps every large block at once in that process, so the RSS follows the live tensors."""
    out = json.loads(_memory.run_child(_CHILD, method, T, d, hidden, n, env=_memory.EXACT_MALLOC))
    return dict(method=method, T=T, peak_mib=out["kib"] / 1024, grad=out["grad"])


def timings(methods, T: int, d: int, hidden: int, n: int, repeats: int) -> Dict[str, float]:
    """Seconds per method at T steps, in this process, one thread: the fastest of ``repeats`` interleaved runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prob = problem(d, hidden, n)
    for m in methods:
        hypergradient_by(m, 2, prob)  # warm up
    best = {m: float("inf") for m in methods}
    for _ in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            hypergradient_by(m, T, prob)
            best[m] = min(best[m], time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return best


def _check_agreement(rows) -> float:
    """Max relative difference of each method's hypergradient from reverse_unroll's at the same T."""
    ref = {r["T"]: torch.tensor(r["grad"]) for r in rows if r["method"] == "reverse_unroll"}
    worst = max(float((torch.tensor(r["grad"]) - ref[r["T"]]).norm() / ref[r["T"]].norm()) for r in rows)
    if worst > 1e-9:
        raise RuntimeError(f"the methods' hypergradients disagree: max relative difference {worst:.2e}")
    return worst


def _summary(rows):
    """Per T: memory of each method over reverse_unroll's, time of checkpointed over reverse_unroll's."""
    by = {(r["method"], r["T"]): r for r in rows}
    out = []
    for T in sorted({r["T"] for r in rows}):
        u = by[("reverse_unroll", T)]
        s = dict(T=T, time_ratio_checkpointed_over_unroll=by[("checkpointed", T)]["seconds"] / u["seconds"])
        for m in METHODS[1:]:
            if (m, T) in by:
                s[f"memory_ratio_{m}_over_unroll"] = by[(m, T)]["peak_mib"] / u["peak_mib"]
        out.append(s)
    return out


def run(quick: bool = False, d: int = 200, hidden: int = 500, n: int = 32) -> dict:
    """All (method, T) measurements; ``quick``: T in {10, 100} and no ``constant``, else T in
    {10, 30, 100, 300, 1000} (``constant``, O(T^2) steps, only up to T = 100)."""
    from tqdm import tqdm
    Ts = [10, 100] if quick else [10, 30, 100, 300, 1000]
    per_T = {T: [m for m in METHODS if m != "constant" or (T <= 100 and not quick)] for T in Ts}
    jobs = [(m, T) for T in Ts for m in per_T[T] + ["time"]]
    rows, secs = [], {}
    for m, T in tqdm(jobs, desc="bench_memory", file=sys.stderr):
        if m == "time":
            repeats = 2 if quick or T >= 300 else 3
            secs.update({(k, T): v for k, v in timings(per_T[T], T, d, hidden, n, repeats).items()})
            continue
        rows.append(measure(m, T, d, hidden, n))
    for r in rows:
        r["seconds"] = secs[(r["method"], r["T"])]
        print(f"  T={r['T']:5d} {r['method']:15s} peak {r['peak_mib']:9.1f} MiB  {r['seconds']:8.3f} s")
    worst = _check_agreement(rows)
    params = d * hidden + 2 * hidden
    return dict(torch=torch.__version__, problem=dict(d=d, hidden=hidden, n=n, params=params,
                                                      iterate_mib=params * 8 / 2 ** 20, dtype="float64"),
                max_rel_diff_vs_unroll=worst, rows=[{k: v for k, v in r.items() if k != "grad"} for r in rows],
                summary=_summary(rows))


def plot(results: dict, path: str) -> None:
    """Log-log peak memory against T, one line per method, with slope-1/2 and slope-1 guides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, style in zip(METHODS, ("o-", "s-", "^-", "v--")):
        pts = [(r["T"], r["peak_mib"]) for r in results["rows"] if r["method"] == m]
        if pts:
            ax.plot(*zip(*pts), style, label=dict(checkpointed="checkpointed, c = sqrt(T)",
                                                  constant="checkpointed, c = 1, O(T^2) steps").get(m, m))
    Ts = sorted({r["T"] for r in results["rows"]})
    it = results["problem"]["iterate_mib"]
    ax.plot(Ts, [it * T for T in Ts], ":", color="gray", lw=0.8, label="T iterates")
    ax.plot(Ts, [2 * it * T ** 0.5 for T in Ts], "-.", color="gray", lw=0.8, label="2 sqrt(T) iterates")
    ax.set(xscale="log", yscale="log", xlabel="inner steps T", ylabel="peak RSS growth (MiB)",
           title=f"memory of reverse modes, MLP with {results['problem']['params']:,} float64 params")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {10, 100}, three methods (about 20 s)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    results = run(args.quick)
    for s in results["summary"]:
        print("  " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_memory.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(args.out, "bench_memory.png"))
    return results


if __name__ == "__main__":
    main()
