"""BVFIM: value-function interior-point method (Liu et al., ICML 2021). No Hessian- or Jacobian-vector
products anywhere: only gradients of f and F.

With mu1 = z_l2_reg, theta = y_l2_reg, tau = y_ln_reg and mu2 > 0:

1. z-loop, T_z steps:  z <- z - s_z grad_z [f(x, z) + mu1/2 ||z||^2];
   value  f*_mu(x) = f(x, z) + mu1/2 ||z||^2 + mu2.
2. y-loop, T_y steps on the barrier problem  psi(y) = F(x, y) + theta/2 ||y||^2 - tau ln s(y),
   s(y) = f*_mu(x) - f(x, y), keeping the slack s > 0 (an infeasible start restarts from z, where s =
   mu1/2 ||z||^2 + mu2 > 0). Step t is y + eta_t d, d the rule's step (gradient descent: -s_y grad psi) and
   eta_t in (0, 1] carried over: the first trial is eta_{t-1} (times ``ETA_GROWTH`` = 2, at most 1, after a
   step accepted at its first trial; eta_{-1} = 1). A trial is accepted when s > 0 and psi does not increase
   beyond its rounding error (when the change of psi is within roundoff, progress is judged by a smaller
   gradient norm instead); a rejected trial is shrunk by a factor in [0.1, 0.5]: the minimizer of the
   parabola through psi(0), psi'(0) = grad psi . d and psi(eta), or, when infeasible, where the concave
   model s - b eta^2 through s(eta) reaches s / 2 (else a halving). After ``max_backtracks``
   rejections y stays where it is, the step counts as a stall and the y-loop ends. A momentum rule whose step
   points uphill (grad psi . d >= 0) has its momentum reset for that step (an adaptive restart); a step that
   still does not descend (weight decay, maximize) is tried from eta = 1. Why carried over: the
   barrier's curvature (tau/s) grad^2 f + (tau/s^2) grad f grad f^T is often 10-100 times f's, for which s_y
   is set, so the scale of eta is found once rather than by halving at every step. The monotone rule keeps
   y from jumping to a far basin of a periodic f through one huge barrier step.
3. Upper gradient (Danskin on both value functions, d/dx of F(x, y) - tau ln(f*_mu(x) - f(x, y))):
       grad_x F(x, y) + tau (grad_x f(x, y) - grad_x f(x, z)) / (f*_mu(x) - f(x, y)),
   from the graphs of the y-loop's last accepted point and of f(x, z): no evaluation of f or F of its own.
4. The regularization (mu1, mu2, theta, tau) is divided by ``reg_decay`` >= 1, growing with the outer
   iterations. Adding a constant to f changes nothing: only differences of f enter, and the slack is
   computed as (f(x, z) - f(x, y)) + (mu1/2 ||z||^2 + mu2) so no rounding at the scale of f is added.

Precision: psi's rounding error is estimated as eps of the dtype times the magnitudes in psi (the slack's
error amplified by tau / slack); below it the acceptance test compares gradient norms, so float32
neither stalls on noise nor oscillates within it. Where the dtype cannot resolve the slack at all
(eps |f| > ``slack_rtol`` * slack, e.g. f ~ 1e6 in float32) the result would be noise and
[`SlackResolutionError`][methods.SlackResolutionError] is raised. A diverging z-loop (z_lr too large) raises
[`hypergrad.DivergenceError`][hypergrad.DivergenceError].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from hypergrad import update_tensor_grads
from hypergrad.errors import HypergradError, NonFiniteError
from hypergrad.tensor_list import assert_finite

from ._lower import Loss, SGDRule, check_int, check_lower, descend, fp_residual, grads_of, raise_if_nonfinite, \
    sq_norm, step_name
from .base import BilevelSolver, Objective, Result


class SlackResolutionError(HypergradError, ArithmeticError):
    """The dtype cannot resolve the slack ``f*_mu - f(x, y)`` (|f| much larger than slack / eps)."""


@dataclass
class BVFIMResult(Result):
    """The result of [`bvfim_hypergradient`][methods.bvfim_hypergradient]: a [`Result`][methods.Result] and more.

    Plus ``z`` (the regularized lower solution), ``slack`` = ``f*_mu - f(x, y)`` > 0 at the returned y,
    ``f_star`` = ``f*_mu(x)``, the y-loop's last gradient norm ``y_grad_norm``, the number of ``restarts``
    from z, of ``backtracks`` (rejected trial steps) and ``stalls``, ``f_evals`` (evaluations of f in the
    call: T_z + T_y + 2 + ``backtracks`` + ``restarts`` when no step stalls), the last accepted step
    fraction ``eta``, ``momentum_restarts`` (steps whose momentum pointed uphill on psi and was reset), and
    the regularization used (mu1, mu2, theta, tau).
    ``lower_grad_norm`` and ``fp_residual`` are the z-loop's last gradient norm and step ||z_T - z_{T-1}||;
    ``y_fp_residual`` is the y-loop's last undamped step ||Phi(y) - y|| (before backtracking)."""
    z: List[Tensor]
    slack: float
    f_star: float
    y_grad_norm: float
    y_fp_residual: float
    y_fp_residual_rel: float
    restarts: int
    backtracks: int
    stalls: int
    f_evals: int
    eta: float
    momentum_restarts: int
    mu1: float
    mu2: float
    theta: float
    tau: float


