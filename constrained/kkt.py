"""KKT analysis of a primal-dual pair and the KKT fixed-point map (Xu & Zhu, AAAI 2023).

At a KKT point of  min_y g  s.t.  p <= 0, q = 0  with  L = g + mu^T p + nu^T q:
grad_y L = 0, p <= 0, q = 0, mu >= 0, mu_i p_i = 0. With the active set A (mu_i > 0 = p_i) the map over
w = [y, mu_A, nu]

    Phi(w, x) = w - eta grad_w L(w, x)      (grad_{mu_A} L = p_A, grad_nu L = q)

has w* as a fixed point and  I - d_w Phi = eta K,  K = [[H, J_A^T, J_q^T], [J_A, 0, 0], [J_q, 0, 0]]
(H = grad^2_yy L): symmetric and indefinite. eta cancels from the hypergradient.

Classification is two-sided and scale-aware. Each inequality gets a *force* mu_i ||grad_y p_i|| (its
share of the stationarity balance, relative to the force scale F = max(||grad_y g||, ||J_p^T mu||,
||J_q^T nu||, max force)) and a *distance* -p_i / ||grad_y p_i|| (to its boundary in y-space, relative to
D = max(||y||_inf, median distance)): f_i and d_i, dimensionless. The point's accuracy is
delta = max(||grad_y L|| / F, violations / D, max_i min(|f_i|, |d_i|)) (the natural KKT residual; it
bounds the distance to an exact KKT point for QPs). Degenerate: |f_i| and |d_i| both <= rtol + 10 delta
(either could be 0 at the exact point; an interior-point solver leaves both ~ sqrt(gap) there);
otherwise active when f_i > d_i, else inactive. Inconsistent (an error, the pair is not a KKT point):
both above ``big`` x rtol (default 1000, i.e. 1e-3 of the scales: room for an inner solver's accuracy),
a multiplier below -rtol F, or a constraint violated by more than rtol D (atol is added to the
thresholds F rtol and D rtol).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hypergrad import tensor_list as tl

from .errors import DegenerateConstraintError, DegenerateConstraintWarning, KKTError, LICQWarning
from .problem import ConstrainedProblem

POLICIES = ("drop", "keep", "error")
DEGENERATE_FACTOR = 10.0  # degenerate: multiplier and slack both within this many x the point's accuracy


@dataclass
class KKTReport:
    """Active-set classification and KKT residuals at a primal-dual pair.

    ``active``/``inactive``/``degenerate``: indices into the inequalities (after the policy, a
    degenerate index is also in ``active`` ("keep") or ``inactive`` ("drop")). Residuals are absolute
    except ``stationarity_rel`` = ||grad_y L|| / (||grad_y g|| + ||J_p^T mu|| + ||J_q^T nu||). ``accuracy`` is
    the point's natural KKT residual delta (see the docstring of the module [`constrained.kkt`][constrained.kkt]);
    ``tau_mu``/``tau_slack`` the force and distance below which a constraint's multiplier and slack count as ~0 (both:
    degenerate).
    """
    n_ineq: int
    n_eq: int
    active: Tensor
    inactive: Tensor
    degenerate: Tensor
    policy: str
    licq: bool
    rank: int
    stationarity: float
    stationarity_rel: float
    primal_feasibility: float
    complementarity: float
    dual_feasibility: float
    tau_mu: float
    tau_slack: float
    notes: List[str] = field(default_factory=list)
    accuracy: float = 0.0

    def summary(self) -> str:
        """A one-line account: active/degenerate counts, LICQ, and the residuals and accuracy."""
        return (f"{len(self.active)}/{self.n_ineq} active inequalities, {self.n_eq} equalities, "
                f"{len(self.degenerate)} degenerate ({self.policy}), LICQ {'holds' if self.licq else 'FAILS'}; "
                f"stationarity {self.stationarity:.2e} (rel {self.stationarity_rel:.2e}), feasibility "
                f"{self.primal_feasibility:.2e}, complementarity {self.complementarity:.2e}, "
                f"accuracy {self.accuracy:.2e}")


@dataclass
class KKTMap:
    """The KKT fixed-point map of [`kkt_map`][constrained.kkt_map], with its fixed point and report.

    ``fp_map(w, hparams)`` is Phi, ``w = params + [mu_A] + [nu]`` its fixed point and ``report`` the
    [`KKTReport`][constrained.KKTReport]; ``J`` is the Jacobian of [p_A; q] w.r.t. the flattened params there.
    """
    fp_map: Callable[[List[Tensor], List[Tensor]], List[Tensor]]
    w: List[Tensor]
    report: KKTReport
    n_params: int
    mu: Optional[Tensor]  # the given multipliers (all of them), detached
    problem: ConstrainedProblem
    eta: float
    J: Tensor  # the Jacobian of [p_A; q] w.r.t. the flattened params, at this point

    def lagrangian(self, w: Sequence[Tensor], hparams: Sequence[Tensor]) -> Tensor:
        """L(w, x) = g + mu_A^T p_A + nu^T q over w = params + [mu_A] + [nu]."""
        y, mu_a, nu = self.unpack(w)
        return self.problem.lagrangian(y, hparams, mu_a, nu, index=self.report.active)

    def unpack(self, w: Sequence[Tensor]) -> Tuple[List[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Split a w-shaped list into (params, mu_A or None, nu or None)."""
        w = list(w)
        i = self.n_params
        mu_a = w[i] if len(self.report.active) > 0 else None
        nu = w[-1] if self.report.n_eq > 0 else None
        return w[:i], mu_a, nu

    def full_mu(self, mu_active: Optional[Tensor]) -> Optional[Tensor]:
        """All multipliers: the given (constant) values, with the active ones taken from ``mu_active``."""
        if self.mu is None:
            return None
        if mu_active is None:
            return self.mu
        return self.mu.index_put((self.report.active,), mu_active)


