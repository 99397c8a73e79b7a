"""A deep-equilibrium (DEQ) classifier on scikit-learn's digits, trained with ``loss.backward()``.

The hidden state of an image x is the fixed point of a one-layer tanh recurrence, found for a whole
minibatch at once by Anderson acceleration; the classifier reads it out linearly (hypertorch's
"Equilibrium models (RNN-style model on MNIST)" notebook, on the 8x8 digits so that it runs on a CPU):

    z*(x) = tanh(W z* + U x + b),     W = 0.9 V / max(1, ||V||_2)      (a contraction: ||W||_2 <= 0.9)
    logits = A z* + c,   loss = CE(logits, y),   Adam on (V, U, b, A, c)

``hypergrad.FixedPointLayer`` returns z* as a tensor of the caller's graph: ``loss.backward()`` solves the
adjoint system (I - dPhi/dz)^T u = dL/dz by GMRES (dPhi/dz = diag(1 - z^2) W is not symmetric) and
pulls u back to W, U, b by the implicit function theorem; no iteration of the forward solve is stored.
The report: train/test accuracy and seconds per epoch, mean Anderson (forward) and GMRES (adjoint)
iterations per step, and, at the trained model on one test batch, the iterations plain fixed-point
iteration needs against Anderson's to reach the same tolerance. Outputs: a table on the terminal, a
JSON file and a PNG in ``--out``.

Run ``python examples/deq_digits.py --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import hypergrad as hg

DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------- data
def load_data(n_test: int, seed: int, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """A seeded train/test split of ``load_digits``, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    if not 0 < n_test < len(y):
        raise ValueError(f"n_test must lie in (0, {len(y)}), got {n_test}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X = torch.tensor(X, dtype=dtype)[perm] / 16.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    return dict(X_train=X[n_test:], y_train=y[n_test:], X_test=X[:n_test], y_test=y[:n_test])


# --------------------------------------------------------------------------------------------- the model
def fp_map(params: List[torch.Tensor], hparams: List[torch.Tensor]) -> List[torch.Tensor]:
    """Phi(z; W, U, b, x) = tanh(z W^T + x U^T + b) for a [batch, hidden] state z."""
    (z,), (W, U, b, x) = params, hparams
    return [torch.tanh(z @ W.T + x @ U.T + b)]


class DEQ:
    """Parameters V, U, b (the equilibrium layer) and A, c (the readout); ``layer`` is the implicit layer."""

    def __init__(self, hidden: int, g: torch.Generator, dtype, layer: hg.FixedPointLayer, contraction: float = 0.9):
        def randn(*shape, scale):
            return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
        self.V = randn(hidden, hidden, scale=1 / math.sqrt(hidden))
        self.U = randn(hidden, 64, scale=1 / math.sqrt(64))
        self.b = torch.zeros(hidden, dtype=dtype, requires_grad=True)
        self.A = randn(10, hidden, scale=1 / math.sqrt(hidden))
        self.c = torch.zeros(10, dtype=dtype, requires_grad=True)
        self.layer, self.contraction = layer, contraction

    def parameters(self) -> List[torch.Tensor]:
        return [self.V, self.U, self.b, self.A, self.c]

    def W(self) -> torch.Tensor:
        """contraction * V / max(1, ||V||_2): spectral norm <= contraction < 1, so Phi contracts in z."""
        return self.contraction * self.V / torch.clamp(torch.linalg.matrix_norm(self.V, 2), min=1.0)

    def hparams(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.W(), self.U, self.b, x]

    def equilibrium(self, x: torch.Tensor, layer=None) -> torch.Tensor:
        z0 = x.new_zeros(x.shape[0], self.V.shape[0])
        return (layer or self.layer)([z0], self.hparams(x))[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.equilibrium(x) @ self.A.T + self.c


def accuracy(model: DEQ, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.logits(X).argmax(1) == y).double().mean().item()


def make_layer(solver: str, args, maxiter: int) -> hg.FixedPointLayer:
    return hg.FixedPointLayer(fp_map, solver=solver, maxiter=maxiter, rtol=args.rtol,
                              solver_options={"memory": args.memory, "batched": True} if solver == "anderson" else None,
                              backward_solver="gmres", backward_maxiter=args.backward_maxiter,
                              backward_rtol=args.backward_rtol, warm_start=True)


def compare_solvers(model: DEQ, X: torch.Tensor, args) -> Dict:
    """Iterations of plain fixed-point iteration and of Anderson to the same tolerance, on one batch."""
    out = {}
    for solver, maxiter in (("fixed_point", args.fixed_point_maxiter), ("anderson", args.maxiter)):
        layer = make_layer(solver, args, maxiter)
        t0 = time.perf_counter()
        with torch.no_grad():
            z = model.equilibrium(X, layer)
        info = layer.forward_info
        out[solver] = dict(iterations=info.iterations, residual=info.residual, converged=info.converged,
                           relative_residual=info.residual / float(z.norm()), seconds=time.perf_counter() - t0,
                           residuals=info.residuals, z=z)
    zf, za = out["fixed_point"].pop("z"), out["anderson"].pop("z")
    out["max_abs_diff"] = float((zf - za).abs().max())
    out["batch"] = X.shape[0]
    return out


# ------------------------------------------------------------------------------------------------- train
def train(data, args, bar=None):
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    model = DEQ(args.hidden, g, dtype, make_layer("anderson", args, args.maxiter), args.contraction)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    Xtr, ytr, Xte, yte = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    n = len(ytr)
    history = [dict(epoch=0, train_acc=accuracy(model, Xtr, ytr), test_acc=accuracy(model, Xte, yte), seconds=0.0,
                    loss=float("nan"), fwd_its=float("nan"), bwd_its=float("nan"))]
    steps, step = [], 0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=g)
        t0, losses = time.perf_counter(), []
        first = len(steps)
        for i in range(0, n, args.batch_size):
            if args.max_steps is not None and step >= args.max_steps:
                break
            idx = perm[i:i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model.logits(Xtr[idx]), ytr[idx])
            loss.backward()  # the adjoint solve (GMRES) runs here
            opt.step()
            fi, bi = model.layer.forward_info, model.layer.backward_info
            steps.append(dict(step=step + 1, epoch=epoch, loss=float(loss.detach()), fwd_its=fi.iterations,
                              fwd_residual=fi.residual, fwd_converged=fi.converged, bwd_its=bi.iterations,
                              bwd_residual=float(bi.residual), bwd_converged=bool(bi.converged)))
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", fwd=fi.iterations, bwd=bi.iterations)
        seconds = time.perf_counter() - t0
        mine = steps[first:]
        if not mine:
            break
        history.append(dict(epoch=epoch, train_acc=accuracy(model, Xtr, ytr), test_acc=accuracy(model, Xte, yte),
                            seconds=seconds, loss=sum(losses) / len(losses),
                            fwd_its=sum(s["fwd_its"] for s in mine) / len(mine),
                            bwd_its=sum(s["bwd_its"] for s in mine) / len(mine)))
    return model, history, steps


# -------------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64, help="size of the equilibrium state z")
    ap.add_argument("--contraction", type=float, default=0.9, help="bound on ||W||_2, in (0, 1)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01, help="Adam step size")
    ap.add_argument("--n-test", type=int, default=497, help="test digits (the other 1797 - n are for training)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    ap.add_argument("--rtol", type=float, help="forward tolerance ||Phi(z) - z|| <= rtol ||z|| "
                    "(default 1e-8 in float64, 1e-4 in float32)")
    ap.add_argument("--backward-rtol", type=float, help="adjoint (GMRES) relative tolerance (default: as --rtol)")
    ap.add_argument("--maxiter", type=int, default=200, help="Anderson iterations (at most)")
    ap.add_argument("--memory", type=int, default=5, help="Anderson memory")
    ap.add_argument("--backward-maxiter", type=int, default=200, help="GMRES iterations (at most)")
    ap.add_argument("--fixed-point-maxiter", type=int, default=5000,
                    help="plain fixed-point iterations (at most) in the solver comparison")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (small tensors: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="a few steps (seconds; for CI)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.max_steps = min(args.epochs, 2), args.max_steps or 15
    if args.rtol is None:
        args.rtol = 1e-8 if args.dtype == "float64" else 1e-4
    if args.backward_rtol is None:
        args.backward_rtol = args.rtol
    for key in ("epochs", "hidden", "batch_size", "maxiter", "memory", "backward_maxiter", "fixed_point_maxiter",
                "threads"):
        if getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if args.max_steps is not None and args.max_steps <= 0:
        ap.error(f"--max-steps must be a positive integer, got {args.max_steps}")
    for key in ("lr", "rtol", "backward_rtol"):
        if not getattr(args, key) > 0:
            ap.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not 0 < args.contraction < 1:
        ap.error(f"--contraction must lie in (0, 1), got {args.contraction}")
    if not 0 < args.n_test < 1797:
        ap.error(f"--n-test must lie in (0, 1797), got {args.n_test}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_data(args.n_test, args.seed, DTYPES[args.dtype])
    n_train = len(data["y_train"])
    per_epoch = math.ceil(n_train / args.batch_size)
    total = per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, per_epoch * args.epochs)
    versions = dict(torch=torch.__version__, hypergrad=hg.__version__, python=platform.python_version(),
                    seed=args.seed, threads=torch.get_num_threads())
    print(f"DEQ on digits: {n_train} train, {args.n_test} test; hidden {args.hidden}, batch {args.batch_size}, "
          f"{args.epochs} epochs ({total} steps), {args.dtype}, rtol {args.rtol:g} forward (Anderson, memory "
          f"{args.memory}), {args.backward_rtol:g} backward (GMRES); " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    t0 = time.perf_counter()
    with tqdm(total=total, desc="DEQ training", file=sys.stderr, disable=None) as bar:
        model, history, steps = train(data, args, bar)
    train_seconds = time.perf_counter() - t0
    batch = data["X_test"][:args.batch_size]
    comparison = compare_solvers(model, batch, args)
    print_report(history, steps, comparison, args)
    result = dict(history=history, steps=steps, comparison=comparison, train_seconds=train_seconds,
                  test_acc=history[-1]["test_acc"], train_acc=history[-1]["train_acc"], model=model)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "deq_digits.json"), "w") as fh:
        json.dump(dict(versions=versions, args=vars(args), train_seconds=train_seconds, history=history, steps=steps,
                       comparison=comparison), fh, indent=1)
    plot(history, steps, comparison, os.path.join(args.out, "deq_digits.png"))
    return result


def print_report(history, steps, comparison, args):
    head = f"{'epoch':>5s} {'loss':>8s} {'train acc':>10s} {'test acc':>9s} {'fwd its':>8s} {'bwd its':>8s} {'s/epoch':>8s}"
    print(head + "\n" + "-" * len(head))
    for h in history:
        loss = "" if math.isnan(h["loss"]) else f"{h['loss']:.4f}"
        its = ("", "") if h["epoch"] == 0 else (f"{h['fwd_its']:.1f}", f"{h['bwd_its']:.1f}")
        print(f"{h['epoch']:5d} {loss:>8s} {100 * h['train_acc']:9.2f}% {100 * h['test_acc']:8.2f}% {its[0]:>8s} "
              f"{its[1]:>8s} {h['seconds']:8.2f}")
    print("fwd its: mean Anderson iterations per step; bwd its: mean GMRES iterations of the adjoint solve per step")
    ok_f = sum(s["fwd_converged"] for s in steps)
    ok_b = sum(s["bwd_converged"] for s in steps)
    print(f"{ok_f}/{len(steps)} forward and {ok_b}/{len(steps)} adjoint solves converged")
    fp, an = comparison["fixed_point"], comparison["anderson"]
    print(f"\nat the trained model, one test batch of {comparison['batch']}, to ||Phi(z) - z|| <= {args.rtol:g} ||z||:")
    for name, r in (("fixed_point", fp), ("anderson", an)):
        print(f"  {name:12s} {r['iterations']:5d} iterations, relative residual {r['relative_residual']:.1e}, "
              f"{1000 * r['seconds']:7.1f} ms{'' if r['converged'] else ' (NOT converged)'}")
    print(f"  Anderson: {fp['iterations'] / max(an['iterations'], 1):.1f}x fewer iterations; "
          f"max |z_fixed_point - z_anderson| = {comparison['max_abs_diff']:.1e}")


def plot(history, steps, comparison, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = [h["epoch"] for h in history]
    ax[0].plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax[0].plot(ep, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax[0].set(xlabel="epoch", ylabel="accuracy (%)", title="DEQ on digits")
    ax[0].legend()
    st = [s["step"] for s in steps]
    ax[1].plot(st, [s["fwd_its"] for s in steps], label="forward (Anderson)")
    ax[1].plot(st, [s["bwd_its"] for s in steps], label="adjoint (GMRES)")
    ax[1].set(xlabel="optimizer step", ylabel="iterations", title="solver iterations per step")
    ax[1].legend()
    for name in ("fixed_point", "anderson"):
        r = comparison[name]
        ax[2].semilogy(r["residuals"], label=f"{name} ({r['iterations']} its)")
    ax[2].set(xlabel="iteration", ylabel="||Phi(z) - z||", title="forward solve at the trained model")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
