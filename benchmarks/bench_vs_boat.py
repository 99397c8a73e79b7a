"""Our bilevel solvers (``methods/``) against BOAT 1.1.1 (``boat-torch``), side by side in one process.

What is measured: the wall time of one whole upper iteration (the lower loop, the hypergradient and the
upper optimizer's step) of each method in both libraries, on two workloads:

A. data hyper-cleaning, BOAT's own protocol (examples/data_hyper_cleaning) on scikit-learn's bundled
   ``load_digits`` (1797 images, 8x8): 600 train / 600 validation / 597 test, pixels / 16, half of the
   training labels replaced by a random *wrong* label; lower model ``nn.Linear(64, 10)`` initialized like
   BOAT's ``initialize`` (weights N(0, 0.01^2), zero bias); upper variables x, one weight per training
   sample (BOAT's ``Net_x``: f = mean(sigmoid(x) * per-sample cross-entropy)); F = validation
   cross-entropy; lower SGD lr 0.1 (BOAT's example uses 0.01 for 5 steps on MNIST; 0.1 is stable here,
   below 2/L, and lets T = 50 steps move the model), upper Adam lr 0.01, T = 50, 150 upper iterations.
B. a dense quadratic bilevel problem, n lower variables (500 and 2000), m = 10 upper variables:
   f(x, y) = 1/2 y'Ay - y'Bx + 1/2 x'(B'A^-1 B)x + 1 = 1/2 (y - y*(x))'A(y - y*(x)) + 1 >= 1,
   A = Q diag(lam) Q', lam in [1, 10], B Gaussian / sqrt(n); F = 1/2 |y - y_t|^2 + 1/2 1e-3 |x|^2;
   lower SGD lr 0.1, T = 20, upper Adam lr 0.01, 30 upper iterations. The terms without y
   (1/2 x'B'A^-1Bx + 1) change no method's hypergradient (only grad_y f and differences of f enter); they
   keep the lower value f* = 1, which BOAT's VSO needs: its barrier's argument evaluates to f*(x) and
   divides its steps, so f* <= 0 gives NaN and f* near 0 diverges.

How: for every method our solver and BOAT's are built from identical initial models (deep copies of one
template) and stepped alternately in rounds, one upper iteration each per round, the order alternating
between rounds, each timed with ``time.perf_counter`` around the whole iteration (ours: zero_grad,
``compute_gradients``, ``opt.step()``; BOAT: ``Problem.run_iter``, which steps BOAT's optimizers and, every
iteration, evaluates both losses and rewrites its whole loss history as JSON -- its own bookkeeping, which
cannot be switched off: it is included, with ``loss_log_path`` = /dev/null so that no disk is timed, and its
share is reported). One warm-up round is not counted. Reported: the median ms per iteration of each, the
median and min-max over rounds of the per-round ratio ours / BOAT, and both over the FLOOR, the time of T
raw lower gradients ``torch.autograd.grad(f(x, y), y)`` at fixed x (no graph), measured once per round in
the same run. For RAD, CG and Neumann a third contender runs in the same rounds: the same mathematics in
plain autograd (:class:`Plain`: no checks, hypertorch-style fixed-k CG), the floor a library can approach
at equal mathematics; ours/plain and BOAT/plain are reported. One torch thread, float32.

Before timing, a correctness run in float64 (10-20 upper iterations per method, same initial models)
compares our and BOAT's upper hypergradient at every iteration, the final upper variables and the final
validation (upper) loss; "same" means every relative difference is below 1e-8. The methods and BOAT's
configurations:

    RAD       ours Dynamic(...)                           BOAT gm_op [NGD],      na_op [RAD]
    T-RAD     ours Dynamic(..., truncate_iters=K)         BOAT gm_op [NGD],      na_op [RAD, RGT], RGT.truncate_iter=K
    BDA       ours Dynamic(..., alpha=0.5, alpha_schedule=a_t = 0.5 * 0.9^t)   BOAT gm_op [NGD, GDA], na_op [RAD],
              GDA {alpha_init 0.5, alpha_decay 0.9} (BOAT multiplies alpha by alpha_decay after each lower step)
    CG        ours Implicit(..., k=10, tolerance=1e-10)   BOAT gm_op [NGD],      na_op [CG],  CG {k 10, tolerance 1e-10}
    Neumann   ours Implicit(..., solver="neumann")        BOAT gm_op [NGD],      na_op [NS],  same k, tolerance
    IAPTT-GM  ours Dynamic(..., acquire_max_loss=True, init_aux=True), y_0 stepped by its own Adam (lr DI.lr)
                                                          BOAT gm_op [NGD, DI],  na_op [RAD, PTT], copy_last_param off
    BVFIM     ours BVFIM(z_l2_reg=2 ll_l2_reg, y_l2_reg=2 ul_l2_reg, y_ln_reg=ul_ln_reg, lower_loop=z_loop,
              y_loop=T, z_lr=lower lr, y_lr=VSO.z_lr, reg_decay=t -> 1 + t)      BOAT fo_op VSO
              (BOAT's VSO is not BVFIM's paper algorithm: no "same" claim, both losses are reported)

Both warm-start the lower model from the previous upper iteration (BOAT's copy_last_param, our warm_start),
except IAPTT-GM, where y_0 is an upper variable on both sides.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_vs_boat.py            # full run (~5 min on 2 cores),
                                                            # also writes docs/bench_vs_boat.png
    .venv/bin/python benchmarks/bench_vs_boat.py --quick    # seconds (after the install)
    .venv/bin/python benchmarks/bench_vs_boat.py --boat-python /path/to/venv/bin/python   # reuse a BOAT venv

BOAT pins numpy<=1.26.4, which conflicts with this project's environment, so BOAT lives in its own venv,
``benchmarks/.boat-venv`` (gitignored), installed on the first run: ``python -m venv``, then ``pip install``
of ``torch==<this torch's version>`` (the CPU build; falling back to PyTorch's CPU index), ``numpy<=1.26.4
higher matplotlib scikit-learn tqdm setuptools``, and ``boat-torch==1.1.1 --no-deps`` (its metadata also
requires torchvision, which BOAT's code never imports and whose PyPI build breaks beside this torch). The
script then re-runs itself with that venv's python, the repository root on ``sys.path`` (our library needs
only torch), so both libraries run in one process. Without network the install fails: the script says why
and exits 0. ``BENCH_VS_BOAT_VENV=DIR`` puts the venv elsewhere.
Results: ``<out>/bench_vs_boat.json``, ``.csv``, ``.md`` (default ``results/``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.environ.get("BENCH_VS_BOAT_VENV") or os.path.join(HERE, ".boat-venv")  # the env var: another place
CHILD_ENV = "BENCH_VS_BOAT_CHILD"
BOAT_VERSION = "1.1.1"
BOAT_DEPS = ["numpy<=1.26.4", "higher", "matplotlib", "scikit-learn", "tqdm", "setuptools"]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SAME_RTOL = 1e-8
TARGET = 0.7
LOSS_MODULE = "_bench_vs_boat_losses"  # where BOAT's loss config finds our loss functions (importlib)


# ==================================================================== the parent: install BOAT, re-run
def _venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")


def _probe(python: str) -> tuple:
    """(ok, message): can ``python`` import BOAT and everything this script needs there?"""
    code = ("import torch, numpy, higher, sklearn, matplotlib, boat_torch, importlib.metadata as m; "
            "print(torch.__version__, m.version('boat-torch'))")
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return p.returncode == 0, (p.stdout.strip() if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1])


def _torch_version() -> str:
    try:
        from importlib.metadata import version
        return version("torch")
    except Exception:  # noqa: BLE001 - no torch here: take whatever pip resolves
        return ""


def _install(log_path: str) -> tuple:
    """Create ``benchmarks/.boat-venv`` and install BOAT into it. Returns (python or None, reason)."""
    py = _venv_python(VENV)
    os.makedirs(VENV, exist_ok=True)
    log = open(log_path, "a")

    def run(cmd, what):
        print(f"  {what} ...", flush=True)
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0

    try:
        if not os.path.exists(py) and not run([sys.executable, "-m", "venv", VENV], f"python -m venv {VENV}"):
            return None, "python -m venv failed"
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
        tv = _torch_version()
        base = tv.split("+")[0]
        spec = f"torch=={tv}" if tv else "torch"
        ok = (run(pip + [spec], f"pip install {spec}")
              or run(pip + ["--index-url", TORCH_CPU_INDEX, spec if tv else "torch"],
                     f"pip install {spec} --index-url {TORCH_CPU_INDEX}")
              or (base != tv and run(pip + [f"torch=={base}"], f"pip install torch=={base}")))
        if not ok:
            return None, f"pip could not install {spec}"
        if not run(pip + BOAT_DEPS, "pip install " + " ".join(BOAT_DEPS)):
            return None, "pip could not install BOAT's dependencies (" + ", ".join(BOAT_DEPS) + ")"
        boat = f"boat-torch=={BOAT_VERSION}"
        if not run(pip + ["--no-deps", boat], f"pip install {boat} --no-deps"):
            return None, f"pip could not install boat-torch=={BOAT_VERSION}"
    finally:
        log.close()
    ok, msg = _probe(py)
    return (py, msg) if ok else (None, f"the new venv cannot import BOAT: {msg}")


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _skip(reason: str, log_path: str = "") -> int:
    tail = ""
    if log_path and os.path.exists(log_path):
        with open(log_path) as fh:
            lines = [ln.rstrip() for ln in fh if ln.strip()]
        tail = "\n".join("    | " + ln for ln in lines[-6:])
    print(f"bench_vs_boat: SKIPPED (nothing was measured) -- BOAT {BOAT_VERSION} is not available: {reason}.\n"
          f"  Installing it needs PyPI (and PyTorch's CPU wheel of torch {_torch_version() or '?'}); the pip log is "
          f"{_show(log_path) if log_path else '(none)'}" + (f", ending with:\n{tail}" if tail else "") + "\n"
          f"  Retry once PyPI is reachable: {_show(sys.executable)} {_show(os.path.abspath(__file__))} (the install "
          f"resumes in {_show(VENV)}; delete that folder to start afresh),\n"
          f"  or reuse a python that has boat_torch {BOAT_VERSION}, higher and scikit-learn: --boat-python PATH",
          flush=True)
    return 0


def parent(argv) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--boat-python", default=None)
    known, _ = ap.parse_known_args(argv)
    if known.boat_python:
        python = known.boat_python
        ok, msg = _probe(python)
        if not ok:
            return _skip(f"{python} cannot import BOAT and its dependencies ({msg})")
    else:
        python = _venv_python(VENV)
        ok, msg = _probe(python) if os.path.exists(python) else (False, "")
        if not ok:
            log_path = os.path.join(VENV, "install.log")
            print(f"bench_vs_boat: installing BOAT {BOAT_VERSION} into {_show(VENV)} (once; log: "
                  f"{_show(log_path)})", flush=True)
            python, msg = _install(log_path)
            if python is None:
                return _skip(msg, log_path)
    print(f"bench_vs_boat: running under {_show(python)} (torch, boat-torch: {msg})", flush=True)
    if _torch_version() and msg.split()[0] != _torch_version():
        print(f"  note: that python has torch {msg.split()[0]}, this one {_torch_version()}; both libraries are "
              "timed on the former", flush=True)
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([python, os.path.abspath(__file__)] + list(argv), env=env)


# ==================================================================== the child: both libraries
def _progress(iterable, **kw):
    try:
        from tqdm import tqdm
        return tqdm(iterable, leave=False, dynamic_ncols=True, disable=None, **kw)  # no bars off a terminal
    except ImportError:  # a reused BOAT venv without tqdm: no bars
        return iterable


# -------------------------------------------------------------------- loss functions (both libraries)
# BOAT's losses are ``loss(feed_dict, upper_model, lower_model, **kwargs)`` (kwargs: ``params=`` of the higher
# patched model); ours are ``objective(state)``. Each pair computes the same float operations in the same order.

def _ce(logits, target, reduction="mean"):
    import torch.nn.functional as Fn
    return Fn.cross_entropy(logits, target, reduction=reduction)


def dhl_ll(ll_feed_dict, upper_model, lower_model, **kwargs):        # BOAT's loss_func_dhl.ll_loss
    return upper_model(_ce(lower_model(ll_feed_dict["data"], **kwargs), ll_feed_dict["target"], "none"))


def dhl_ul(ul_feed_dict, upper_model, lower_model, **kwargs):        # BOAT's loss_func_dhl.ul_loss
    return _ce(lower_model(ul_feed_dict["data"], **kwargs), ul_feed_dict["target"])


def dhl_gda(ll_feed_dict, ul_feed_dict, upper_model, lower_model, **kwargs):   # BOAT's loss_func_dhl.gda_loss
    a = ll_feed_dict["alpha"]
    return a * dhl_ul(ul_feed_dict, upper_model, lower_model, **kwargs) + (1 - a) * dhl_ll(
        ll_feed_dict, upper_model, lower_model, **kwargs)


def dhl_ll_state(state):
    return dhl_ll({"data": state["data"], "target": state["target"]}, state["upper_model"], state["lower_model"])


def dhl_ul_state(state):
    return dhl_ul({"data": state["data"], "target": state["target"]}, state["upper_model"], state["lower_model"])


def qp_f(d, x, y):
    return 0.5 * (y @ (d["A"] @ y)) - y @ (d["B"] @ x) + 0.5 * (x @ (d["M"] @ x)) + 1.0


def qp_F(d, x, y):
    r = y - d["yt"]
    return 0.5 * (r @ r) + 0.5e-3 * (x @ x)


def qp_ll(ll_feed_dict, upper_model, lower_model, **kwargs):
    return qp_f(ll_feed_dict, upper_model.x, lower_model(**kwargs))


def qp_ul(ul_feed_dict, upper_model, lower_model, **kwargs):
    return qp_F(ul_feed_dict, upper_model.x, lower_model(**kwargs))


def qp_gda(ll_feed_dict, ul_feed_dict, upper_model, lower_model, **kwargs):
    a = ll_feed_dict["alpha"]
    return a * qp_ul(ul_feed_dict, upper_model, lower_model, **kwargs) + (1 - a) * qp_ll(
        ll_feed_dict, upper_model, lower_model, **kwargs)


def qp_ll_state(state):
    return qp_f(state["data"], state["upper_model"].x, state["lower_model"]())


def qp_ul_state(state):
    return qp_F(state["data"], state["upper_model"].x, state["lower_model"]())


def _register_losses():
    mod = types.ModuleType(LOSS_MODULE)
    for name in ("dhl_ll", "dhl_ul", "dhl_gda", "qp_ll", "qp_ul", "qp_gda"):
        setattr(mod, name, globals()[name])
    sys.modules[LOSS_MODULE] = mod


# -------------------------------------------------------------------- workloads
class Workload:
    key = ""
    title = ""
    methods = ()
    T = 20
    truncate = 10
    ll_lr = 0.1
    ul_lr = 0.01
    di_lr = 0.01       # BOAT's DI.lr (boat_config_dhl.json): the step of y_0 in IAPTT-GM
    k = 10             # CG / Neumann iterations
    tol = 1e-10        # CG / Neumann tolerance (BOAT: absolute)
    vso = {"z_loop": None, "z_lr": 0.01, "ll_l2_reg": 0.1, "ul_l2_reg": 0.01, "ul_ln_reg": 10.0, "reg_decay": True}
    alpha, alpha_decay = 0.5, 0.9
    prefix = ""

    def loss_config(self):
        return {"lower_level_loss": {"function": f"{LOSS_MODULE}.{self.prefix}_ll"},
                "upper_level_loss": {"function": f"{LOSS_MODULE}.{self.prefix}_ul"},
                "gda_loss": {"function": f"{LOSS_MODULE}.{self.prefix}_gda"}}


class HyperCleaning(Workload):
    key, prefix = "A", "dhl"
    methods = ("RAD", "T-RAD", "BDA", "CG", "Neumann", "IAPTT-GM", "BVFIM")
    T, truncate = 50, 25

    def __init__(self, dtype, seed: int = 0):
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        X, y = load_digits(return_X_y=True)
        rng = np.random.RandomState(seed)
        perm = rng.permutation(len(y))
        tr, va, te = perm[:600], perm[600:1200], perm[1200:]
        dirty = y[tr].copy()
        flip = rng.choice(len(tr), len(tr) // 2, replace=False)            # data_polluting(0.5)
        dirty[flip] = (dirty[flip] + rng.randint(1, 10, size=len(flip))) % 10   # a wrong label, uniformly
        self.n_flipped = int((dirty != y[tr]).sum())
        t = lambda a: torch.as_tensor(a / 16.0, dtype=dtype)
        lab = lambda a: torch.as_tensor(a, dtype=torch.long)
        self.Xtr, self.ytr, self.Xva, self.yva = t(X[tr]), lab(dirty), t(X[va]), lab(y[va])
        self.Xte, self.yte = t(X[te]), lab(y[te])
        self.n_train, self.dtype, self.seed = len(tr), dtype, seed
        self.title = (f"A: data hyper-cleaning, digits 600/600/597, {self.n_flipped} of 600 training labels wrong, "
                      f"Linear(64, 10), T={self.T}, lower SGD lr {self.ll_lr}, upper Adam lr {self.ul_lr}")

    def models(self):
        import torch
        from torch import nn

        class NetX(nn.Module):  # BOAT's Net_x
            def __init__(self, n):
                super().__init__()
                self.x = nn.Parameter(torch.zeros(n))

            def forward(self, losses):
                return (torch.sigmoid(self.x) * losses).mean()

        torch.manual_seed(self.seed + 1)
        ll = nn.Linear(64, 10)
        with torch.no_grad():   # BOAT's initialize()
            ll.weight.normal_(0, 0.01)
            ll.bias.zero_()
        return NetX(self.n_train).to(self.dtype), ll.to(self.dtype)

    def ours_objectives(self):
        return dhl_ll_state, dhl_ul_state

    def ours_data(self):  # (ul_data, ul_target, ll_data, ll_target)
        return self.Xva, self.yva, self.Xtr, self.ytr

    def boat_feeds(self):
        return {"data": self.Xtr, "target": self.ytr}, {"data": self.Xva, "target": self.yva}

    def upper_loss(self, ul, ll) -> float:
        import torch
        with torch.no_grad():
            return float(dhl_ul({"data": self.Xva, "target": self.yva}, ul, ll))

    def test_accuracy(self, ll) -> float:
        import torch
        with torch.no_grad():
            return float((ll(self.Xte).argmax(1) == self.yte).double().mean())

    def plain_losses(self):
        """f(y, x), F(y, x) on plain tensor lists y = [W, b], x = [x] (no module adapter)."""
        import torch
        import torch.nn.functional as Fn

        def f(y, x):
            return (torch.sigmoid(x[0]) * Fn.cross_entropy(Fn.linear(self.Xtr, y[0], y[1]), self.ytr,
                                                          reduction="none")).mean()

        def F(y, x):
            return Fn.cross_entropy(Fn.linear(self.Xva, y[0], y[1]), self.yva)

        return f, F

    def floor(self, ul, ll, T: int) -> float:
        """Seconds of T raw lower gradients at fixed x, no graph."""
        import torch
        import torch.nn.functional as Fn
        x = ul.x.detach()
        W, b = ll.weight.detach().requires_grad_(True), ll.bias.detach().requires_grad_(True)
        t0 = time.perf_counter()
        for _ in range(T):
            loss = (torch.sigmoid(x) * Fn.cross_entropy(Fn.linear(self.Xtr, W, b), self.ytr, reduction="none")).mean()
            torch.autograd.grad(loss, [W, b])
        return time.perf_counter() - t0


class Quadratic(Workload):
    key, prefix = "B", "qp"
    methods = ("RAD", "T-RAD", "BDA", "CG", "Neumann", "BVFIM")
    T, truncate, m = 20, 10, 10

    def __init__(self, n: int, dtype, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(1000 + n + seed)
        d64 = torch.float64
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=d64))
        lam = 1.0 + 9.0 * torch.rand(n, generator=g, dtype=d64)
        lam[0], lam[-1] = 1.0, 10.0
        A = (Q * lam) @ Q.T
        A = 0.5 * (A + A.T)
        B = torch.randn(n, self.m, generator=g, dtype=d64) / math.sqrt(n)
        AiB = torch.linalg.solve(A, B)
        M = B.T @ AiB
        x_true = torch.randn(self.m, generator=g, dtype=d64)
        yt = AiB @ x_true + 0.1 * torch.randn(n, generator=g, dtype=d64) / math.sqrt(n)
        self.data = {k: v.to(dtype) for k, v in dict(A=A, B=B, M=0.5 * (M + M.T), yt=yt).items()}
        self.y0 = (0.1 * torch.randn(n, generator=g, dtype=d64)).to(dtype)
        self.n, self.dtype = n, dtype
        self.key = f"B{n}"
        self.title = (f"B: dense quadratic, n={n} lower / m={self.m} upper variables, lam(A) in [1, 10], T={self.T}, "
                      f"lower SGD lr {self.ll_lr}, upper Adam lr {self.ul_lr}")

    def models(self):
        import torch
        from torch import nn

        class Upper(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.x = nn.Parameter(torch.zeros(m))

        class Lower(nn.Module):
            def __init__(self, y0):
                super().__init__()
                self.y = nn.Parameter(y0.clone())

            def forward(self):
                return self.y

        return Upper(self.m).to(self.dtype), Lower(self.y0).to(self.dtype)

    def ours_objectives(self):
        return qp_ll_state, qp_ul_state

    def ours_data(self):
        return self.data, None, self.data, None

    def boat_feeds(self):
        return dict(self.data), dict(self.data)

    def upper_loss(self, ul, ll) -> float:
        import torch
        with torch.no_grad():
            return float(qp_F(self.data, ul.x, ll()))

    def plain_losses(self):
        return (lambda y, x: qp_f(self.data, x[0], y[0])), (lambda y, x: qp_F(self.data, x[0], y[0]))

    def floor(self, ul, ll, T: int) -> float:
        import torch
        x = ul.x.detach()
        y = ll.y.detach().requires_grad_(True)
        t0 = time.perf_counter()
        for _ in range(T):
            torch.autograd.grad(qp_f(self.data, x, y), y)
        return time.perf_counter() - t0


# -------------------------------------------------------------------- the two runners
def alpha_schedule(wl: Workload, steps: int):
    """BOAT's BDA weights: alpha_init, then multiplied by alpha_decay after every lower step (the same floats)."""
    a, out = wl.alpha, []
    for _ in range(steps):
        out.append(a)
        a = a * wl.alpha_decay
    return out