def jacobian(fn: Callable[[List[Tensor]], Optional[Tensor]], inputs: Sequence[Tensor]) -> Tensor:
    """d fn(inputs) / d inputs as a (len(out), total numel) matrix: ``torch.func.jacrev`` on the flattened
    inputs (vectorized), or one autograd VJP per row when ``fn`` does not support ``torch.func``."""
    flat = tl.flatten([t.detach() for t in inputs])
    with torch.no_grad():
        out = fn([t.detach() for t in inputs])
    if out is None or out.numel() == 0:
        return torch.zeros(0, flat.numel(), dtype=flat.dtype, device=flat.device)
    try:
        return torch.func.jacrev(lambda v: fn(tl.unflatten(v, inputs)))(flat).reshape(out.numel(), -1)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        pass
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(leaves)
        eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return torch.stack([tl.flatten(tl.grad_or_zeros(out, leaves, grad_outputs=e)) for e in eye])


def numerical_rank(J: Tensor, rcond: float = 1e-6) -> int:
    """Number of singular values of J (r x n, r rows) above rcond * the largest, from the eigenvalues of
    the r x r Gram matrix J J^T (cheaper than an SVD; resolves sigma_min / sigma_max down to ~1e-7)."""
    if J.shape[0] == 0:
        return 0
    ev = torch.linalg.eigvalsh(J @ J.T)
    return int((ev > (rcond ** 2) * float(ev.max().clamp(min=0))).sum()) if float(ev.max()) > 0 else 0


