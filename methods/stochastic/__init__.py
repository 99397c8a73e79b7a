"""Stochastic and first-order bilevel solvers over a minibatch oracle ([`FiniteSum`][methods.stochastic.FiniteSum]).

    inner = FiniteSum(lambda y, x, idx: ridge_loss(y, x, X[idx], t[idx]), n_train, batch_size=64)
    outer = FiniteSum(lambda y, x, idx: val_loss(y, X_val[idx], t_val[idx]), n_val, batch_size=64)
    solver = SOBA(inner, outer, params=torch.zeros(d), hparams=torch.zeros(1), step_size=0.1)
    solver.run(1000)            # or solver.step() per outer iteration
    solver.hparams              # x, in the caller's shapes

One class per algorithm, each in its own module over [`StochasticSolver`][methods.stochastic.StochasticSolver];
switching method is changing the class.
"""
from .base import StochasticResult, StochasticSolver
from .oracle import Batch, FiniteSum
from .full_batch import FullBatchImplicit, FullBatchRAD
from .amigo import AmIGO
from .bome import BOME
from .f2sa import F2SA
from .mrbo import MRBO
from .saba import SABA
from .stocbio import StocBiO
from .soba import SOBA
from .srba import SRBA
from .vrbo import VRBO

__all__ = ["Batch", "FiniteSum", "StochasticResult", "StochasticSolver", "SOBA", "SABA", "SRBA", "AmIGO", "StocBiO",
           "MRBO", "VRBO", "F2SA", "BOME",
           "FullBatchImplicit", "FullBatchRAD"]