class Ours:
    """One of our solvers and its upper optimizer(s); ``step()`` is one whole upper iteration."""

    def __init__(self, method: str, wl: Workload, ul, ll):
        import torch
        import methods
        self.ul, self.ll, self.wl = ul, ll, wl
        llo, ulo = wl.ours_objectives()
        T, lr = wl.T, wl.ll_lr
        self.extra = None
        if method == "RAD":
            s = methods.Dynamic(llo, T, ul, ulo, ll, lr=lr)
        elif method == "T-RAD":
            s = methods.Dynamic(llo, T, ul, ulo, ll, truncate_iters=wl.truncate, lr=lr)
        elif method == "BDA":
            sched = alpha_schedule(wl, T)
            s = methods.Dynamic(llo, T, ul, ulo, ll, alpha=wl.alpha, alpha_schedule=lambda t: sched[t], lr=lr)
        elif method == "CG":
            s = methods.Implicit(ulo, ul, llo, ll, lr, wl.k, wl.tol, lower_loop=T, solver="cg")
        elif method == "Neumann":
            s = methods.Implicit(ulo, ul, llo, ll, lr, wl.k, wl.tol, lower_loop=T, solver="neumann")
        elif method == "IAPTT-GM":
            s = methods.Dynamic(llo, T, ul, ulo, ll, acquire_max_loss=True, init_aux=True, lr=lr)
            self.extra = torch.optim.Adam(ll.parameters(), lr=wl.di_lr)   # BOAT's DI optimizer: Adam, lr DI.lr
        elif method == "BVFIM":
            v = wl.vso
            s = methods.BVFIM(ulo, ul, llo, 2 * v["ll_l2_reg"], 2 * v["ul_l2_reg"], v["ul_ln_reg"], ll_model=ll,
                              lower_loop=v["z_loop"] or T, y_loop=T, z_lr=lr, y_lr=v["z_lr"],
                              reg_decay=lambda t: float(v["reg_decay"]) * t + 1.0)
        else:
            raise ValueError(method)
        self.solver = s
        self.opt = torch.optim.Adam(ul.parameters(), lr=wl.ul_lr)
        self.data = wl.ours_data()

    def upper_vars(self):
        return list(self.ul.parameters()) + (list(self.ll.parameters()) if self.extra is not None else [])

    def step(self, capture: bool = False):
        self.opt.zero_grad()
        if self.extra is not None:
            self.extra.zero_grad()
        self.solver.compute_gradients(*self.data)
        grads = [p.grad.detach().clone() for p in self.ul.parameters()] if capture else None
        if self.extra is not None:
            self.extra.step()
        self.opt.step()
        return grads