# the y-step rule: the fraction eta of the rule's step carries over from step to step, times ETA_GROWTH (at most 1)
# after a step accepted at its first trial; a rejected trial is shrunk by a factor in [SHRINK_MIN, SHRINK_MAX]
ETA_GROWTH, SHRINK_MIN, SHRINK_MAX = 2.0, 0.1, 0.5


def _shrink(change: Optional[float], tol: float, eta: float, slope: float, slack: float, cand_slack: float) -> float:
    """The factor for the next trial after rejecting the trial at fraction ``eta`` (psi's change ``change``,
    None if infeasible, within roundoff ``tol``; ``slope`` = d psi / d eta at 0; slacks at 0 and at ``eta``)."""
    if change is None:  # infeasible: the concave model s(e) = s - b e^2 through the trial, aiming at s / 2
        q = math.sqrt(slack / (2 * (slack - cand_slack))) if slack > cand_slack else 0.5  # (NaN: 0.5)
    elif abs(change) <= tol or slope >= 0:  # roundoff, or not a descent direction: no model
        q = 0.5
    else:  # the minimizer of the parabola through psi(0), psi'(0) and psi(eta)
        curv = change - slope * eta
        q = -slope * eta / (2 * curv) if curv > 0 else 0.5
    return min(SHRINK_MAX, max(SHRINK_MIN, q)) if q == q else 0.5


def _rule_step(rule: SGDRule, y: List[Tensor], g: List[Tensor], state):
    """The rule's step from y: (Phi(y), the new state, d = Phi(y) - y, grad psi . d as a tensor)."""
    with torch.no_grad():
        new, state = rule.step(y, g, state)
        step = [n - w for w, n in zip(y, new)]
        return new, state, step, sum((gi * di).sum() for gi, di in zip(g, step))


def _positive(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, "
                         f"got {value!r}")
    return float(value)


