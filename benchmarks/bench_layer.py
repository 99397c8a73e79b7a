"""Implicit-layer benchmark: ``hypergrad.custom_root`` against torchopt 0.7.3's ``custom_root``, side by side on
the same problems in one run (float64; ratios taken within the run, interleaved repeats, medians).

Problems (n = 2d samples, per-feature L2 strengths e^lam, optimality F(w, lam) = grad_w g):
  ridge     g = 1/2||X w - y||^2 + 1/2 sum_i e^lam_i w_i^2, E = 1/2||Xv w - yv||^2; inner solver: the
            closed form (torch.linalg.solve); reference: autograd through that closed form.
  logistic  g = sum_j softplus(x_j.w) - y_j x_j.w + 1/2 sum_i e^lam_i w_i^2, E = the validation logistic loss;
            inner solver: 10 Newton steps from 0 (converged, checked); reference: the dense implicit formula
            (first derivative), autograd through 3 exact Newton steps from w* (second derivatives; these are
            exact at a root), checked against central differences of the first derivative.
The inner solver is the same function for both libraries: only their backward differs.

1. backward: time of one hypergradient dE/dlam through the solver's output (torch.autograd.grad on a retained
   graph; the forward is timed separately), both libraries' CG, each at the loosest tolerance (half-decade
   steps, the same rule ||r|| <= rtol ||b|| in both) whose hypergradient is within --target (1e-8) relative
   error of the reference; the error reached is reported with the time. Ratio: torchopt / ours.
2. second derivatives (d = 10): the Hessian of F(lam) = E(w*(lam)) by torch.func.hessian and by double backward
   (torch.autograd.grad with create_graph=True, then grad of each entry); relative error to the reference and
   asymmetry ||H - H^T|| / ||H||; a transform that raises is reported by its exception type.
3. torch.func: torch.vmap over 16 ridge tasks (lam and y per task) of torch.func.grad; and a 0-d solution
   (w^3 + w = a, torchopt issue #222: its CG's default maxiter is 10 * numel = 0 for a 0-d tensor).

Run: ``python benchmarks/bench_layer.py [--quick] [--out results]``; needs ``torchopt==0.7.3`` (installed with
``--no-deps`` next to an existing torch, plus ``optree``); writes bench_layer.json and bench_layer.png into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import hypergrad as hg

DT = torch.float64


def _import_torchopt():
    try:
        import torchopt
    except ImportError as e:  # pragma: no cover - environment
        raise SystemExit(f"bench_layer needs torchopt 0.7.3 ({e}); install it without touching torch: "
                         "pip install torchopt==0.7.3 --no-deps && pip install optree") from e
    return torchopt


warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt")  # functorch.vjp deprecation, per call
warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*")
torchopt = _import_torchopt()


def _msg(e: Exception) -> str:
    """An exception's type and the first sentence-ish of its message (no trailing links)."""
    text = str(e).splitlines()[0].split(" For more details")[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def asym(H) -> float:
    return float((H - H.T).norm() / H.norm())


# ----------------------------------------------------------------------------------------------- problems
class Problem:
    """Data, the optimality function F(w, lam), the inner solver, the outer loss and exact references."""

    def __init__(self, kind: str, d: int, seed: int = 0):
        self.kind, self.d, self.n = kind, d, 2 * d
        g = torch.Generator().manual_seed(seed)
        n = self.n
        w_true = torch.randn(d, generator=g, dtype=DT)
        self.lam0 = -2.0 + 2.0 * torch.rand(d, generator=g, dtype=DT)  # strengths e^lam in [0.14, 1]
        if kind == "ridge":
            self.X = torch.randn(n, d, generator=g, dtype=DT) / n ** 0.5
            self.Xv = torch.randn(n, d, generator=g, dtype=DT) / n ** 0.5
            self.y = self.X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DT)
            self.yv = self.Xv @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DT)
            self.G, self.Xty = self.X.T @ self.X, self.X.T @ self.y
        else:
            self.X = torch.randn(n, d, generator=g, dtype=DT) / d ** 0.5
            self.Xv = torch.randn(n, d, generator=g, dtype=DT) / d ** 0.5
            self.y = (self.X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
            self.yv = (self.Xv @ w_true > 0).to(DT)
        self.newton_steps = 10

    # F(w, lam) = grad_w g, written out (the same function for both libraries)
    def F(self, w, lam, y=None):
        y = self.y if y is None else y
        if self.kind == "ridge":
            return self.X.T @ (self.X @ w - y) + torch.exp(lam) * w
        return self.X.T @ (torch.sigmoid(self.X @ w) - y) + torch.exp(lam) * w

    def hess(self, w, lam):
        if self.kind == "ridge":
            return self.G + torch.diag(torch.exp(lam))
        s = torch.sigmoid(self.X @ w)
        return self.X.T @ ((s * (1 - s))[:, None] * self.X) + torch.diag(torch.exp(lam))

    def newton(self, w, lam, steps):
        for _ in range(steps):
            w = w - torch.linalg.solve(self.hess(w, lam), self.F(w, lam))
        return w

    def solve(self, lam, y=None):
        """The inner solver shared by both libraries: closed form (ridge), Newton to convergence (logistic)."""
        if self.kind == "ridge":
            rhs = self.Xty if y is None else self.X.T @ y
            return torch.linalg.solve(self.G + torch.diag(torch.exp(lam)), rhs)
        return self.newton(torch.zeros(self.d, dtype=DT), lam, self.newton_steps)

    def E(self, w):
        if self.kind == "ridge":
            return 0.5 * ((self.Xv @ w - self.yv) ** 2).sum()
        return F.binary_cross_entropy_with_logits(self.Xv @ w, self.yv, reduction="sum")

    # references
    def ref_F(self, lam):
        """F(lam) = E(w*(lam)) differentiable exactly: the closed form (ridge), 3 Newton steps from the detached
        root (logistic: the derivatives of Newton iterates at a root equal the implicit ones up to order 2)."""
        if self.kind == "ridge":
            return self.E(torch.linalg.solve(self.G + torch.diag(torch.exp(lam)), self.Xty))
        return self.E(self.newton(self.w_star.detach(), lam, 3))

    def ref_grad(self, lam):
        lam = lam.detach()
        if self.kind == "ridge":
            return torch.func.grad(self.ref_F)(lam)
        w = self.solve(lam)
        wl = w.clone().requires_grad_(True)
        (gE,) = torch.autograd.grad(self.E(wl), wl)
        return -(torch.exp(lam) * w) * torch.linalg.solve(self.hess(w, lam), gE)  # dense implicit formula

    def setup(self, lam=None):
        lam = self.lam0 if lam is None else lam
        self.w_star = self.solve(lam.detach())
        r0 = float(self.F(torch.zeros(self.d, dtype=DT), lam).norm())
        r = float(self.F(self.w_star, lam).norm())
        if self.kind == "logistic" and r > 1e-12 * r0:
            raise RuntimeError(f"Newton did not converge: ||F(w)|| = {r:.2e} (||F(0)|| = {r0:.2e})")
        return self


# ------------------------------------------------------------------------------------------- the libraries
def ours(p: Problem, rtol: float, solver=None, maxiter=None):
    """hypergrad.custom_root with CG; returns (lam -> w*, the decorated solver)."""
    solver = solver or (lambda w0, hs: [p.solve(hs[0])])
    s = hg.custom_root(lambda ws, hs: [p.F(ws[0], hs[0])], backward_solver="cg",
                       backward_maxiter=maxiter or 10 * p.d, backward_rtol=rtol)(solver)
    return (lambda lam: s([torch.zeros(p.d, dtype=DT)], [lam])[0]), s


class Counting:
    """torchopt's solve_cg with the number of matrix-vector products counted (calibration only)."""

    def __init__(self, **kw):
        self.kw, self.products = kw, 0

    def __call__(self, matvec, b):
        def counted(v):
            self.products += 1
            return matvec(v)
        return torchopt.linear_solve.solve_cg(**self.kw)(counted, b)


def theirs(p: Problem, rtol: float, solver=None, maxiter=None, count=False):
    """torchopt.diff.implicit.custom_root with solve_cg; returns (lam -> w*, the solve object)."""
    kw = dict(rtol=rtol, maxiter=maxiter or 10 * p.d)
    solve = Counting(**kw) if count else torchopt.linear_solve.solve_cg(**kw)

    def optimality(w, lam):
        return p.F(w, lam)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver_fn(w0, lam):
        return solver(lam) if solver else p.solve(lam)

    return (lambda lam: solver_fn(torch.zeros(p.d, dtype=DT), lam)), solve


def grad_of(fwd, p, lam):
    lam = lam.detach().requires_grad_(True)
    return torch.autograd.grad(p.E(fwd(lam)), lam)[0]


# ---------------------------------------------------------------------------------------- 1. backward time
RTOLS = [10 ** (-k / 2) for k in range(6, 29)]  # 1e-3 ... 1e-14, half decades


def calibrate(p: Problem, lam, ref, target: float, lib: str):
    """The loosest rtol whose hypergradient is within ``target`` of ``ref``: (rtol, error, products)."""
    cached = {"w": p.w_star}
    cached_solver = lambda l: cached["w"]  # noqa: E731  (the forward does not matter here)
    best = None
    for rtol in RTOLS:
        try:
            if lib == "ours":
                fwd, s = ours(p, rtol, solver=lambda w0, hs: [cached_solver(hs[0])])
                g = grad_of(fwd, p, lam)
                its = s.layer.backward_info.iterations
            else:
                fwd, solve = theirs(p, rtol, solver=cached_solver, count=True)
                g = grad_of(fwd, p, lam)
                its = solve.products
        except hg.HypergradError as e:  # tolerance out of reach (ours raises instead of returning)
            best = best or (rtol, math.nan, 0, type(e).__name__)
            continue
        err = rel(g, ref)
        if err <= target:
            return rtol, err, int(its), None
        best = (rtol, err, int(its), None)
    return best[0], best[1], best[2], f"target not reached (last: {best[3] or 'err %.1e' % best[1]})"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_backward(kinds, dims, repeats: int, target: float, progress):
    rows = []
    for kind in kinds:
        for d in dims:
            p = Problem(kind, d).setup()
            lam = p.lam0.clone()
            ref = p.ref_grad(lam)
            cal = {lib: calibrate(p, lam, ref, target, lib) for lib in ("ours", "torchopt")}
            fwd_o, _ = ours(p, cal["ours"][0])
            fwd_t, _ = theirs(p, cal["torchopt"][0])
            lam_o = lam.clone().requires_grad_(True)
            lam_t = lam.clone().requires_grad_(True)
            t_fwd = {"ours": [], "torchopt": []}
            for _ in range(max(1, min(3, repeats))):  # the forward: the shared solver plus each library's wrapper
                t_fwd["ours"].append(_timed(lambda: fwd_o(lam_o)))
                t_fwd["torchopt"].append(_timed(lambda: fwd_t(lam_t)))
            E_o, E_t = p.E(fwd_o(lam_o)), p.E(fwd_t(lam_t))
            back_o = lambda: torch.autograd.grad(E_o, lam_o, retain_graph=True)[0]  # noqa: E731
            back_t = lambda: torch.autograd.grad(E_t, lam_t, retain_graph=True)[0]  # noqa: E731
            for _ in range(2):  # warm-up
                g_o, g_t = back_o(), back_t()
            t_b = {"ours": [], "torchopt": []}
            for _ in range(repeats):  # interleaved, so drift hits both alike
                t_b["ours"].append(_timed(back_o))
                t_b["torchopt"].append(_timed(back_t))
            med = {k: statistics.median(v) for k, v in t_b.items()}
            medf = {k: statistics.median(v) for k, v in t_fwd.items()}
            row = dict(problem=kind, d=d, n=p.n, repeats=repeats, target=target,
                       ours_rtol=cal["ours"][0], ours_err=rel(g_o, ref), ours_iters=cal["ours"][2],
                       torchopt_rtol=cal["torchopt"][0], torchopt_err=rel(g_t, ref),
                       torchopt_products=cal["torchopt"][2],
                       ours_ms=1e3 * med["ours"], torchopt_ms=1e3 * med["torchopt"],
                       ratio=med["torchopt"] / med["ours"],
                       ours_fwd_ms=1e3 * medf["ours"], torchopt_fwd_ms=1e3 * medf["torchopt"],
                       e2e_ratio=(medf["torchopt"] + med["torchopt"]) / (medf["ours"] + med["ours"]),
                       note="; ".join(f"{k}: {c[3]}" for k, c in cal.items() if c[3]))
            rows.append(row)
            progress.update()
    return rows


def table_backward(rows) -> str:
    lines = ["| problem | d | ours rtol | ours rel. err | ours CG its | torchopt rtol | torchopt rel. err | "
             "torchopt matvecs | ours bwd ms | torchopt bwd ms | **torchopt / ours** | fwd ms ours / torchopt | "
             "fwd+bwd torchopt / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['d']} | {r['ours_rtol']:.0e} | {r['ours_err']:.1e} | {r['ours_iters']} | "
                     f"{r['torchopt_rtol']:.0e} | {r['torchopt_err']:.1e} | {r['torchopt_products']} | "
                     f"{r['ours_ms']:.3f} | {r['torchopt_ms']:.3f} | **{r['ratio']:.2f}** | "
                     f"{r['ours_fwd_ms']:.2f} / {r['torchopt_fwd_ms']:.2f} | {r['e2e_ratio']:.2f} |")
    notes = [f"{r['problem']} d={r['d']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------------------------- 2. second derivatives
def double_backward(Ffun, lam):
    lam = lam.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(Ffun(lam), lam, create_graph=True)
    rows = []
    for i in range(lam.numel()):
        if not g.requires_grad:  # the first derivative carries no graph: every second derivative is 0
            rows.append(torch.zeros_like(lam))
            continue
        (h,) = torch.autograd.grad(g[i], lam, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(lam) if h is None else h)
    return g.detach(), torch.stack(rows)


def bench_hessian(d: int, progress):
    out = {}
    for kind in ("ridge", "logistic"):
        p = Problem(kind, d, seed=1)
        lam = p.lam0.clone()
        p.setup(lam)
        H_ref = torch.func.hessian(p.ref_F)(lam)
        g_ref = p.ref_grad(lam)
        info = {}
        if kind == "logistic":  # check the Newton-autograd reference against central differences
            h = 1e-4
            H_fd = torch.stack([(p.ref_grad(lam + h * e) - p.ref_grad(lam - h * e)) / (2 * h)
                                for e in torch.eye(d, dtype=DT)])
            info["reference_vs_central_differences"] = rel(H_fd, H_ref)
        info["reference_asymmetry"] = asym(H_ref)
        rt = 1e-12
        f_o, _ = ours(p, rt, maxiter=1000)
        f_t, _ = theirs(p, rt, maxiter=1000)
        eta = 1.0 / float(torch.linalg.eigvalsh(p.hess(p.w_star, lam))[-1])
        fp = hg.FixedPointLayer(lambda ws, hs: [ws[0] - eta * p.F(ws[0], hs[0])], solver="anderson", maxiter=2000,
                                rtol=1e-13, backward_maxiter=1000)
        f_fp = lambda l: fp([torch.zeros(d, dtype=DT)], [l])[0]  # noqa: E731
        methods = {
            "ours custom_root (cg): torch.func.hessian": ("hessian", f_o),
            "ours custom_root (cg): double backward": ("double", f_o),
            "ours FixedPointLayer (anderson, gmres): torch.func.hessian": ("hessian", f_fp),
            "torchopt custom_root (solve_cg): double backward": ("double", f_t),
            "torchopt custom_root (solve_cg): torch.func.hessian": ("hessian", f_t),
        }
        res = {}
        for name, (how, fwd) in methods.items():
            Ffun = lambda l, fwd=fwd: p.E(fwd(l))  # noqa: E731
            try:
                if how == "hessian":
                    H = torch.func.hessian(Ffun)(lam)
                    g = torch.func.grad(Ffun)(lam)
                else:
                    g, H = double_backward(Ffun, lam)
                res[name] = dict(grad_err=rel(g, g_ref), hess_err=rel(H, H_ref), asym=asym(H), error=None)
            except Exception as e:  # noqa: BLE001 - reported
                res[name] = dict(error=_msg(e))
        out[kind] = dict(methods=res, **info)
        progress.update()
    return out


def table_hessian(res, d) -> str:
    names = list(res["ridge"]["methods"])
    lines = [f"| d = {d}: method | ridge grad err | ridge Hessian rel. err | ridge asymmetry | logistic grad err | "
             "logistic Hessian rel. err | logistic asymmetry |", "|---|---|---|---|---|---|---|"]
    for name in names:
        cells = []
        for kind in ("ridge", "logistic"):
            m = res[kind]["methods"][name]
            if m["error"]:
                cells += [f"raises {m['error'].split(':')[0]}", "-", "-"]
            else:
                cells += [f"{m['grad_err']:.1e}", f"**{m['hess_err']:.1e}**", f"{m['asym']:.1e}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    extra = [f"reference asymmetry: ridge {res['ridge']['reference_asymmetry']:.1e}, logistic "
             f"{res['logistic']['reference_asymmetry']:.1e}; logistic reference (autograd through 3 Newton steps "
             f"at the root) vs central differences of the exact gradient (h = 1e-4): "
             f"{res['logistic']['reference_vs_central_differences']:.1e}"]
    errs = sorted({f"{n}: {res[k]['methods'][n]['error']}" for k in res for n in names if res[k]["methods"][n]["error"]})
    return "\n".join(lines + [""] + extra + errs)


# ------------------------------------------------------------------------------------------- 3. torch.func
def bench_func(B: int, d: int, repeats: int, progress):
    p = Problem("ridge", d, seed=2).setup()
    g = torch.Generator().manual_seed(3)
    lams = -2.0 + 2.0 * torch.rand(B, d, generator=g, dtype=DT)
    ys = p.y + 0.3 * torch.randn(B, p.n, generator=g, dtype=DT)
    ref = torch.stack([torch.func.grad(lambda l, y=y: p.E(p.solve(l, y)))(l) for l, y in zip(lams, ys)])
    rows = []

    s_o = hg.custom_root(lambda ws, hs: [p.F(ws[0], hs[0], hs[1])], backward_solver="cg", backward_maxiter=1000,
                         backward_rtol=1e-12)(lambda w0, hs: [p.solve(hs[0], hs[1])])
    F_o = lambda l, y: p.E(s_o([torch.zeros(d, dtype=DT)], [l, y])[0])  # noqa: E731

    @torchopt.diff.implicit.custom_root(lambda w, l, y: p.F(w, l, y), argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(rtol=1e-12, maxiter=1000))
    def s_t(w0, l, y):
        return p.solve(l, y)
    F_t = lambda l, y: p.E(s_t(torch.zeros(d, dtype=DT), l, y))  # noqa: E731

    def loop(Ffun):
        out = []
        for l, y in zip(lams, ys):
            l = l.clone().requires_grad_(True)
            out.append(torch.autograd.grad(Ffun(l, y), l)[0])
        return torch.stack(out)

    for lib, Ffun in (("ours", F_o), ("torchopt", F_t)):
        row = dict(library=lib, what=f"torch.vmap(torch.func.grad) over {B} ridge tasks, d = {d}")
        try:
            vm = torch.vmap(torch.func.grad(Ffun))
            G = vm(lams, ys)
            t_vmap = statistics.median([_timed(lambda: vm(lams, ys)) for _ in range(repeats)])
            t_loop = statistics.median([_timed(lambda: loop(Ffun)) for _ in range(repeats)])
            row.update(result="ok", max_rel_err=max(rel(a, b) for a, b in zip(G, ref)),
                       vmap_ms=1e3 * t_vmap, loop_ms=1e3 * t_loop)
        except Exception as e:  # noqa: BLE001 - reported
            G = loop(Ffun)
            row.update(result=f"raises {type(e).__name__}", error=_msg(e),
                       loop_max_rel_err=max(rel(a, b) for a, b in zip(G, ref)))
        rows.append(row)
    progress.update()

    # 0-d solution: w^3 + w = a, w*(2) = 1, dw*/da = 1 / (3 w^2 + 1) = 0.25
    def newton(w, a):
        for _ in range(50):
            w = w - (w ** 3 + w - a) / (3 * w ** 2 + 1)
        return w

    a0, exact = torch.tensor(2.0, dtype=DT), 0.25
    s0 = hg.custom_root(lambda ws, hs: [ws[0] ** 3 + ws[0] - hs[0]], backward_solver="cg")(
        lambda w0, hs: [newton(w0[0], hs[0])])
    cases = {"ours custom_root (cg)": lambda a: s0([torch.tensor(0.0, dtype=DT)], [a])[0]}
    for label, solve in (("torchopt solve_cg() (default maxiter)", torchopt.linear_solve.solve_cg()),
                         ("torchopt default solve (solve_normal_cg())", None),
                         ("torchopt solve_cg(maxiter=10) (workaround)", torchopt.linear_solve.solve_cg(maxiter=10))):
        kw = {} if solve is None else dict(solve=solve)
        dec = torchopt.diff.implicit.custom_root(lambda w, a: w ** 3 + w - a, argnums=1, **kw)(
            lambda w0, a: newton(w0, a))
        cases[label] = lambda a, dec=dec: dec(torch.tensor(0.0, dtype=DT), a)
    zero_d = []
    for label, fwd in cases.items():
        a = a0.clone().requires_grad_(True)
        try:
            w = fwd(a)
            (gr,) = torch.autograd.grad(w, a)
            zero_d.append(dict(case=label, w=float(w.detach()), grad=float(gr) + 0.0, exact=exact, error=None))
        except Exception as e:  # noqa: BLE001 - reported
            zero_d.append(dict(case=label, error=_msg(e)))
    progress.update()
    return dict(vmap=rows, zero_d=zero_d)


def table_func(res) -> str:
    lines = ["| library | torch.func | result | max rel. err vs closed form | vmap ms | per-task loop ms |",
             "|---|---|---|---|---|---|"]
    for r in res["vmap"]:
        if r["result"] == "ok":
            lines.append(f"| {r['library']} | {r['what']} | ok | {r['max_rel_err']:.1e} | {r['vmap_ms']:.1f} | "
                         f"{r['loop_ms']:.1f} |")
        else:
            lines.append(f"| {r['library']} | {r['what']} | **{r['result']}** | - (its autograd loop: "
                         f"{r['loop_max_rel_err']:.1e}) | - | - |")
    lines += ["", "| 0-d solution w^3 + w = a at a = 2 | w* | dw*/da | exact |", "|---|---|---|---|"]
    for r in res["zero_d"]:
        if r["error"]:
            lines.append(f"| {r['case']} | raises {r['error']} | - | 0.25 |")
        else:
            lines.append(f"| {r['case']} | {r['w']:.6f} | **{r['grad']:.6g}** | {r['exact']} |")
    errs = [f"{r['library']}: {r['error']}" for r in res["vmap"] if r.get("error")]
    return "\n".join(lines + ([""] + errs if errs else []))


# ------------------------------------------------------------------------------------------------- output
def plot(rows, path: str) -> None:
    """Time per backward against d, both libraries, one panel per problem."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r["problem"] == kind]
        ds = [r["d"] for r in rs]
        ax.loglog(ds, [r["ours_ms"] for r in rs], "o-", label="hypergrad custom_root (cg)")
        ax.loglog(ds, [r["torchopt_ms"] for r in rs], "s--", label="torchopt 0.7.3 custom_root (solve_cg)")
        for r in rs:
            ax.annotate(f"{r['ratio']:.2f}x", (r["d"], r["torchopt_ms"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=8)
        ax.set(xlabel="features d (n = 2d)", ylabel="ms per backward (median)",
               title=f"{kind}: dE/dlam at rel. err <= {rs[0]['target']:.0e}\n(labels: torchopt time / ours)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d in {10, 50}, 1 repeat (seconds)")
    ap.add_argument("--dims", type=int, nargs="+", help="feature counts for the backward timing (default 10 100 1000)")
    ap.add_argument("--repeats", type=int, help="timed repeats per size (default 21; --quick: 1)")
    ap.add_argument("--target", type=float, default=1e-8, help="relative hypergradient error both libraries must reach")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = args.dims or ([10, 50] if args.quick else [10, 100, 1000])
    repeats = args.repeats or (1 if args.quick else 21)
    kinds = ["ridge", "logistic"]
    from tqdm import tqdm
    progress = tqdm(total=len(kinds) * len(dims) + 4, desc="bench_layer", file=sys.stderr, disable=None)
    res = dict(torch=torch.__version__, torchopt=torchopt.__version__, hypergrad=hg.__version__,
               threads=torch.get_num_threads(), quick=args.quick)
    res["backward"] = bench_backward(kinds, dims, repeats, args.target, progress)
    res["hessian"] = bench_hessian(10, progress)
    res["func"] = bench_func(16, 10, max(1, min(repeats, 5)), progress)
    progress.close()

    print(f"hypergrad {hg.__version__} vs torchopt {torchopt.__version__} (torch {torch.__version__}, "
          f"{res['threads']} thread(s), float64)")
    print(f"[backward] time of one hypergradient dE/dlam, each library's CG at the loosest rtol (half decades) "
          f"reaching rel. error <= {args.target:.0e}; medians of {repeats} interleaved repeats")
    print(table_backward(res["backward"]))
    print("[second derivatives] Hessian of F(lam) = E(w*(lam)); both CGs at rtol 1e-12")
    print(table_hessian(res["hessian"], 10))
    print("[torch.func] vmap of grad; 0-d solution (torchopt issue #222)")
    print(table_func(res["func"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_layer.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res["backward"], os.path.join(args.out, "bench_layer.png"))
    return res


if __name__ == "__main__":
    main()
