"""Checkpointed reverse mode through a long inner trajectory: memory O(sqrt T), or O(1), in T.

The trajectory w_{t+1} = Phi_t(w_t, lambda), t < T, from w_0, and the hypergradient
d/dlambda E(w_T(lambda), lambda), by reverse accumulation:

    a_T = dE/dw_T,  g = dE/dlambda;   for t = T-1, ..., 0:   g += (dPhi_t/dlambda)^T a_{t+1},
                                                            a_t = (dPhi_t/dw)^T a_{t+1}.

Step t needs w_t. ``reverse_unroll`` keeps the graphs of all T steps and ``reverse`` keeps all T
iterates; here the forward pass keeps only the checkpoints w_0, w_L, w_2L, ... (L = ceil(T / c)) and
the backward pass walks the segments from the last, recomputing each segment's iterates from its
checkpoint without a graph, then taking one VJP per step with one step's graph alive at a time.
With c = ceil(sqrt T): about 2 sqrt(T) stored iterates, T + (T - c) map evaluations and T VJPs.
The recomputed iterates are bitwise those of the forward pass, so the result is bitwise ``reverse``'s
(the same VJPs in the same order) and ``reverse_unroll``'s up to rounding (equal in the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import HypergradError, NonFiniteError
from .hypergradients import _prepare

StepMap = Callable[[List[Tensor], List[Tensor]], List[Tensor]]
OuterLoss = Callable[[List[Tensor], List[Tensor]], Tensor]

#: relative difference above which a recomputed iterate counts as different from the stored one
RECOMPUTE_RTOL = 1e-6


class NondeterministicMapError(HypergradError):
    """Recomputing a segment of the trajectory from its checkpoint gave a different iterate."""


@dataclass
class CheckpointedResult:
    """The result of [`checkpointed_hypergradient`][hypergrad.checkpointed_hypergradient].

    ``grads`` (one per hparam); ``params`` the final iterate w_T (detached: the next outer step's
    warm start); ``adjoint`` dE/dw_0 (the gradient w.r.t. the initial iterate, for a learned
    initialization); ``checkpoints`` the steps whose iterates the forward pass kept; ``map_evals`` the
    evaluations of step maps without a graph (forward pass plus recomputation); ``vjps`` = T."""
    grads: List[Tensor]
    params: List[Tensor]
    adjoint: List[Tensor]
    checkpoints: List[int]
    map_evals: int
    vjps: int


def checkpoint_steps(T: int, checkpoints: Optional[int] = None) -> List[int]:
    """Steps 0, L, 2L, ... < T whose iterates are kept, L = ceil(T / c), c = ceil(sqrt T) by default.

    There are ceil(T / L) <= c of them (e.g. T = 10, c = 4 gives L = 3 and [0, 3, 6, 9]).

    Args:
        T: the number of inner steps (a non-negative int).
        checkpoints: c, an int in [1, max(T, 1)]; default ceil(sqrt T).

    Returns:
        The kept steps in increasing order (``[0]`` when T = 0).
    """
    _check_counts(T, checkpoints)
    if T == 0:
        return [0]
    c = math.isqrt(T - 1) + 1 if checkpoints is None else checkpoints  # ceil(sqrt T)
    return list(range(0, T, -(-T // c)))


def _check_counts(T, checkpoints) -> None:
    """T a non-negative int; checkpoints None or an int in [1, max(T, 1)]."""
    if not isinstance(T, int) or isinstance(T, bool) or T < 0:
        raise ValueError(f"T (the number of inner steps) must be a non-negative int, got {T!r}")
    if checkpoints is None:
        return
    if not isinstance(checkpoints, int) or isinstance(checkpoints, bool) or not 1 <= checkpoints <= max(T, 1):
        raise ValueError(f"checkpoints must be an int in [1, {max(T, 1)}] (at most one per step, T = {T}), "
                         f"got {checkpoints!r}")


class _Trajectory:
    """The maps Phi_t(., lambda) of one trajectory; counts the evaluations without a graph."""

    def __init__(self, step_map: Union[StepMap, Sequence[StepMap]], hparams: List[Tensor], T: int):
        if callable(step_map):
            self.maps = None
        elif isinstance(step_map, (list, tuple)) and len(step_map) == T and all(map(callable, step_map)):
            self.maps = list(step_map)
        else:
            raise TypeError(f"step_map must be a callable (params, hparams) -> params, or a list of T = {T} "
                            f"such callables (one per step); got {type(step_map).__name__}"
                            + (f" of length {len(step_map)}" if isinstance(step_map, (list, tuple)) else ""))
        self.step_map, self.hparams, self.map_evals = step_map, hparams, 0

    def mapped(self, t: int, leaves: List[Tensor]) -> List[Tensor]:
        """Phi_t(leaves, lambda), checked to be shaped like the params."""
        fn = self.step_map if self.maps is None else self.maps[t]
        what = "step_map(params, hparams)" if self.maps is None else f"step_map[{t}](params, hparams)"
        return tl.check_like(fn(leaves, self.hparams), leaves, f"{what} at step {t}")

    def step(self, t: int, w: List[Tensor]) -> List[Tensor]:
        """w_{t+1} = Phi_t(w_t, lambda), detached: the step's graph is freed at once."""
        self.map_evals += 1
        return [o.detach() for o in self.mapped(t, tl.detached_leaves(w))]

    def advance(self, w: List[Tensor], start: int, stop: int) -> List[Tensor]:
        """w_stop from w_start by stop - start steps without a graph."""
        for t in range(start, stop):
            w = self.step(t, w)
        return w

    def vjp(self, t: int, w: List[Tensor], a: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """One step back from a = a_{t+1} at w = w_t: ((dPhi_t/dw)^T a, (dPhi_t/dlambda)^T a, Phi_t(w_t))."""
        leaves = tl.detached_leaves(w)
        out = self.mapped(t, leaves)
        a_t, g_t = tl.step_vjp(out, leaves, self.hparams, a)
        return a_t, g_t, [o.detach() for o in out]


def _forward(traj: _Trajectory, w0: List[Tensor], T: int, keep_at: List[int]):
    """w_T and the iterates at ``keep_at``; raises naming the first non-finite iterate (one host sync)."""
    kept: Dict[int, List[Tensor]] = {}
    first_bad = torch.full((), T + 1, dtype=torch.long, device=w0[0].device)  # stays T + 1 while finite
    w, wanted = w0, set(keep_at)
    for t in range(T):
        if t in wanted:
            kept[t] = w
        w = traj.step(t, w)
        finite = torch.stack([torch.isfinite(x).all() for x in w]).all()
        first_bad = torch.where(finite, first_bad, first_bad.clamp(max=t + 1))
    k = int(first_bad)
    if k <= T:
        raise NonFiniteError(f"the inner trajectory has NaN or Inf: w_{k} = step_map(w_{k - 1}, hparams) at "
                             f"step {k - 1} of T = {T} is the first non-finite iterate")
    return w, kept


def _check_recomputed(got: List[Tensor], expected: List[Tensor], t: int) -> None:
    """The recomputed Phi_t(w_t) must match the iterate of the forward pass (else the map is random)."""
    diff, scale = tl.norm(tl.sub(got, expected)), tl.norm(expected)
    if not bool(diff <= RECOMPUTE_RTOL * scale):  # also catches NaN
        raise NondeterministicMapError(
            f"recomputing step {t} from its checkpoint gave w_{t + 1} differing from the forward pass by "
            f"{diff.item():.3e} (norm {scale.item():.3e}): checkpointing needs deterministic step maps. A map "
            "that draws a new minibatch per call (e.g. GradientDescent with a data iterator) must be given as a "
            "list of T maps, each bound to its own batch")


def _backward(traj: _Trajectory, kept, w_T, T: int, a: List[Tensor], g: List[Tensor], store_segments: bool):
    """Segments [s, e) from the last: recompute w_s..w_{e-1} from w_s, then one VJP per step. Returns (a_0, g)."""
    starts, expected = sorted(kept), w_T  # expected: the forward pass's w_e, to check the recomputation
    for s, e in reversed(list(zip(starts, starts[1:] + [T]))):
        w_s = kept.pop(s)
        segment = [w_s]
        if store_segments:
            for t in range(s, e - 1):
                segment.append(traj.step(t, segment[-1]))
        for t in range(e - 1, s - 1, -1):
            w_t = segment.pop() if store_segments else traj.advance(w_s, s, t)
            a, g_t, out = traj.vjp(t, w_t, a)
            g = [x + y for x, y in zip(g, g_t)]
            if t == e - 1:
                _check_recomputed(out, expected, t)
        expected = w_s
    return a, g


def _unaliased(w: List[Tensor], originals: List[Tensor]) -> List[Tensor]:
    """Copies of the tensors of ``w`` that share memory with a caller's tensor (never hand those back)."""
    ptrs = {p.untyped_storage().data_ptr() for p in originals if p.numel() > 0}
    return [x.clone() if x.numel() > 0 and x.untyped_storage().data_ptr() in ptrs else x for x in w]


def checkpointed_hypergradient(params0: Sequence[Tensor], hparams: Sequence[Tensor],
                               step_map: Union[StepMap, Sequence[StepMap]], T: int, outer_loss: OuterLoss,
                               checkpoints: Optional[int] = None, store_segments: bool = True,
                               set_grad: bool = True) -> CheckpointedResult:
    """d/dlambda E(w_T, lambda) for w_{t+1} = Phi_t(w_t, lambda), t < T, by checkpointed reverse mode.

    Equals ``reverse_unroll`` through the same T steps taken with a graph, and ``reverse`` from all
    stored iterates, with memory O(sqrt T) iterates plus one step's graph.

    Args:
        params0: the initial iterate w_0 (treated as a constant; its gradient is ``result.adjoint``).
            Never modified.
        hparams: the outer variables, each with ``requires_grad=True``.
        step_map: Phi(params, hparams) -> params (the ``fp_map`` convention, e.g. ``GradientDescent``), or
            a list of T maps [Phi_0, ..., Phi_{T-1}] for time-varying steps (step-size schedules,
            one minibatch per step). Maps must be deterministic: the backward pass evaluates each step
            again and checks the recomputed iterates against the forward pass's.
        T: the number of inner steps (0 gives dE/dlambda at w_0).
        outer_loss: E(params, hparams) -> scalar, evaluated at the final iterate w_T.
        checkpoints: the number c of iterates kept by the forward pass, in [1, T]; default ceil(sqrt T).
            Memory: c + ceil(T / c) iterates; map evaluations: T + (T - #segments) without a graph plus
            T VJPs. c = T keeps every iterate (no recomputation, like ``reverse``).
        store_segments: with False, each w_t of a segment is recomputed from the segment's checkpoint
            instead of being stored: memory c + O(1) iterates, about T * ceil(T / c) / 2 extra evaluations;
            ``checkpoints=1, store_segments=False`` is O(1) memory in T with O(T^2) recomputation.
        set_grad: add the hypergradient to ``hparam.grad`` (accumulates, like ``.backward()``).

    Second-order use (``create_graph``) is not supported: the result carries no graph.
    """
    _check_counts(T, checkpoints)
    params0, hparams = tl.check_inputs(params0, hparams, "params0")
    tl.assert_finite(params0, "params0")
    keep_at = checkpoint_steps(T, checkpoints)
    with torch.enable_grad():
        traj = _Trajectory(step_map, hparams, T)
        w_T, kept = _forward(traj, [p.detach() for p in params0], T, keep_at)
        _, _, a, g, _ = _prepare(w_T, hparams, outer_loss, False)
        a, grads = _backward(traj, kept, w_T, T, a, g, store_segments)
    tl.assert_finite(grads, "the hypergradient")
    if set_grad:
        tl.accumulate_grads(hparams, grads)
    return CheckpointedResult(grads, _unaliased(w_T, params0), a, keep_at, traj.map_evals, T)


def reverse_checkpointed(params0: Sequence[Tensor], hparams: Sequence[Tensor],
                         step_map: Union[StepMap, Sequence[StepMap]], T: int, outer_loss: OuterLoss,
                         checkpoints: Optional[int] = None, set_grad: bool = True) -> List[Tensor]:
    """Hypergradient through T steps w_{t+1} = step_map(w_t, hparams) from ``params0``, in memory O(sqrt T).

    The same numbers as ``reverse_unroll``. For the final iterate w_T and the other options see
    [`checkpointed_hypergradient`][hypergrad.checkpointed_hypergradient].

    Args:
        params0: the initial iterate w_0 (treated as a constant; never modified).
        hparams: the outer variables, each with ``requires_grad=True``.
        step_map: Phi(params, hparams) -> params, or a list of T such maps (one per step); maps must be
            deterministic (the backward pass recomputes and checks the iterates).
        T: the number of inner steps (0 gives dE/dlambda at w_0).
        outer_loss: E(params, hparams) -> scalar, evaluated at the final iterate w_T.
        checkpoints: the number of iterates the forward pass keeps, in [1, max(T, 1)]; default ceil(sqrt T).
        set_grad: add the hypergradient to ``hparam.grad`` (accumulates, like ``.backward()``).

    Returns:
        One tensor per hparam, dE(w_T, lambda)/dlambda (without a graph).
    """
    return checkpointed_hypergradient(params0, hparams, step_map, T, outer_loss, checkpoints=checkpoints,
                                      set_grad=set_grad).grads
