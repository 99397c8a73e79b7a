"""SABA, the Stochastic Average Bilevel Algorithm (Dagreou, Ablin, Vaiter and Moreau, "A framework for bilevel
optimization that enables stochastic and global variance reduction algorithms", NeurIPS 2022).

SOBA's three directions (see ``methods.stochastic.soba``) with SAGA variance reduction applied to each of the five
per-batch quantities they are sums of: from the inner batch (block k of f) grad_y f_k, grad2_yy f_k v and
grad2_xy f_k v, from the outer batch (block j of F) grad_y F_j and grad_x F_j. For each quantity phi the
solver keeps a memory m_1..m_K, one row per block of its oracle (K = that oracle's ``n_blocks``), and its
running mean m_bar = 1/K sum_k m_k. At each iteration, with phi_k the quantity at the current (y, v, x) on
the sampled block k ([`FiniteSum`][methods.stochastic.FiniteSum] scales a block's estimate by K |B_k| / n, so
E_k[phi_k] = phi)::

    phi_hat = phi_k - m_k + m_bar                  (unbiased for any memory: E_k[m_k] = m_bar)
    m_bar  <- m_bar + (phi_k - m_k) / K,   m_k <- phi_k

    D_y = hat(grad_y f),   D_v = hat(grad2_yy f v) + hat(grad_y F),   D_x = hat(grad2_xy f v) + hat(grad_x F)
    y <- y - rho D_y,   v <- v - rho D_v,   x <- x - gamma D_x

with constant steps rho = ``step_size`` and gamma = rho / ``outer_ratio`` (the paper's analysis and
benchopt's benchmark_bilevel use fixed steps; they give the O(1/T) rate and, under a Polyak-Lojasiewicz
condition on h, linear convergence: all three variables' variance vanishes at the solution).

Sampling order per iteration: one block of the inner oracle, then one block of the outer oracle; all five
quantities are taken at the iterate before the update (the directions use the means before their update).

``init_memory``: ``"zero"`` (the benchmark's ``mode_init_memory`` default) starts every memory at 0;
``"full"`` fills every block's row at the starting point (params, hparams, v = 0) when the solver is built,
a full pass over both oracles counted in ``oracle_calls``; the first direction is then the full-batch one.
SABA needs the oracle's blocks (a memory row per block): an oracle with a custom ``sampler`` raises.
Memory: five [K, dim] tables (3 over the inner blocks, 2 over the outer ones), private to the solver: a step
writes one row of each in place (O(dim)); the per-step safety check watches the running means, which every
written row enters at once (a NaN in a row is a NaN in its mean).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from .base import StochasticSolver

#: the five memories: name -> (oracle, which of y / x the quantity lives on)
_QUANTITIES = {"inner_grad": ("inner", "y"), "hvp": ("inner", "y"), "cross_v": ("inner", "x"),
               "grad_in_outer": ("outer", "y"), "grad_out_outer": ("outer", "x")}


class SABA(StochasticSolver):
    """SABA (Dagreou et al., NeurIPS 2022): SOBA's directions with SAGA variance reduction of their five terms.

    Each per-batch term phi_k (block k) enters as phi_k - m_k + m_bar, m_k its memory of block k and m_bar the
    mean of the memories; then y <- y - rho D_y, v <- v - rho D_v, x <- x - gamma D_x with constant steps
    rho = step_size, gamma = rho / outer_ratio (the full description: the docstring of the module
    [`methods.stochastic.saba`][methods.stochastic.saba]). Needs the oracles' blocks (no custom ``sampler``).
    Defaults: step_size 0.1,
    outer_ratio 1, init_memory "zero" (the benchmark's).

    Args:
        init_memory: "zero" (every memory starts at 0) or "full" (every block's row at the starting point,
            a full pass over both oracles when the solver is built, counted in ``oracle_calls``).
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        memory: name -> [K, dim] table of the last value of that quantity on each block (names:
            ``inner_grad``, ``hvp``, ``cross_v`` over the inner blocks; ``grad_in_outer``, ``grad_out_outer``
            over the outer blocks).
        memory_mean: name -> the running mean of that table's rows.
    """

    name = "SABA"

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 init_memory: str = "zero", **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        if init_memory not in ("zero", "full"):
            raise ValueError(f"init_memory must be 'zero' or 'full', got {init_memory!r}")
        for o, n in ((self.inner, "inner"), (self.outer, "outer")):
            if o.sampler is not None:
                raise ValueError(f"SABA needs FiniteSum's blocks (one memory row per block), but the {n} oracle "
                                 "has a custom sampler; build it without sampler=")
        self.init_memory = init_memory
        dims = {"y": self.y.numel(), "x": self.x.numel()}
        self.memory: Dict[str, Tensor] = {
            k: self.y.new_zeros(getattr(self, o).n_blocks, dims[var]) for k, (o, var) in _QUANTITIES.items()}
        self.memory_mean: Dict[str, Tensor] = {k: m[0].clone() for k, m in self.memory.items()}
        if init_memory == "full":
            self._fill_memory()

    def _fill_memory(self) -> None:
        """Every block's row at the current (y, v, x) (a full pass over each oracle, counted)."""
        inner = [self.grad_and_products(self.y, self.x, self.v, self.inner.block(k))
                 for k in range(self.inner.n_blocks)]
        outer = [self.grad(self.outer, self.y, self.x, self.outer.block(k), "yx") for k in range(self.outer.n_blocks)]
        tables = [torch.stack(r) for r in zip(*inner)] + [torch.stack(r) for r in zip(*outer)]
        self.memory = dict(zip(_QUANTITIES, tables))
        self.memory_mean = {k: m.mean(0) for k, m in self.memory.items()}

    def _reduce(self, name: str, value: Tensor, block: int) -> Tensor:
        """The SAGA direction of ``name`` from its value on ``block``; updates that block's row and the mean."""
        table = self.memory[name]
        diff = value - table[block]
        direction = diff + self.memory_mean[name]
        self.memory_mean[name] = self.memory_mean[name] + diff / table.shape[0]
        table[block] = value           # the tables are private: one row written in place
        return direction

    def _step(self) -> None:
        rho, gamma = self.lr(self.step_size), self.lr(self.outer_step_size)
        bi, bo = self.inner.sample(), self.outer.sample()
        if bi.block is None or bo.block is None:
            raise ValueError("SABA needs FiniteSum's blocks (one memory row per block); got a batch without a "
                             "block id (a custom sampler)")
        g, hv, jv = self.grad_and_products(self.y, self.x, self.v, bi)
        gy, gx = self.grad(self.outer, self.y, self.x, bo, "yx")
        d_y = self._reduce("inner_grad", g, bi.block)
        d_v = self._reduce("hvp", hv, bi.block) + self._reduce("grad_in_outer", gy, bo.block)
        d_x = self._reduce("cross_v", jv, bi.block) + self._reduce("grad_out_outer", gx, bo.block)
        self.y = self.y - rho * d_y
        self.v = self.v - rho * d_v
        self.x = self.x - gamma * d_x

    def _state(self) -> List[Tensor]:
        return super()._state() + list(self.memory_mean.values())
