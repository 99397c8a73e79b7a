"""The minibatch oracle: a loss that is a mean over samples, evaluated on batches of sample indices.

Convention (the one every stochastic solver and the deterministic ones speak)::

    f(params, hparams) = 1/n sum_i f_i(params, hparams),     loss(params, hparams, idx) = mean_{i in idx} f_i

``loss`` is the user's: it gets the lower and upper variables as lists of tensors (the core convention) and a
``LongTensor`` of sample indices on the data's device, and indexes its own data with it (``X[idx]``), so any
data layout works. [`FiniteSum`][methods.stochastic.FiniteSum] owns the sampling:

* the n samples are cut once into K fixed blocks of ``batch_size`` consecutive indices (the last one may be
  smaller; ``shuffle_samples=True`` cuts a fixed random permutation instead), and each epoch visits the
  blocks once in a fresh random order (``torch.Generator`` seeded by ``seed``: a twin oracle with the same
  seed draws the same batches). Blocks are what the variance-reduced methods keep memories of (SABA's table
  of per-block gradients).
* a block's estimate is scaled by K |B_k| / n, so that with uniform block sampling every estimate is
  unbiased, E_k[f_{B_k}] = f, also with an incomplete last block (the factor is exactly 1 when
  ``batch_size`` divides n).
* ``sampler=``: any iterable of index batches instead (a ``torch.utils.data.BatchSampler``, re-iterated every
  epoch); the batch mean is then taken as the estimate and batches have no block id (so no SABA).
* calling the oracle, ``f(params, hparams)``, is the full mean: it is a plain loss of the core convention,
  so the same object feeds ``hypergrad.hypergradient`` and the deterministic solvers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

BatchLoss = Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], Tensor]


@dataclass(frozen=True)
class Batch:
    """One minibatch, as [`FiniteSum.sample`][methods.stochastic.FiniteSum.sample] returns it.

    Sample indices ``idx``, its ``block`` id (None for a custom sampler or the full batch) and the ``scale``
    that makes ``scale * mean_{idx} f_i`` an unbiased estimate of f.
    """
    idx: Tensor
    block: Optional[int]
    scale: float

    @property
    def size(self) -> int:
        """The number of sample indices, ``idx.numel()``."""
        return int(self.idx.numel())


class FiniteSum:
    """f = 1/n sum_i f_i over ``n_samples`` samples, sampled in minibatches.

    The n samples are cut once into K fixed blocks of ``batch_size`` indices, and each epoch visits the blocks
    once in a fresh random order; a block's estimate is scaled by K |B_k| / n, so that every estimate is
    unbiased. Calling the oracle, ``f(params, hparams)``, gives the full mean (a loss of the core convention).

    Args:
        loss: ``loss(params, hparams, idx) -> scalar``, the mean of f_i over the indices ``idx``.
        n_samples: n.
        batch_size: samples per block (an int in [1, n], or ``"full"``: one block of all samples).
        seed: seed of the oracle's own ``torch.Generator`` (the order of blocks in each epoch).
        device: device of the index tensors (the device of the data ``loss`` indexes).
        shuffle_samples: cut the blocks from a fixed random permutation of the samples instead of in order.
        sampler: an iterable of index batches (e.g. ``torch.utils.data.BatchSampler``) to use instead of the
            blocks; ``batch_size`` is then only the size used to count oracle calls.
    """

    def __init__(self, loss: BatchLoss, n_samples: int, batch_size: Union[int, str] = 64, *, seed: int = 0,
                 device: Union[str, torch.device, None] = None, shuffle_samples: bool = False,
                 sampler: Optional[Iterable] = None):
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(params, hparams, idx), got {type(loss).__name__}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if batch_size == "full":
            batch_size = n_samples
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n_samples:
            raise ValueError(f"batch_size must be an int in [1, n_samples={n_samples}] or 'full', "
                             f"got {batch_size!r}")
        self.loss, self.n, self.batch_size = loss, n_samples, batch_size
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.generator = torch.Generator().manual_seed(int(seed))
        order = (torch.randperm(n_samples, generator=self.generator) if shuffle_samples
                 else torch.arange(n_samples))
        self.blocks = [b.to(self.device) for b in order.split(batch_size)]
        self.n_blocks = len(self.blocks)
        self._all = torch.arange(n_samples, device=self.device)
        self.sampler = sampler
        self._epoch: Iterator = iter(())
        self.samples_drawn = 0

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self) -> Batch:
        """The next minibatch: the next block of the current epoch (a new epoch draws a new order)."""
        if self.sampler is not None:
            idx = next(self._epoch, None)
            if idx is None:
                self._epoch = iter(self.sampler)
                idx = next(self._epoch, None)
                if idx is None:
                    raise ValueError("sampler yielded no batch")
            idx = torch.as_tensor(idx, device=self.device).reshape(-1)
            if idx.dtype == torch.bool:
                raise TypeError("sampler yielded a boolean mask; yield the sample indices (mask.nonzero())")
            if idx.is_floating_point() or idx.is_complex():
                raise TypeError(f"sampler yielded indices of dtype {idx.dtype}; yield integer sample indices")
            idx = idx.long()
            if idx.numel() == 0:
                raise ValueError("sampler yielded an empty batch")
            if int(idx.min()) < 0 or int(idx.max()) >= self.n:
                raise ValueError(f"sampler yielded indices outside [0, n_samples={self.n}): "
                                 f"{int(idx.min())} .. {int(idx.max())}")
            self.samples_drawn += idx.numel()
            return Batch(idx, None, 1.0)
        k = next(self._epoch, None)
        if k is None:
            self._epoch = iter(torch.randperm(self.n_blocks, generator=self.generator).tolist())
            k = next(self._epoch)
        self.samples_drawn += self.blocks[k].numel()
        return self.block(k)

    def block(self, k: int) -> Batch:
        """Block ``k`` as a [`Batch`][methods.stochastic.Batch] (its estimate scaled by K |B_k| / n)."""
        idx = self.blocks[k]
        return Batch(idx, k, self.n_blocks * idx.numel() / self.n)

    def full(self) -> Batch:
        """All n samples as one batch (the exact f)."""
        return Batch(self._all, None, 1.0)

    # -- evaluation ----------------------------------------------------------------------------------
    def value(self, params: Sequence[Tensor], hparams: Sequence[Tensor], batch: Batch) -> Tensor:
        """``batch.scale * loss(params, hparams, batch.idx)``, checked to be a real scalar."""
        out = self.loss(params, hparams, batch.idx)
        if not isinstance(out, Tensor) or out.numel() != 1 or not out.is_floating_point():
            got = (type(out).__name__ if not isinstance(out, Tensor) else
                   f"shape {tuple(out.shape)}" if out.numel() != 1 else f"dtype {out.dtype}")
            raise TypeError(f"loss(params, hparams, idx) must return a real (floating) scalar tensor, got {got}")
        out = out.reshape(())
        return out if batch.scale == 1.0 else out * batch.scale

    def __call__(self, params: Sequence[Tensor], hparams: Sequence[Tensor]) -> Tensor:
        """The full mean f(params, hparams): a loss of the core convention."""
        return self.value(params, hparams, self.full())

    def calls(self, samples: int) -> float:
        """``samples`` per-sample evaluations in units of minibatch oracle calls."""
        return samples / self.batch_size

    def __repr__(self) -> str:
        return f"FiniteSum(n={self.n}, batch_size={self.batch_size}, blocks={self.n_blocks})"