class Boat:
    """BOAT's ``Problem`` for one method; ``step()`` is one ``run_iter`` (BOAT steps its own optimizers)."""

    def __init__(self, method: str, wl: Workload, ul, ll, return_grad: bool = False):
        import torch
        import boat_torch
        self.ul, self.ll, self.wl, self.method = ul, ll, wl, method
        self.ll_opt = torch.optim.SGD(ll.parameters(), lr=wl.ll_lr)
        self.ul_opt = torch.optim.Adam(ul.parameters(), lr=wl.ul_lr)
        cfg = {"fo_op": None, "gm_op": None, "na_op": None, "return_grad": return_grad, "lower_iters": wl.T,
               "device": "cpu", "accumulate_grad": False, "copy_last_param": True, "fo_ol_batch_input": False,
               "loss_log_path": os.devnull,
               "DI": {"lr": wl.di_lr}, "GDA": {"alpha_init": wl.alpha, "alpha_decay": wl.alpha_decay},
               "RGT": {"truncate_iter": 0}, "CG": {"k": wl.k, "tolerance": wl.tol},
               "VSO": dict(wl.vso, z_loop=wl.vso["z_loop"] or wl.T),
               "lower_level_model": ll, "upper_level_model": ul, "lower_level_opt": self.ll_opt,
               "upper_level_opt": self.ul_opt, "lower_level_var": list(ll.parameters()),
               "upper_level_var": list(ul.parameters())}
        ops = {"RAD": (["NGD"], ["RAD"]), "T-RAD": (["NGD"], ["RAD", "RGT"]), "BDA": (["NGD", "GDA"], ["RAD"]),
               "CG": (["NGD"], ["CG"]), "Neumann": (["NGD"], ["NS"]), "IAPTT-GM": (["NGD", "DI"], ["RAD", "PTT"])}
        if method == "BVFIM":
            cfg["fo_op"] = "VSO"
        else:
            cfg["gm_op"], cfg["na_op"] = ops[method]
        if method == "T-RAD":
            cfg["RGT"]["truncate_iter"] = wl.truncate
        if method == "IAPTT-GM":
            cfg["copy_last_param"] = False   # y_0 is an upper variable: BOAT would otherwise step y_T by dF/dy_0
        self.problem = boat_torch.Problem(cfg, wl.loss_config())
        self.problem.build_ll_solver()
        self.problem.build_ul_solver()
        self.ll_fd, self.ul_fd = wl.boat_feeds()
        self.iteration = 0
        self.bookkeeping = []
        save = self.problem.save_losses

        def timed_save(**kw):  # BOAT's per-iteration loss log, timed (it stays in the timed iteration)
            t0 = time.perf_counter()
            save(**kw)
            self.bookkeeping.append(time.perf_counter() - t0)

        self.problem.save_losses = timed_save

    def upper_vars(self):
        return list(self.ul.parameters()) + (list(self.ll.parameters()) if self.method == "IAPTT-GM" else [])

    def step(self, capture: bool = False):
        out, _ = self.problem.run_iter(self.ll_fd, self.ul_fd, current_iter=self.iteration)
        self.iteration += 1
        if self.problem.boat_configs["return_grad"]:  # correctness run: run_iter returned x.grad, unstepped
            grads = [g.detach().clone() for g in out]
            self.ul_opt.step()
            self.ul_opt.zero_grad()
            return grads if capture else None
        return None