def bvfim_hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], inner_loss: Loss, outer_loss: Loss,
                        *, z_loop: int = 10, y_loop: int = 10, z_lr: float = 0.1, y_lr: float = 0.1,
                        mu1: float = 0.1, theta: float = 0.01, tau: float = 10.0, mu2: float = 1.0,
                        z0: Optional[Sequence[Tensor]] = None, z_rule: Optional[SGDRule] = None,
                        y_rule: Optional[SGDRule] = None, max_backtracks: int = 30, slack_rtol: float = 1e-3,
                        set_grad: bool = True) -> BVFIMResult:
    """One BVFIM upper gradient: a z-loop, a barrier y-loop, then Danskin's gradient; no second derivatives.

    The z-loop descends f(x, z) + mu1/2 ||z||^2 (value ``f*_mu(x) = f(x, z) + mu1/2 ||z||^2 + mu2``), the
    y-loop descends psi(y) = F(x, y) + theta/2 ||y||^2 - tau ln s(y) with the slack s(y) = ``f*_mu(x) - f(x, y)``
    kept > 0 (backtracking), and the upper gradient is
    grad_x F(x, y) + tau (grad_x f(x, y) - grad_x f(x, z)) / s(y) (the full description: the docstring of the
    module ``methods.bvfim``).

    Args:
        params: the start of the y-loop (not modified).
        hparams: the upper variables x.
        inner_loss: f(params, hparams).
        outer_loss: F(params, hparams).
        z_loop: the z-loop's steps T_z.
        y_loop: the y-loop's steps T_y.
        z_lr: the z-loop's step size (plain gradient descent).
        y_lr: the y-loop's step size (plain gradient descent).
        mu1: the z-loop's l2 regularization.
        theta: the y-loop's l2 regularization.
        tau: the weight of the log barrier.
        mu2: the constant added to the value function (> 0: a positive slack at z).
        z0: the start of the z-loop (default: ``params``; not modified).
        z_rule: the z-loop's update rule, instead of gradient descent with ``z_lr``.
        y_rule: the y-loop's update rule, instead of gradient descent with ``y_lr``.
        max_backtracks: the rejected trials of a y-step after which the y-loop stops (a stall).
        slack_rtol: the largest relative rounding error of the slack
            (``eps * (|f(x, z)| + |f(x, y)|) / slack``, eps of the dtype) accepted before
            [`SlackResolutionError`][methods.SlackResolutionError] is raised.
        set_grad: add the gradients to ``hparam.grad``.
    """
    check_int(z_loop, "lower_loop (z-loop length)", 1)
    check_int(y_loop, "y_loop", 1)
    check_int(max_backtracks, "max_backtracks", 0)
    mu1, theta, tau = _positive(mu1, "z_l2_reg (mu1)", True), _positive(theta, "y_l2_reg (theta)", True), \
        _positive(tau, "y_ln_reg (tau)")
    mu2, slack_rtol = _positive(mu2, "mu2"), _positive(slack_rtol, "slack_rtol")
    hparams, params = list(hparams), [p.detach() for p in params]
    z_rule = SGDRule.plain(z_lr, len(params)) if z_rule is None else z_rule
    y_rule = SGDRule.plain(y_lr, len(params)) if y_rule is None else y_rule
    xd = hparams  # the loops never differentiate w.r.t. x (autograd.grad w.r.t. the iterate only)
    eps = torch.finfo(params[0].dtype).eps

    n_f = [0]  # evaluations of f, for the diagnostics

    def f_of(y, x):
        n_f[0] += 1
        return inner_loss(y, x)

    # 1. z-loop on the regularized lower problem
    z_losses: List[Tensor] = []

    def z_grad(z, t, create_graph):
        loss = f_of(z, xd) + 0.5 * mu1 * sq_norm(z)
        z_losses.append(loss.detach())
        return grads_of(loss, z)

    start_z = params if z0 is None else [w.detach() for w in z0]
    z, _, z_norms, z_prev = descend(start_z, z_grad, z_rule, range(z_loop), track=False)
    check_lower(z_losses, z_norms, step_name("z_lr", z_rule), "the z-loop")
    z = [w.detach() for w in z]
    with torch.enable_grad():
        f_zx = f_of(z, xd).reshape(())  # with its graph to x: grad_x f(x, z) of the upper gradient
    f_z = f_zx.detach()
    with torch.no_grad():
        reg = 0.5 * mu1 * sq_norm(z) + mu2  # f*_mu = f_z + reg; the slack is (f_z - f(y)) + reg, in that order
    raise_if_nonfinite([f_z, reg], "the value f(x, z) + mu1/2 |z|^2", "z step")
    grad_fz = grads_of(f_zx, hparams) if f_zx.requires_grad else [torch.zeros_like(h) for h in hparams]
    del f_zx

    # 2. y-loop on the barrier problem, strictly inside {f(x, y) < f*_mu}, never increasing psi beyond roundoff
    def psi_at(y):
        """Leaves for y, psi(y) (with graph; None if infeasible), the slack (a float), psi's rounding error
        (eps times the magnitudes summed in psi, the slack's error eps (|f_z| + |f(y)|) amplified by tau /
        slack) and (F(x, y), f(x, y), slack) with their graphs to x, for the upper gradient."""
        y = [w.detach().requires_grad_(True) for w in y]
        with torch.enable_grad():
            f_y = f_of(y, xd).reshape(())
            s = (f_z - f_y) + reg
            s_val = float(s.detach())
            if not s_val > 0:  # also catches NaN
                return y, None, s_val, None, None
            F_y, ry = outer_loss(y, xd).reshape(()), 0.5 * theta * sq_norm(y)
            psi = F_y + ry - tau * torch.log(s)
        with torch.no_grad():
            noise = 8 * eps * (F_y.abs() + ry + tau * torch.log(s).abs() + tau * (f_z.abs() + f_y.abs() + reg) / s)
        return y, psi, s_val, noise, (F_y, f_y, s)

    def grad_at(y, psi):
        with torch.enable_grad():  # the graph is kept: the accepted point's serves the upper gradient
            return grads_of(psi, y, retain_graph=True)

    restarts = backtracks = stalls = restarts_m = 0
    y, psi, s_cur, noise, parts = psi_at(params)
    if psi is None:
        restarts += 1
        y, psi, s_cur, noise, parts = psi_at(z)
        if psi is None:  # the slack at z is reg > 0 up to f's own nondeterminism
            raise NonFiniteError(f"BVFIM: the slack is {s_cur:.3e} at z itself (f(x, z) is not reproducible?)")
    g = grad_at(y, psi)
    state = y_rule.init(y)
    y_norm = torch.sqrt(sq_norm(g))
    y_prev, y_phi = [w.detach() for w in y], [w.detach() for w in y]
    eta, grow = 1.0, False
    for t in range(y_loop):
        y_norm = torch.sqrt(sq_norm(g))
        y_prev = [w.detach() for w in y]
        new, state, step, slope = _rule_step(y_rule, y_prev, g, state)
        psi_v, norm_v, slope_v = torch.stack([psi.detach(), y_norm, slope]).tolist()  # one read
        if not all(math.isfinite(v) for v in (psi_v, norm_v, slope_v)):
            raise NonFiniteError(f"BVFIM y-loop: the barrier objective or its gradient is NaN or Inf at y step {t}")
        if slope_v >= 0 and any(b is not None for b in state):  # momentum pointing uphill: restart it
            new, state, step, slope = _rule_step(y_rule, y_prev, g, y_rule.init(y_prev))
            slope_v = float(slope)
            restarts_m += 1
        y_phi = new
        # not a descent direction (weight decay, maximize): no short step can help, the trials start at 1
        trial = 1.0 if slope_v >= 0 else min(1.0, ETA_GROWTH * eta) if grow else eta
        for k in range(max_backtracks + 1):
            cand = [w + trial * d for w, d in zip(y_prev, step)]
            cand, cand_psi, cand_s, cand_noise, cand_parts = psi_at(cand)
            accept, change = False, None
            if cand_psi is not None:
                change, tol = torch.stack([(cand_psi - psi).detach(), noise + cand_noise]).tolist()  # one read
                if change <= tol:
                    cand_g = grad_at(cand, cand_psi)
                    # within roundoff psi cannot tell: progress is then a smaller gradient
                    accept = change < -tol or bool(sq_norm(cand_g) < y_norm ** 2)
            if accept:
                y, psi, noise, g, s_cur, parts = cand, cand_psi, cand_noise, cand_g, cand_s, cand_parts
                if slope_v < 0:  # a non-descent step's fraction says nothing of the descent steps' scale
                    eta, grow = trial, k == 0
                break
            backtracks += 1
            trial *= _shrink(change, tol if change is not None else 0.0, trial, slope_v, s_cur, cand_s)
        else:  # no shorter step keeps y interior and makes progress: y is a minimizer to working precision
            stalls += 1
            break

    # 3. Danskin: d/dx [F(x, y) - tau ln((f(x, z) - f(x, y)) + mu1/2|z|^2 + mu2)] at fixed y, z, from the graphs
    #    of the accepted point: grad_x F + (tau / s) grad_x f(x, y) - (tau / s) grad_x f(x, z)
    y = [w.detach() for w in y]
    upper, fy, gap = parts
    with torch.enable_grad():
        w_s = (tau / gap).detach()
        total = upper + w_s * fy
        gx = grads_of(total, hparams) if total.requires_grad else [torch.zeros_like(h) for h in hparams]
    grads = [a - w_s * b for a, b in zip(gx, grad_fz)]
    gap, fy = gap.detach(), fy.detach()
    del parts, psi, g
    check_slack(gap, f_z, fy, eps, slack_rtol, y[0].dtype)
    assert_finite([upper.detach()] + grads, "the BVFIM upper loss or gradient")
    if set_grad:
        update_tensor_grads(hparams, grads)
    fp, fp_rel = fp_residual(z_prev, z)
    yfp, yfp_rel = fp_residual(y_prev, y_phi)
    return BVFIMResult(grads, y, upper.detach(), float(z_norms[-1]), fp, fp_rel, z, float(gap.detach()),
                       float(f_z + reg), float(y_norm), yfp, yfp_rel, restarts, backtracks, stalls, n_f[0], eta,
                       restarts_m, mu1, mu2, theta, tau)