def _check_multipliers(name: str, given: Optional[Tensor], count: int, like: Tensor, what: str) -> Optional[Tensor]:
    """A detached copy of ``given`` checked against the number of constraints (None when count == 0)."""
    if count == 0:
        if given is not None and given.numel() > 0:
            raise ValueError(f"{name} has {given.numel()} entries but the problem has no {what} constraints")
        return None
    if given is None:
        raise ValueError(f"the problem has {count} {what} constraints: pass {name} with one multiplier each")
    if not isinstance(given, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(given).__name__}")
    if given.shape != (count,):
        raise ValueError(f"{name} has shape {tuple(given.shape)} but the problem has {count} {what} "
                         f"constraints: expected ({count},)")
    if given.dtype != like.dtype or given.device != like.device:
        raise TypeError(f"{name} is {given.dtype} on {given.device} but params are {like.dtype} on {like.device}")
    if not bool(torch.isfinite(given).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return given.detach().clone()


def _list_bad(mask: Tensor, values: Tensor, label: str) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(f"{i} ({float(values[i]):.3e})" for i in idx[:8])
    return f"{label} at {len(idx)} constraint(s): {shown}{' ...' if len(idx) > 8 else ''}"


def accuracy(stat: float, feas_dist: float, force: Tensor, dist: Tensor, F: float, D: float) -> float:
    """delta = max(||grad_y L|| / F, max violation distance / D, max_i min(|f_i|, |d_i|)) with f = force / F,
    d = dist / D: the natural KKT residual of the point, dimensionless (its distance to an exact KKT point
    is O(delta) for a QP, strictly complementary or not)."""
    F, D = (F if F > 0 else 1.0), (D if D > 0 else 1.0)
    nat = float(torch.minimum(force.abs() / F, dist.abs() / D).max()) if force.numel() else 0.0
    return max(stat / F, feas_dist / D, nat)


def analyze(problem: ConstrainedProblem, params: Sequence[Tensor], hparams: Sequence[Tensor],
            mu: Optional[Tensor] = None, nu: Optional[Tensor] = None, *, degenerate: str = "drop",
            rtol: float = 1e-6, atol: float = 1e-12, kkt_tol: Optional[float] = 1e-5,
            warn: bool = True) -> Tuple[KKTReport, Optional[Tensor], Optional[Tensor]]:
    """Classify the inequalities and measure the KKT residuals at (params, mu, nu) for given hparams.

    Returns the report and detached copies of mu and nu. Raises [`KKTError`][constrained.KKTError] when the
    pair is not a KKT point (relative stationarity residual above ``kkt_tol``, a violated constraint, a
    negative multiplier, or a constraint with multiplier and slack both large), and
    [`DegenerateConstraintError`][constrained.DegenerateConstraintError] for degenerate constraints under
    ``degenerate="error"``.

    Each inequality's multiplier is measured as a force mu_i ||grad_y p_i|| relative to the stationarity
    balance and its slack as a distance -p_i / ||grad_y p_i|| relative to the scale of y: degenerate when
    both are ~0, else active when the force dominates.

    Args:
        problem: the inner problem.
        params: the primal point y.
        hparams: the outer variables x.
        mu: one multiplier per entry of ``problem.ineq`` (all of them).
        nu: one multiplier per entry of ``problem.eq``.
        degenerate: the policy for degenerate constraints (multiplier and slack both ~0): "drop" (treated
            as inactive), "keep" (active) or "error".
        rtol: the relative threshold (of the force and distance scales) below which a multiplier or a slack
            counts as ~0 (raised by 10 x the point's accuracy for the degeneracy test); also the tolerance of a
            violated constraint or a negative multiplier.
        atol: the absolute part of those thresholds.
        kkt_tol: the largest accepted relative stationarity residual (None: not checked).
        warn: warn ([`DegenerateConstraintWarning`][constrained.DegenerateConstraintWarning],
            [`LICQWarning`][constrained.LICQWarning]) about degenerate constraints and a failed LICQ.
    """
    report, mu, nu, _ = _analyze(problem, params, hparams, mu, nu, degenerate, rtol, atol, kkt_tol, warn)
    return report, mu, nu


def _analyze(problem, params, hparams, mu, nu, degenerate, rtol, atol, kkt_tol, warn, big=1e3):
    """[`analyze`][constrained.analyze], also returning the Jacobian of [p_A; q] w.r.t. the flattened params."""
    if degenerate not in POLICIES:
        raise ValueError(f"degenerate must be one of {POLICIES}, got {degenerate!r}")
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be >= 0, got {rtol}, {atol}")
    params = tl.as_tensor_list(params, "params")
    hparams = tl.as_tensor_list(hparams, "hparams")
    if len(params) == 0:
        raise ValueError("params is empty: pass the list of inner variables")
    tl.check_same_kind(params, [f"params[{i}]" for i in range(len(params))])
    with torch.enable_grad():
        y = [t.detach().requires_grad_(True) for t in params]
        x = [h.detach() for h in hparams]
        g = problem.value(y, x)
        p, q = problem.p(y, x), problem.q(y, x)
        m, k = (0 if p is None else p.numel()), (0 if q is None else q.numel())
        mu = _check_multipliers("mu", mu, m, y[0], "inequality")
        nu = _check_multipliers("nu", nu, k, y[0], "equality")
        grad_g = tl.flatten(tl.grad_or_zeros(g, y))
    Jp, Jq = jacobian(lambda v: problem.p(v, x), y), jacobian(lambda v: problem.q(v, x), y)
    p = None if p is None else p.detach()
    q = None if q is None else q.detach()
    dt = y[0].dtype
    y_flat = tl.flatten([t.detach() for t in y])
    zero = torch.zeros(0, dtype=dt, device=y_flat.device)
    mu_v, nu_v, p_v, q_v = (zero if t is None else t for t in (mu, nu, p, q))

    # residuals
    Jp_mu, Jq_nu = Jp.T @ mu_v, Jq.T @ nu_v
    r = grad_g + Jp_mu + Jq_nu
    stat = float(torch.linalg.norm(r))
    terms = float(torch.linalg.norm(grad_g) + torch.linalg.norm(Jp_mu) + torch.linalg.norm(Jq_nu))
    stat_rel = stat / terms if terms > 0 else stat
    feas = max(float(p_v.clamp(min=0).max()) if m else 0.0, float(q_v.abs().max()) if k else 0.0)
    comp = float((mu_v * p_v).abs().max()) if m else 0.0
    dual = float((-mu_v).clamp(min=0).max()) if m else 0.0

    # scale-aware thresholds
    gp = torch.linalg.norm(Jp, dim=1)
    gp_safe = torch.where(gp > 0, gp, torch.ones_like(gp))
    force, dist = mu_v * gp, -p_v / gp_safe
    F = max(float(torch.linalg.norm(grad_g)), float(torch.linalg.norm(Jp_mu)), float(torch.linalg.norm(Jq_nu)),
            float(force.abs().max()) if m else 0.0)
    D = max(float(y_flat.abs().max()) if y_flat.numel() else 0.0, float(dist.abs().median()) if m else 0.0)
    tau_mu, tau_s = rtol * F + atol, rtol * D + atol

    problems = []
    if kkt_tol is not None and stat_rel > kkt_tol and stat > atol:
        problems.append(f"stationarity: ||grad_y L|| = {stat:.3e}, relative {stat_rel:.3e} > kkt_tol={kkt_tol:g} "
                        "(is the inner problem solved accurately, and do mu/nu follow L = g + mu^T p + nu^T q?)")
    for bad, vals, label in ((force < -tau_mu, mu_v, "negative multiplier mu_i"),
                             (dist < -tau_s, p_v, "violated inequality p_i > 0"),
                             ((force > big * tau_mu) & (dist > big * tau_s), mu_v * p_v,
                              "complementarity fails (mu_i and -p_i both large; mu_i p_i shown)")):
        if bool(bad.any()):
            problems.append(_list_bad(bad, vals, label))
    feas_dist = float((-dist).clamp(min=0).max()) if m else 0.0
    if k:
        gq = torch.linalg.norm(Jq, dim=1)
        qdist = q_v.abs() / torch.where(gq > 0, gq, torch.ones_like(gq))
        feas_dist = max(feas_dist, float(qdist.max()))
        if bool((qdist > tau_s).any()):
            problems.append(_list_bad(qdist > tau_s, q_v, "violated equality q_i != 0"))
    residuals = dict(stationarity=stat, stationarity_rel=stat_rel, primal_feasibility=feas, complementarity=comp,
                     dual_feasibility=dual)
    if problems:
        raise KKTError("not a KKT point: " + "; ".join(problems) +
                       f" [thresholds: multiplier force {tau_mu:.2e}, slack distance {tau_s:.2e}]", residuals)

    delta = accuracy(stat, feas_dist, force, dist, F, D)
    tau = rtol + DEGENERATE_FACTOR * delta
    deg_mu, deg_s = tau * F + atol, tau * D + atol
    degen = (force.abs() <= deg_mu) & (dist.abs() <= deg_s)
    active = ~degen & (force / tau_mu > dist / tau_s)
    degen_idx = torch.nonzero(degen).flatten()
    notes = []
    if len(degen_idx) > 0:
        shown = ", ".join(f"{i} (mu {float(mu_v[i]):.2e}, p {float(p_v[i]):.2e})" for i in degen_idx.tolist()[:6])
        msg = (f"{len(degen_idx)} degenerate constraint(s) (mu_i ~ 0 and p_i ~ 0: strict complementarity fails) "
               f"at indices {degen_idx.tolist()[:10]}: {shown}; both within the point's accuracy (delta "
               f"{delta:.1e}: force <= {deg_mu:.1e}, distance <= {deg_s:.1e}); the derivative is one-sided there")
        if degenerate == "error":
            raise DegenerateConstraintError(msg + "; pass degenerate='drop' or 'keep' to choose a side")
        if degenerate == "keep":
            active = active | degen
        notes.append(msg + f"; policy {degenerate!r}: treated as {'active' if degenerate == 'keep' else 'inactive'}")
        if warn:
            warnings.warn(notes[-1], DegenerateConstraintWarning, stacklevel=3)
    active_idx = torch.nonzero(active).flatten()
    inactive_idx = torch.nonzero(~active).flatten()

    J = torch.cat([Jp[active_idx], Jq], dim=0)
    rank = numerical_rank(J)
    licq = rank == J.shape[0]
    if not licq:
        notes.append(f"LICQ fails: {J.shape[0]} active/equality constraints but their gradients have rank {rank}; "
                     "the multipliers are not unique (the KKT matrix is singular): use solver='minres'")
        if warn:
            warnings.warn(notes[-1], LICQWarning, stacklevel=3)
    report = KKTReport(m, k, active_idx, inactive_idx, degen_idx, degenerate, licq, rank, stat, stat_rel, feas,
                       comp, dual, deg_mu, deg_s, notes, delta)
    return report, mu, nu, J


def kkt_map(problem: ConstrainedProblem, params: Sequence[Tensor], hparams: Sequence[Tensor],
            mu: Optional[Tensor] = None, nu: Optional[Tensor] = None, *, eta: float = 1.0,
            degenerate: str = "drop", rtol: float = 1e-6, atol: float = 1e-12,
            kkt_tol: Optional[float] = 1e-5) -> KKTMap:
    """The KKT fixed-point map Phi(w, x) = w - eta grad_w L(w, x) over w = params + [mu_A] + [nu].

    See [`analyze`][constrained.analyze] for the classification, the ``degenerate`` policy and the errors.
    ``w`` holds fresh copies (the caller's tensors are untouched).

    Args:
        problem: the inner problem.
        params: the primal solution y.
        hparams: the outer variables x.
        mu: one multiplier per entry of ``problem.ineq`` (all of them; the inactive ones are dropped here).
        nu: one multiplier per entry of ``problem.eq``.
        eta: the map's step, a positive scalar (it cancels from the hypergradient).
        degenerate: as in [`analyze`][constrained.analyze].
        rtol: as in [`analyze`][constrained.analyze].
        atol: as in [`analyze`][constrained.analyze].
        kkt_tol: as in [`analyze`][constrained.analyze].
    """
    if not (isinstance(eta, (int, float)) and eta > 0):
        raise ValueError(f"eta must be a positive scalar (only a scalar keeps I - dPhi/dw symmetric), got {eta!r}")
    report, mu, nu, J = _analyze(problem, params, hparams, mu, nu, degenerate, rtol, atol, kkt_tol, True)
    w = [t.detach().clone() for t in params]
    if len(report.active) > 0:
        w.append(mu[report.active].clone())
    if nu is not None:
        w.append(nu.clone())
    km = KKTMap(None, w, report, len(params), mu, problem, float(eta), J)

    def fp_map(w_: List[Tensor], hparams_: List[Tensor]) -> List[Tensor]:
        with torch.enable_grad():
            wg = [t if t.requires_grad else t.detach().requires_grad_(True) for t in w_]
            grads = tl.grad_or_zeros(km.lagrangian(wg, hparams_), wg, create_graph=True)
        return [t - eta * gr for t, gr in zip(wg, grads)]

    km.fp_map = fp_map
    return km