PLAIN = ("RAD", "CG", "Neumann")


class Plain:
    """The same mathematics as our RAD / CG / Neumann written plainly with torch.autograd on tensor lists: no
    checks, no diagnostics, no module adapter, hypertorch-style fixed-k CG -- the cost of the method's own raw
    derivatives, the floor a library can approach. ``step()`` is one whole upper iteration, like the others."""

    def __init__(self, method: str, wl: Workload, ul, ll):
        import torch
        self.method, self.wl, self.ul, self.ll = method, wl, ul, ll
        self.f, self.F = wl.plain_losses()
        self.opt = torch.optim.Adam(ul.parameters(), lr=wl.ul_lr)

    def _implicit(self, x, y, lr, k):
        import torch
        grad = torch.autograd.grad
        y = [t.detach().requires_grad_(True) for t in y]
        phi = [a - lr * g for a, g in zip(y, grad(self.f(y, x), y, create_graph=True))]
        gF = grad(self.F(y, x), y + x, allow_unused=True)
        b, gx = list(gF[:len(y)]), [torch.zeros_like(t) if g is None else g for t, g in zip(x, gF[len(y):])]
        jt = lambda u: grad(phi, y, grad_outputs=u, retain_graph=True)
        dot = lambda u, w: sum((a * c).sum() for a, c in zip(u, w))
        if self.method == "Neumann":
            v, term = list(b), list(b)
            for _ in range(k):
                term = list(jt(term))
                v = [a + c for a, c in zip(v, term)]
        else:  # CG on (I - J^T) v = b from v = 0, k iterations
            v, r = [torch.zeros_like(t) for t in b], list(b)
            p, rr = list(r), dot(r, r)
            for _ in range(k):
                Ap = [a - c for a, c in zip(p, jt(p))]
                alpha = rr / dot(p, Ap)
                v = [a + alpha * c for a, c in zip(v, p)]
                r = [a - alpha * c for a, c in zip(r, Ap)]
                rr_new = dot(r, r)
                p, rr = [a + (rr_new / rr) * c for a, c in zip(r, p)], rr_new
        return [a + c for a, c in zip(gx, grad(phi, x, grad_outputs=v))], y

    def step(self, capture: bool = False):
        import torch
        wl, lr = self.wl, self.wl.ll_lr
        x = list(self.ul.parameters())
        y = [p.detach() for p in self.ll.parameters()]
        self.opt.zero_grad()
        if self.method == "RAD":
            y = [t.requires_grad_(True) for t in (t.clone() for t in y)]
            for _ in range(wl.T):
                y = [a - lr * g for a, g in zip(y, torch.autograd.grad(self.f(y, x), y, create_graph=True))]
            gx = torch.autograd.grad(self.F(y, x), x)
        else:
            for _ in range(wl.T):
                leaves = [t.detach().requires_grad_(True) for t in y]
                y = [a.detach() - lr * g for a, g in zip(leaves, torch.autograd.grad(self.f(leaves, x), leaves))]
            gx, y = self._implicit(x, y, lr, wl.k)
        for p, g in zip(x, gx):
            p.grad = g.detach()
        with torch.no_grad():
            for p, t in zip(self.ll.parameters(), y):
                p.copy_(t)
        self.opt.step()
        return [g.detach().clone() for g in gx] if capture else None


