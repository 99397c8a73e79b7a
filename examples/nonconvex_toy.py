"""The BVFIM paper's non-convex toy problem: BVFIM, RAD and Implicit (CG) from several starting points.

    min_{x in R, y in R^n}  F = (x - a)^2 + |y - a - c|^2
    s.t. y in argmin_y  f = sum_i sin(x + y_i - c_i)

The lower problem has a lattice of solutions y_i = c_i - x - pi/2 + 2 k_i pi (neither singleton nor
convex). The optimum takes every k_i = k* minimizing |2a + pi/2 - 2 k pi|:
x* = ((1 - n) a - n (pi/2 - 2 k* pi)) / (1 + n),  F* = n / (1 + n) (2a + pi/2 - 2 k* pi)^2.

Each method is driven through its ``nn.Module`` API (objectives of ``state``) with Adam on x. We report
|x - x*|, the upper value at the method's y, the lower optimality gap f(x, y) - min f = f(x, y) + n, and
phi(x) = min over lower solutions of F(x, y) (the value a final x really achieves).

    python examples/nonconvex_toy.py            # full table and plot (about 3 minutes on 2 cores)
    python examples/nonconvex_toy.py --quick    # seconds, for CI
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import methods  # noqa: E402

DT = torch.float64


class Vec(nn.Module):
    """A parameter vector as a module; calling it returns the vector."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.v = nn.Parameter(value.clone())

    def forward(self):
        return self.v


def problem(n: int, a: float):
    c = torch.linspace(-1.0, 1.0, n, dtype=DT)
    k = round((2 * a + math.pi / 2) / (2 * math.pi))
    x_opt = ((1 - n) * a - n * (math.pi / 2 - 2 * k * math.pi)) / (1 + n)
    F_opt = n / (1 + n) * (2 * a + math.pi / 2 - 2 * k * math.pi) ** 2

    def f(x, y):
        return torch.sin(x + y - c).sum()

    def F(x, y):
        return ((x - a) ** 2).sum() + ((y - a - c) ** 2).sum()

    def phi(x: float) -> float:
        """min over the lower solution lattice of F(x, y): each y_i picks its best branch k_i."""
        base = -x - math.pi / 2 - a  # y_i - a - c_i at k_i = 0
        best = min((base + 2 * kk * math.pi) ** 2 for kk in range(-20, 21))
        return (x - a) ** 2 + n * best

    return dict(c=c, f=f, F=F, x_opt=x_opt, F_opt=F_opt, phi=phi, n=n, a=a)


def make_solver(method: str, P, um: Vec, lm: Vec, T: int, reg_rate: float):
    ll = lambda s: P["f"](s["upper_model"](), s["lower_model"]())  # noqa: E731
    ul = lambda s: P["F"](s["upper_model"](), s["lower_model"]())  # noqa: E731
    if method == "RAD":
        return methods.Dynamic(ll, T, um, ul, lm, lr=0.5)
    if method == "Implicit":
        return methods.Implicit(ul, um, ll, lm, 0.5, T, lower_loop=T)
    if method == "BVFIM":
        return methods.BVFIM(ul, um, ll, 0.1, 0.01, 1.0, ll_model=lm, lower_loop=T, y_loop=T, z_lr=0.5,
                             y_lr=0.05, mu2=1.0, reg_decay=reg_rate)
    raise ValueError(method)