def check_slack(slack: Tensor, f_z: Tensor, f_y: Tensor, eps: float, rtol: float, dtype) -> None:
    """Raise [`SlackResolutionError`][methods.SlackResolutionError] when the slack's rounding error eps (|f(x, z)| +
    |f(x, y)|) exceeds ``rtol`` times the slack: the barrier term tau grad/slack of the upper gradient would be
    noise."""
    s, a, b = torch.stack([slack, f_z, f_y]).double().cpu().tolist()
    err = eps * (abs(a) + abs(b))
    if err > rtol * s:
        raise SlackResolutionError(
            f"BVFIM: {dtype} cannot resolve the slack f*_mu - f(x, y) = {s:.3e}: f itself is ~{max(abs(a), abs(b)):.3e}, "
            f"so the slack carries a rounding error ~{err:.1e} ({err / s:.1e} relative > slack_rtol={rtol:g}) and the "
            f"upper gradient would be noise. Fix: compute in float64 (.double() the models and data), subtract a "
            f"constant from the lower objective (only differences of f matter, e.g. f - f(x, y0)), or raise mu2 "
            f"(a larger slack)")


class BVFIM(BilevelSolver):
    """Value-function interior-point method (reference: ``BVFIM``).

    Each call is one [`bvfim_hypergradient`][methods.bvfim_hypergradient]. ``lower_loop`` is the z-loop, ``y_loop`` the
    y-loop; both follow ``ll_opt``'s SGD rule (else gradient descent), with step sizes ``z_lr``/``y_lr`` (default:
    ``ll_opt``'s lr, else 0.1). The lower model holds y (and is written with the final y under ``warm_start``); z is
    kept by the solver and warm-started from its last value (first call: from y).

    ``reg_decay``: the divisor d_t >= 1 of (mu1, mu2, theta, tau) at outer iteration t (a callable of t,
    or a float r meaning d_t = r ** t); None keeps them fixed. ``compute_gradients(..., reg_decay=d)``
    overrides it for one call (the reference documentation's style).

    Args:
        upper_objective: the upper objective, ``objective(state) -> scalar tensor``.
        upper_model: the upper ``nn.Module`` (x).
        lower_objective: the lower objective, ``objective(state) -> scalar tensor``.
        z_l2_reg: mu1, the z-loop's l2 regularization.
        y_l2_reg: theta, the y-loop's l2 regularization.
        y_ln_reg: tau, the weight of the log barrier.
        ll_model: the lower ``nn.Module`` (y).
        lower_loop: the z-loop's steps.
        y_loop: the y-loop's steps.
        ll_opt: a ``torch.optim.SGD`` over the lower parameters whose rule both loops follow.
        z_lr: the z-loop's step size (default: ``ll_opt``'s lr, else 0.1).
        y_lr: the y-loop's step size (default: ``ll_opt``'s lr, else 0.1).
        mu2: the constant added to the value function (> 0).
        reg_decay: the divisor d_t of the regularization (see above; None: fixed).
        max_backtracks: the rejected trials of a y-step after which the y-loop stops.
        warm_start: write the final y into the lower model and warm-start z from its last value.
    """

    def __init__(self, upper_objective: Objective, upper_model, lower_objective: Objective,
                 z_l2_reg: float = 0.1, y_l2_reg: float = 0.01, y_ln_reg: float = 10.0, *, ll_model,
                 lower_loop: int = 10, y_loop: int = 10, ll_opt: Optional[torch.optim.Optimizer] = None,
                 z_lr: Optional[float] = None, y_lr: Optional[float] = None, mu2: float = 1.0,
                 reg_decay: Union[None, float, Callable[[int], float]] = None, max_backtracks: int = 30,
                 warm_start: bool = True):
        super().__init__(upper_objective, upper_model, lower_objective, ll_model, ll_opt=ll_opt,
                         lower_loop=lower_loop, lr=z_lr, warm_start=warm_start)
        self.y_loop = check_int(y_loop, "y_loop", 1)
        self.z_rule, self.y_rule = self.rule, self._make_rule(y_lr)
        self.mu1, self.theta = _positive(z_l2_reg, "z_l2_reg", True), _positive(y_l2_reg, "y_l2_reg", True)
        self.tau, self.mu2 = _positive(y_ln_reg, "y_ln_reg"), _positive(mu2, "mu2")
        if reg_decay is not None and not callable(reg_decay):
            rate = _positive(reg_decay, "reg_decay")
            if rate < 1:
                raise ValueError(f"reg_decay as a float is the growth rate r of the divisor r**t; need r >= 1, "
                                 f"got {rate}")
            reg_decay = (lambda r: (lambda t: r ** t))(rate)
        self.reg_decay = reg_decay
        self.max_backtracks = check_int(max_backtracks, "max_backtracks", 0)
        self._z: Optional[List[Tensor]] = None

    def decay(self, reg_decay: Optional[float] = None) -> float:
        """The divisor d_t of the regularization for the current call (``reg_decay`` overrides it)."""
        d = reg_decay if reg_decay is not None else (1.0 if self.reg_decay is None else self.reg_decay(self.iteration))
        d = _positive(d if not isinstance(d, Tensor) else float(d), "reg_decay")
        return d

    def compute_gradients(self, ul_data, ul_target, ll_data, ll_target, reg_decay: Optional[float] = None,
                          **options) -> Tensor:
        """One outer step: z-loop, y-loop, Danskin upper gradient added to the upper ``.grad``.

        ``reg_decay`` overrides the divisor of the regularization for this call, and ``options`` the keywords
        of [`bvfim_hypergradient`][methods.bvfim_hypergradient]; returns the upper loss.
        """
        inner, outer = self.losses(ul_data, ul_target, ll_data, ll_target)
        d = self.decay(reg_decay)
        kw = dict(z_loop=self.lower_loop, y_loop=self.y_loop, mu1=self.mu1 / d, theta=self.theta / d,
                  tau=self.tau / d, mu2=self.mu2 / d, z0=self._z, z_rule=self.z_rule, y_rule=self.y_rule,
                  max_backtracks=self.max_backtracks)
        kw.update(options)
        result = bvfim_hypergradient(self._params, self._hparams, inner, outer, **kw)
        if self.warm_start:
            self._z = result.z
        return self._finish(result, write_lower=self.warm_start)