def _rel(a, b) -> float:
    import torch
    a = torch.cat([t.detach().reshape(-1).double() for t in a])
    b = torch.cat([t.detach().reshape(-1).double() for t in b])
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _pair(method, wl):
    ul, ll = wl.models()
    return (copy.deepcopy(ul), copy.deepcopy(ll)), (copy.deepcopy(ul), copy.deepcopy(ll))


# -------------------------------------------------------------------- correctness (float64)
NOT_SAME = {
    "BVFIM": "BOAT's VSO is not BVFIM's algorithm: its barrier is log(f(y).item() + f*(x) - f(y)), whose value is "
             "f*(x) whatever y, so its y-step and its upper gradient divide by f* = f(z) + reg where BVFIM divides "
             "by the slack f* - f(y); its y-loop starts afresh from z at every upper iteration and takes one extra "
             "step with the last gradient after the loop; it has no mu2. Mapped alike: mu1 = 2 ll_l2_reg and "
             "theta = 2 ul_l2_reg (BOAT's terms are c |w|^2), tau = ul_ln_reg, all divided by 1 + reg_decay t. "
             "Not expected to match.",
}

BOAT_NOTES = [
    "BOAT's CG and NS (na_op [CG] / [NS]) run the lower loop with higher's track_higher_grads=False, whose "
    "steps return p.detach().requires_grad_(): the lower iterate y_T is detached, as ours. At y_T they take "
    "Phi(y) = y - lr grad_y f(x, y) (lr: the lower optimizer's), solve (I - dPhi/dy)^T v = grad_y F by CG from "
    "v = 0 for at most k iterations (absolute tolerance on |r|; when the tolerance stops it, hypertorch's CG "
    "returns the previous iterate -- with k = 10 it never stops early here) or sum the Neumann series "
    "grad_y F + sum_{i=1..k} (dPhi/dy)^{T i} grad_y F, and return grad_x F + (dPhi/dx)^T v: the same as our "
    "Implicit(solver='cg' | 'neumann') with the same k and lower step. Their gradient helper silently "
    "replaces NaN gradients by zeros.",
    "IAPTT-GM in BOAT is gm_op [NGD, DI] (DI: y_0 is an extra upper variable stepped by its own optimizer of "
    "the upper optimizer's class with lr DI.lr) with na_op [RAD, PTT]; na_op IAD is something else (the "
    "initialization is the only upper variable, MAML-style, and must share the upper model's structure). "
    "With the default copy_last_param=true BOAT would copy y_T into the lower model and then step it by "
    "dF/dy_0; it is off here, as IA needs.",
    "BOAT's data_polluting draws random.randint(0, 9): a tenth of its 'polluted' labels stay correct; ours "
    "draws one of the 9 wrong labels.",
]


