"""Data-parallel hyperparameter optimization: the data sharded across processes, the hypergradient exact.

Logistic regression on scikit-learn's breast-cancer data with one L2 weight per feature, lambda_j = e^{h_j}:

    inner:  w*(h) = argmin_w  CE(train; w) + 1/2 sum_j e^{h_j} w_j^2     (gradient steps, warm-started)
    outer:  min_h  CE(val; w*(h))                                        (hypergradient by CG, then Adam)

Launch (gloo backend, CPU, one thread per process):

    torchrun --standalone --nproc_per_node=2 examples/distributed_hpo.py
    python -m torch.distributed.run --standalone --nproc_per_node=2 examples/distributed_hpo.py --steps 2
    python examples/distributed_hpo.py          # one process: a 1-process gloo group on an in-memory store

Every rank holds the same model (an ``nn.Linear`` wrapped in ``DistributedDataParallel``, which broadcasts
rank 0's initial weights) and the same h, and 1/R of the training and validation rows. A local loss is a
*sum* over the shard divided by the global row count, so ``data_parallel(..., reduce="sum")`` turns it into
the global mean for any split (here the shards differ by a row). Each inner step all-reduces one gradient,
each CG iteration one Hessian-vector product; the hypergradient, hence Adam's update of h, is the same on
every rank. At the end rank 0 recomputes the last hypergradient in one process on all the rows, unwrapped,
and prints the relative difference: rounding only (float64), amplified by CG's conditioning to about its
tolerance (1e-10).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hypergrad as hg
from hypergrad.distributed import assert_replicated, data_parallel


def init_distributed() -> None:
    """torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) if present, else a 1-process group."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def load_data(seed: int):
    """Standardized breast-cancer rows split 60/20/20 into train/val/test (identically on every rank)."""
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = torch.tensor(X, dtype=torch.float64)[perm], torch.tensor(y, dtype=torch.float64)[perm]
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    X = (X - X[:n_tr].mean(0)) / X[:n_tr].std(0)
    return (X[:n_tr], y[:n_tr]), (X[n_tr:n_tr + n_va], y[n_tr:n_tr + n_va]), (X[n_tr + n_va:], y[n_tr + n_va:])


def my_rows(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of row indices (sizes differ by at most one)."""
    return torch.tensor_split(torch.arange(n), world)[rank]


def losses(f, train, val, n_train: int, n_val: int, wrap):
    """Inner and outer losses of the interface (params, hparams) -> scalar. ``train``/``val`` are this
    rank's rows; ``wrap`` makes the data terms global (``lambda fn: fn`` with all the rows in one process)."""
    (Xtr, ytr), (Xva, yva) = train, val

    def train_ce(params, hparams):  # this shard's share of the global mean
        return F.binary_cross_entropy_with_logits(f(params, Xtr).squeeze(1), ytr, reduction="sum") / n_train

    def val_ce(params, hparams):
        return F.binary_cross_entropy_with_logits(f(params, Xva).squeeze(1), yva, reduction="sum") / n_val

    train_ce, val_ce = wrap(train_ce), wrap(val_ce)

    def inner(params, hparams):  # the data-free penalty is the same on every rank: outside the wrapper
        return train_ce(params, hparams) + 0.5 * (torch.exp(hparams[0]) * params[0] ** 2).sum()

    return inner, val_ce


def accuracy(f, params, X, y) -> float:
    with torch.no_grad():
        return ((f(params, X).squeeze(1) > 0).to(y.dtype) == y).double().mean().item()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="outer (hyperparameter) steps")
    ap.add_argument("--inner-steps", type=int, default=100, help="gradient steps on the inner problem per outer step")
    ap.add_argument("--inner-lr", type=float, default=0.2, help="step size of the inner gradient steps")
    ap.add_argument("--K", type=int, default=30, help="maximum CG iterations of the hypergradient")
    ap.add_argument("--lr", type=float, default=0.2, help="Adam's step size on h")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("steps", "inner_steps", "K"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    (Xtr, ytr), (Xva, yva), (Xte, yte) = load_data(args.seed)  # every rank loads all (a small set), keeps its rows
    tr, va = my_rows(len(ytr), rank, world), my_rows(len(yva), rank, world)
    torch.manual_seed(args.seed + rank)  # a different init per rank on purpose: DDP broadcasts rank 0's
    model = DistributedDataParallel(nn.Linear(Xtr.shape[1], 1).to(torch.float64))
    f = hg.functional(model)  # unwraps the DDP module
    global_sum = lambda fn: data_parallel(fn, reduce="sum")  # noqa: E731
    inner, outer = losses(f, (Xtr[tr], ytr[tr]), (Xva[va], yva[va]), len(ytr), len(yva), global_sum)
    fp_map = hg.GradientDescent(inner, args.inner_lr)

    params = hg.module_params(model)
    hparams = [torch.full((1, Xtr.shape[1]), -2.0, dtype=torch.float64, requires_grad=True)]
    assert_replicated(params + hparams, name="params + hparams")
    opt = torch.optim.Adam(hparams, lr=args.lr)
    split = lambda n: [len(my_rows(n, r, world)) for r in range(world)]  # noqa: E731
    say(f"world size {world}: {len(ytr)} training rows as {split(len(ytr))}, {len(yva)} validation rows as "
        f"{split(len(yva))}")
    say(f"{'step':>4}  {'val loss':>9}  {'val acc':>7}  {'test acc':>8}  {'|hypergrad|':>11}  {'CG its':>6}")
    for step in range(args.steps):
        for _ in range(args.inner_steps):  # each step: one all-reduced gradient of the global inner loss
            params = [w.detach().requires_grad_(True) for w in fp_map(params, hparams, create_graph=False)]
        opt.zero_grad()
        res = hg.hypergradient(params, hparams, fp_map, outer, solver="cg", K=args.K)  # adds to hparams[0].grad
        val = outer(params, hparams).item()  # a collective: every rank calls it (accuracies: rank 0, all rows)
        say(f"{step:4d}  {val:9.5f}  {accuracy(f, params, Xva, yva):7.3f}  {accuracy(f, params, Xte, yte):8.3f}"
            f"  {res.grads[0].norm().item():11.3e}  {res.iterations:6d}")
        last = params, [h.detach().clone().requires_grad_(True) for h in hparams], res.grads
        opt.step()
    assert_replicated(params + hparams, name="params + hparams")
    hg.load_params(model, params)
    if rank == 0:
        say(f"hypergradient of {world} process(es) vs 1 process with all rows: relative difference "
            f"{single_process_difference(f, last, (Xtr, ytr), (Xva, yva), args):.1e}")
    dist.barrier()  # every rank tears down together: a rank leaving while rank 0 still works aborts in gloo
    dist.destroy_process_group()


def single_process_difference(f, last, train, val, args) -> float:
    """The last hypergradient recomputed at the same (params, h) in this process on all the rows, without
    any collective; returns its relative difference to the data-parallel one."""
    params, hparams, grads = last
    inner, outer = losses(f, train, val, len(train[1]), len(val[1]), lambda fn: fn)
    ref = hg.hypergradient(params, hparams, hg.GradientDescent(inner, args.inner_lr), outer, solver="cg",
                           K=args.K, set_grad=False).grads
    return float((grads[0] - ref[0]).norm() / ref[0].norm())


if __name__ == "__main__":
    main()