def run(method: str, P, x0: float, y0: float, iters: int, T: int, outer_lr: float = 0.05,
        reg_rate: float = 1.01):
    """Run one method from (x0, y0 * ones); return the per-iteration |x - x*| and the final record."""
    um, lm = Vec(torch.tensor([x0], dtype=DT)), Vec(torch.full((P["n"],), y0, dtype=DT))
    solver = make_solver(method, P, um, lm, T, reg_rate)
    opt = torch.optim.Adam(um.parameters(), lr=outer_lr)
    dist = []
    for _ in range(iters):
        opt.zero_grad()
        solver.compute_gradients(None, None, None, None)
        opt.step()
        dist.append(abs(um.v.item() - P["x_opt"]))
    x, y = um.v.detach(), lm.v.detach()
    return dist, dict(method=method, x0=x0, y0=y0, x=x.item(), dist=dist[-1],
                      F_at_y=P["F"](x, y).item(), lower_gap=P["f"](x, y).item() + P["n"],
                      phi=P["phi"](x.item()), F_opt=P["F_opt"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="dimension of y (default 2)")
    ap.add_argument("--a", type=float, default=2.0, help="the constant a (default 2)")
    ap.add_argument("--iters", type=int, default=300, help="outer iterations (default 300)")
    ap.add_argument("--lower", type=int, default=50, help="lower steps T (z- and y-loop for BVFIM; CG k for "
                                                         "Implicit) (default 50)")
    ap.add_argument("--reg-rate", type=float, default=1.01, help="BVFIM reg_decay: divisor r**t (default 1.01)")
    ap.add_argument("--quick", action="store_true", help="few iterations and starts (seconds; for CI)")
    ap.add_argument("--out", default="results", help="output folder for the table and plot (default results/)")
    args = ap.parse_args(argv)
    starts = [(0.0, 0.0), (-2.0, 2.0), (4.0, 4.0), (-4.0, -4.0), (6.0, 0.0)]
    if args.quick:
        args.iters, args.lower, starts = 40, 10, [(0.0, 0.0), (4.0, 4.0)]
    torch.set_num_threads(1)
    P = problem(args.n, args.a)
    print(f"n={args.n} a={args.a}: x* = {P['x_opt']:.4f}, F* = {P['F_opt']:.4f}; {args.iters} outer iterations, "
          f"T={args.lower}")
    rows, curves = [], {}
    t0 = time.time()
    for x0, y0 in starts:
        for method in ("BVFIM", "RAD", "Implicit"):
            dist, rec = run(method, P, x0, y0, args.iters, args.lower, reg_rate=args.reg_rate)
            rec["reached"] = rec["dist"] < 0.3 and rec["phi"] < 2 * P["F_opt"] + 0.1
            rows.append(rec)
            curves[(x0, y0, method)] = dist
    hdr = f"{'start (x0, y0)':>15} {'method':>9} {'x final':>9} {'|x-x*|':>8} {'phi(x)':>9} {'F(x,y)':>9} " \
          f"{'f gap':>9} reached"
    print(hdr)
    for r in rows:
        print(f"{'(%g, %g)' % (r['x0'], r['y0']):>15} {r['method']:>9} {r['x']:9.4f} {r['dist']:8.4f} "
              f"{r['phi']:9.4f} {r['F_at_y']:9.4f} {r['lower_gap']:9.2e} {'yes' if r['reached'] else 'no'}")
    print(f"({time.time() - t0:.1f} s; phi(x) = min over lower solutions of F(x, y); F* = {P['F_opt']:.4f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "nonconvex_toy.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "nonconvex_toy.json"), "w") as fh:
        json.dump(dict(args=vars(args), x_opt=P["x_opt"], F_opt=P["F_opt"], rows=rows), fh, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(starts), figsize=(3.2 * len(starts), 3), sharey=True)
    for ax, (x0, y0) in zip(axes if len(starts) > 1 else [axes], starts):
        for method in ("BVFIM", "RAD", "Implicit"):
            ax.semilogy([max(d, 1e-8) for d in curves[(x0, y0, method)]], label=method)
        ax.set_title(f"start ({x0:g}, {y0:g})")
        ax.set_xlabel("outer iteration")
    axes[0].set_ylabel("|x - x*|")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(args.out, "nonconvex_toy.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path} and nonconvex_toy.csv/.json")
    return rows


if __name__ == "__main__":
    main()