def trad_diagnosis(wl: Workload):
    """BOAT's T-RAD (RGT) warm-up: its K untracked steps call loss.backward() and the lower optimizer on the
    lower *module*, while the loss is evaluated on higher's patched copy, whose fast weights are clones and
    never move: every warm-up step takes the gradient at y_0 (y_K = y_0 - K s grad f(y_0)), and each backward
    also adds d f(x, y_0)/dx to x.grad. Emulate exactly that with our functions and compare with BOAT's first
    hypergradient (float64). Returns a dict of relative differences."""
    import torch
    import methods
    torch.set_default_dtype(torch.float64)
    try:
        (ou, ol), (bu, bl) = _pair("T-RAD", wl)
        boat = Boat("T-RAD", wl, bu, bl, return_grad=True)
        g_boat = boat.step(capture=True)
        ours = Ours("T-RAD", wl, ou, ol)
        inner, outer = ours.solver.losses(*ours.data)
        hp = list(ou.parameters())
        y0 = [p.detach().requires_grad_(True) for p in ol.parameters()]
        with torch.enable_grad():
            f0 = inner(y0, hp)
            gy = torch.autograd.grad(f0, y0, retain_graph=True)
            gx = torch.autograd.grad(f0, hp)
        yK = [p.detach().clone() for p in y0]
        for _ in range(wl.truncate):
            yK = [p.add(g, alpha=-wl.ll_lr) for p, g in zip(yK, gy)]   # torch.optim.SGD's step, K times
        res = methods.dynamic_hypergradient(yK, hp, inner, outer, wl.T - wl.truncate, wl.ll_lr, set_grad=False)
        emul = [a + wl.truncate * b for a, b in zip(res.grads, gx)]
        ours_g = ours.step(capture=True)
        return {"boat_vs_emulation": _rel(g_boat, emul), "boat_vs_emulation_without_x_grad_leak":
                _rel(g_boat, res.grads), "boat_vs_ours": _rel(g_boat, ours_g)}
    finally:
        torch.set_default_dtype(torch.float32)


def correctness(wl_factory, methods_, iters: int):
    """float64 runs of ``iters`` upper iterations of both libraries from the same models."""
    import torch
    torch.set_default_dtype(torch.float64)
    out = {}
    try:
        wl = wl_factory(torch.float64)
        for method in _progress(methods_, desc=f"check {wl.key} (float64)"):
            rec = {"iterations": iters}
            try:
                (ou, ol), (bu, bl) = _pair(method, wl)
                ours, boat = Ours(method, wl, ou, ol), Boat(method, wl, bu, bl, return_grad=True)
                g_rel = []
                for _ in range(iters):
                    go, gb = ours.step(capture=True), boat.step(capture=True)
                    g_rel.append(_rel(go, gb))
                lo, lb = wl.upper_loss(ou, ol), wl.upper_loss(bu, bl)
                rec.update(grad_rel_max=max(g_rel), grad_rel_first=g_rel[0],
                           upper_vars_rel=_rel(ours.upper_vars(), boat.upper_vars()),
                           lower_rel=_rel(list(ol.parameters()), list(bl.parameters())),
                           ours_upper_loss=lo, boat_upper_loss=lb,
                           upper_loss_rel=abs(lo - lb) / abs(lb) if lb else abs(lo),
                           finite=bool(math.isfinite(lo) and math.isfinite(lb)))
                worst = max(rec["grad_rel_max"], rec["upper_vars_rel"], rec["upper_loss_rel"])
                rec["worst_rel"] = worst
                if method in NOT_SAME:
                    rec["verdict"] = "n/a"
                    rec["note"] = NOT_SAME[method]
                else:
                    rec["verdict"] = "same" if worst < SAME_RTOL else "differs"
                if method == "IAPTT-GM":
                    rec["ours_last_k_star"] = ours.solver.last.k_star   # PTT's chosen iterate (both sides)
                if hasattr(wl, "test_accuracy"):
                    rec["ours_test_acc"], rec["boat_test_acc"] = wl.test_accuracy(ol), wl.test_accuracy(bl)
            except Exception as e:  # noqa: BLE001 - report and go on
                rec.update(verdict="error", note=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            out[method] = rec
        if "T-RAD" in methods_ and out.get("T-RAD", {}).get("verdict") == "differs":
            try:
                d = trad_diagnosis(wl)
                out["T-RAD"]["diagnosis"] = d
                out["T-RAD"]["note"] = (
                    "BOAT's RGT warm-up is not T-RAD: its K untracked steps evaluate the lower loss on higher's "
                    "patched copy, whose fast weights never move (loss.backward() + the lower optimizer step the "
                    "lower module instead), so every warm-up step uses grad f at y_0, and each backward adds "
                    "df(x, y_0)/dx to x.grad. Emulating exactly that with our functions reproduces BOAT's first "
                    f"hypergradient to {d['boat_vs_emulation']:.1e} (without the x.grad leak: "
                    f"{d['boat_vs_emulation_without_x_grad_leak']:.1e}; against ours: {d['boat_vs_ours']:.1e}).")
            except Exception as e:  # noqa: BLE001
                out["T-RAD"]["note"] = f"diagnosis failed: {type(e).__name__}: {e}"
    finally:
        torch.set_default_dtype(torch.float32)
    return out


# -------------------------------------------------------------------- timing (float32)
def _rounds(rounds, wl, method, runners, ou, ol):
    """The paired rounds: per-round seconds of each runner and of the floor, the warm-up round dropped; the
    runners' order is reversed every other round."""
    names = list(runners)
    times = {n: [] for n in names + ["floor"]}
    for r in _progress(range(rounds + 1), desc=f"{wl.key} {method}", unit="round"):
        took = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runners[name].step()
            took[name] = time.perf_counter() - t0
        took["floor"] = wl.floor(ou, ol, wl.T)
        if r > 0:   # round 0 is the warm-up
            for n in times:
                times[n].append(took[n])
    return times


def time_method(method: str, wl: Workload, rounds: int):
    """Paired rounds: one upper iteration of each library per round (alternating order), then the floor; for
    RAD, CG and Neumann also the same mathematics in plain autograd (:class:`Plain`)."""
    (ou, ol), (bu, bl) = _pair(method, wl)
    runners = {"ours": Ours(method, wl, ou, ol), "boat": Boat(method, wl, bu, bl)}
    if method in PLAIN:
        pu, pl = _pair(method, wl)[0]
        runners["plain"] = Plain(method, wl, pu, pl)
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: the collector's passes stay short and alike for both
    try:
        t = _rounds(rounds, wl, method, runners, ou, ol)
    finally:
        gc.unfreeze()
    t_ours, t_boat, t_floor = t["ours"], t["boat"], t["floor"]
    ratios = [a / b for a, b in zip(t_ours, t_boat)]
    med = statistics.median
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]]
    book = runners["boat"].bookkeeping[1:] or [0.0]
    out = {"ours_ms": 1e3 * med(t_ours), "boat_ms": 1e3 * med(t_boat), "floor_ms": 1e3 * med(t_floor),
           "ratio_median": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "ratio_q1": q[0], "ratio_q3": q[-1],
           "ours_over_floor": med(t_ours) / med(t_floor), "boat_over_floor": med(t_boat) / med(t_floor),
           "boat_bookkeeping_ms": 1e3 * statistics.mean(book), "rounds": rounds,
           "ours_upper_loss_end": wl.upper_loss(ou, ol), "boat_upper_loss_end": wl.upper_loss(bu, bl),
           "raw_s": t}
    if "plain" in t:
        out.update(plain_ms=1e3 * med(t["plain"]),
                   ours_over_plain=med([a / b for a, b in zip(t_ours, t["plain"])]),
                   boat_over_plain=med([a / b for a, b in zip(t_boat, t["plain"])]))
    return out


def check_label(rec) -> str:
    if not rec:
        return "-"
    v = rec.get("verdict")
    if v == "same":
        return f"same ({rec['worst_rel']:.0e})"
    if v == "differs":
        return f"DIFFERS ({rec['worst_rel']:.1e})"
    if v == "n/a":
        return f"n/a (F {rec['ours_upper_loss']:.4g} vs {rec['boat_upper_loss']:.4g})"
    return "error"


def table(wl_title, rows, checks, T):
    head = ["method", "ours ms/iter", "BOAT ms/iter", "ratio ours/BOAT median [min-max]", "ours/floor",
            "BOAT/floor", "ours/plain", "BOAT/plain", "result check (float64)"]
    lines = [f"### {wl_title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
        if "error" in r:
            lines.append(f"| {method} | error: {r['error']} | | | | | | | {check_label(checks.get(method))} |")
            continue
        plain = (f"{r['ours_over_plain']:.2f} | {r['boat_over_plain']:.2f}" if "ours_over_plain" in r else "- | -")
        lines.append(f"| {method} | {r['ours_ms']:.2f} | {r['boat_ms']:.2f} | **{r['ratio_median']:.2f}** "
                     f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | {r['ours_over_floor']:.2f} | "
                     f"{r['boat_over_floor']:.2f} | {plain} | {check_label(checks.get(method))} |")
    fl = [r["floor_ms"] for r in rows.values() if "floor_ms" in r]
    bk = [r["boat_bookkeeping_ms"] for r in rows.values() if "boat_bookkeeping_ms" in r]
    if fl:
        lines += ["", f"Floor: {T} raw lower gradients at fixed x, median {statistics.median(fl):.2f} ms. Plain: the "
                  "same mathematics in plain autograd, no checks (RAD, CG, Neumann; ratios are medians of per-round "
                  f"ratios). BOAT's per-iteration loss log (included in its time): {statistics.mean(bk):.2f} ms."]
    return lines


def check_table(name, checks):
    head = ["method", "max rel. diff of the hypergradient", "rel. diff of the upper variables",
            "final upper loss ours", "final upper loss BOAT", "verdict"]
    lines = [f"#### {name}: float64 correctness run", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in checks.items():
        if r.get("verdict") == "error":
            lines.append(f"| {m} | error | | | | {r.get('note', '')} |")
            continue
        lines.append(f"| {m} | {r['grad_rel_max']:.1e} | {r['upper_vars_rel']:.1e} | {r['ours_upper_loss']:.10g} | "
                     f"{r['boat_upper_loss']:.10g} | {r['verdict']} |")
    notes = [f"- {m}: {r['note']}" for m, r in checks.items() if r.get("note")]
    return lines + ([""] + notes if notes else [])


def figure(results, path):
    """Median ratio per method and workload; thick bars: interquartile range, thin: min-max over rounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(results)
    meths = []
    for k in keys:
        meths += [m for m in results[k]["timing"] if m not in meths]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.35 * len(meths)), 4.6))
    w = 0.8 / max(1, len(keys))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = 1.6
    for i, k in enumerate(keys):
        for j, m in enumerate(meths):
            r = results[k]["timing"].get(m)
            if not r or "ratio_median" not in r:
                continue
            xj = j + (i - (len(keys) - 1) / 2) * w
            verdict = results[k]["checks"].get(m, {}).get("verdict")
            ax.bar(xj, r["ratio_median"], w, color=colors[i % len(colors)], hatch="//" if verdict != "same" else None,
                   edgecolor="white", label=results[k]["label"] if j == 0 or m == meths[0] else None)
            ax.vlines(xj, r["ratio_min"], r["ratio_max"], color="black", lw=0.6)
            ax.vlines(xj, r["ratio_q1"], r["ratio_q3"], color="black", lw=2.5)
            ax.text(xj, 0.03, f"{r['ratio_median']:.2f}", ha="center", va="bottom", fontsize=7, rotation=90,
                    color="white")
            top = max(top, min(r["ratio_q3"] * 1.15, 3.0))
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, l in zip(handles, labels):
        seen.setdefault(l, h)
    ax.axhline(TARGET, color="tab:red", ls="--", lw=1)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.text(-0.45, TARGET, f"target {TARGET}", color="tab:red", va="bottom", ha="left", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(meths)))
    ax.set_xticklabels(meths)
    ax.set_ylabel("time per upper iteration, ours / BOAT")
    ax.set_title("ours vs BOAT 1.1.1: median over paired rounds (thick: quartiles, thin: min-max)\n"
                 "hatched: BOAT computes something else (T-RAD: its RGT; BVFIM: its VSO); 1 thread, float32",
                 fontsize=9)
    ax.legend(seen.values(), seen.keys(), fontsize=8, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds (well under a minute)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--boat-python", default=None, help="a python with boat_torch installed (skips the install)")
    ap.add_argument("--rounds-a", type=int, default=None, help="upper iterations timed on workload A (default 150)")
    ap.add_argument("--rounds-b", type=int, default=None, help="upper iterations timed on workload B (default 30)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="workload B sizes n (default 500 2000)")
    ap.add_argument("--check-iters", type=int, default=None, help="float64 correctness iterations (default 15)")
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
    return ap


def child(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch
        import boat_torch  # noqa: F401
        import higher  # noqa: F401
        from importlib.metadata import version
    except ImportError as e:
        return _skip(f"this python ({sys.executable}) cannot import it ({e})")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import hypergrad
    import methods  # noqa: F401
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    warnings.filterwarnings("ignore", category=hypergrad.FixedPointWarning)  # T lower steps: y_T is approximate
    warnings.filterwarnings("ignore", category=UserWarning, module="higher")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _register_losses()
    q = args.quick
    rounds_a = args.rounds_a or (6 if q else 150)
    rounds_b = args.rounds_b or (6 if q else 30)
    sizes = args.sizes or ([100] if q else [500, 2000])
    check_iters = args.check_iters or (4 if q else 15)
    keep = (lambda ms: [m for m in ms if m in args.methods]) if args.methods else list
    t_start = time.perf_counter()
    env = {"torch": torch.__version__, "boat_torch": version("boat-torch"), "higher": version("higher"),
           "numpy": version("numpy"), "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(f"bench_vs_boat: torch {env['torch']}, boat-torch {env['boat_torch']}, higher {env['higher']}, numpy "
          f"{env['numpy']}, {env['threads']} thread, {env['cpus']} CPUs{' (--quick)' if q else ''}", flush=True)

    workloads = [("A", lambda dt: HyperCleaning(dt), rounds_a, "A: hyper-cleaning", "A")]
    workloads += [(f"B{n}", (lambda n: lambda dt: Quadratic(n, dt))(n), rounds_b, f"B: quadratic n={n}", "B")
                  for n in sizes]
    check_makers = {"A": (lambda dt: HyperCleaning(dt), "A"),
                    "B": (lambda dt: Quadratic(min(sizes), dt), f"B (n={min(sizes)})")}
    checks = {}
    results = {}
    for key, make, rounds, label, family in workloads:
        wl = make(torch.float32)
        ms = keep(wl.methods)
        t0 = time.perf_counter()
        if family not in checks:
            checks[family] = correctness(check_makers[family][0], ms, check_iters)
        t1 = time.perf_counter()
        timing = {}
        for m in ms:
            try:
                timing[m] = time_method(m, wl, rounds)
            except Exception as e:  # noqa: BLE001 - one failing method does not stop the others
                timing[m] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[key] = {"label": label, "title": wl.title, "T": wl.T, "rounds": rounds, "timing": timing,
                        "checks": checks[family], "check_name": check_makers[family][1],
                        "seconds": {"check": t1 - t0, "timing": time.perf_counter() - t1}}
        print("\n" + "\n".join(table(wl.title, timing, checks[family], wl.T)), flush=True)

    md = ["# Ours vs BOAT 1.1.1: time per upper iteration", "",
          f"`{' '.join(['python', 'benchmarks/bench_vs_boat.py'] + list(argv))}`; torch {env['torch']}, boat-torch "
          f"{env['boat_torch']}, higher {env['higher']}, numpy {env['numpy']}, 1 torch thread, float32, "
          f"{env['cpus']} CPUs. Ratio: per paired round, ours / BOAT (< 1: ours faster). Floor: T raw lower "
          "gradients at fixed x. Result check: float64 run of both from the same models; 'same' = hypergradients "
          f"at every iteration, upper variables and upper loss agree to < {SAME_RTOL:g} (relative).", ""]
    for key, r in results.items():
        md += table(r["title"], r["timing"], r["checks"], r["T"]) + [""]
    checks_md = []
    for family, c in checks.items():
        checks_md += check_table(check_makers[family][1], c) + [""]
    checks_md += ["#### What BOAT computes", ""] + [f"- {n}" for n in BOAT_NOTES] + [""]
    md += checks_md
    print("\n" + "\n".join(checks_md), flush=True)

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "bench_vs_boat")
    with open(base + ".json", "w") as fh:
        json.dump({"env": env, "args": vars(args), "same_rtol": SAME_RTOL, "boat_notes": BOAT_NOTES,
                   "results": results}, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    cols = ["workload", "method", "ours_ms", "boat_ms", "floor_ms", "plain_ms", "ratio_median", "ratio_min",
            "ratio_max", "ours_over_floor", "boat_over_floor", "ours_over_plain", "boat_over_plain", "boat_bookkeeping_ms", "rounds", "check", "check_worst_rel",
            "check_ours_upper_loss", "check_boat_upper_loss", "error"]
    with open(base + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for key, r in results.items():
            for m, t in r["timing"].items():
                c = r["checks"].get(m, {})
                w.writerow({"workload": key, "method": m, **{k: v for k, v in t.items() if k != "raw_s"},
                            "check": c.get("verdict"), "check_worst_rel": c.get("worst_rel"),
                            "check_ours_upper_loss": c.get("ours_upper_loss"),
                            "check_boat_upper_loss": c.get("boat_upper_loss")})
    wrote = [base + ".json", base + ".csv", base + ".md"]
    if not q:
        png = os.path.join(REPO, "docs", "bench_vs_boat.png")
        figure(results, png)
        wrote.append(png)
    print(f"\nwrote {', '.join(_show(p) for p in wrote)} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    if os.environ.get(CHILD_ENV) or importlib.util.find_spec("boat_torch") is not None:
        return child(argv)
    return parent(argv)


if __name__ == "__main__":
    sys.exit(main())
