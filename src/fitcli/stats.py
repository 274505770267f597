"""Error bars and fit statistics at the final parameters; the closed-form linear optimum.

All in float64, from the same chunked ``J^T J`` and ``J^T r`` as the Levenberg-Marquardt core
(`fitcli.lm.jtj_jtr`), where ``r = w * (y - fn(theta, x))`` and J is the Jacobian of ``w * fn``:

    covariance = s^2 (J^T J)^-1,   s^2 = RSS / (n - p)   (s^2 = 1 with absolute_sigma)
    stderr_i   = sqrt(covariance_ii),   correlation_ij = cov_ij / (stderr_i stderr_j)
    R^2        = 1 - RSS / TSS,  TSS = sum(w^2 (y - ybar_w)^2),  ybar_w = sum(w^2 y) / sum(w^2)
    chi2_red   = RSS / (n - p)                              (RSS weighted when weights are given)
    AIC        = n log(RSS / n) + 2 p,   BIC = n log(RSS / n) + log(n) p     (lmfit's conventions)

These match scipy's ``curve_fit`` ``pcov`` (with ``sigma = 1/w`` and ``absolute_sigma``).

With a loss of its own (`fitcli.losses`: poisson, bce, student_t, cauchy, soft_l1, arctan) the
matrix is the observed information instead, ``H`` = the Hessian of the loss's cost at theta
(by autograd, the model's curvature included), and the step to the minimum ``H^-1 (-grad)``:

    covariance = scale H^-1                  (likelihoods: the inverse observed Fisher
                                              information; scale = f_scale^2 for student_t, else 1)
    covariance = n/(n-p) H^-1 B H^-1,  B = sum_i g_i g_i^T   (robust losses: the sandwich, g_i
                                              the gradient of point i's cost)

and chi2_red, AIC and BIC, which assume Gaussian errors, are not given (None).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fitcli.errors import RunStatus
from fitcli.lm import (
    SINGULAR_RCOND,
    HostModel,
    _jacobian_forward,
    host_eligible,
    host_ok,
    jtj_jtr,
    residual_sum_of_squares,
)
from fitcli.model import BasisModel, FitModel, model_function

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitStats:
    """Fit statistics, JSON-able: None stands for a value that does not exist (NaN, singular)."""

    n_points: int
    n_params: int
    rss: float
    r2: float
    chi2_reduced: float | None
    aic: float
    bic: float
    stderr: dict[str, float | None]
    covariance: list[list[float | None]] | None
    correlation: list[list[float | None]] | None
    status: str  # "ok" | "singular" | "at_bound" | "not_converged"
    reason: str
    condition_number: float | None  # of the column-scaled J^T J (unit diagonal), unit-free


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _matrix(m: np.ndarray, keep: list[bool]) -> list[list[float | None]]:
    rows = m.tolist()
    return [
        [v if keep[i] and keep[j] and math.isfinite(v) else None for j, v in enumerate(row)]
        for i, row in enumerate(rows)
    ]


def _names(names: Sequence[str], idx) -> str:
    return ", ".join(names[i] for i in idx)


def loss_information(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Any,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(H, -grad, B)`` of a `fitcli.losses.Loss`'s cost at theta, in float64 over chunks of
    rows: its Hessian by double backward, minus its gradient, and for the robust losses the sum
    of the points' gradient outer products (else None)."""
    from fitcli.lm import _chunks, default_chunk_size

    theta = theta.detach().to(torch.float64)
    p, n = theta.numel(), y.shape[0]
    size = chunk_size or default_chunk_size(p, theta.device)
    hess = torch.zeros(p, p, dtype=torch.float64, device=theta.device)
    grad = torch.zeros(p, dtype=torch.float64, device=theta.device)
    meat = torch.zeros(p, p, dtype=torch.float64, device=theta.device) if loss.sandwich else None
    for sl in _chunks(n, size):
        w = weights[sl] if weights is not None else None

        def model(t: torch.Tensor, sl: slice = sl, w: torch.Tensor | None = w) -> torch.Tensor:
            m = fn(t, x[sl]).reshape(-1)
            return m * w if w is not None else m

        wy = (y[sl] * w if w is not None else y[sl]).reshape(-1)
        t = theta.clone().requires_grad_()
        with torch.enable_grad():
            m = model(t)
            total = loss.cost_terms(m, wy, torch).sum()
            (g,) = torch.autograd.grad(total, t, create_graph=True)
            rows = []
            for j in range(p):
                if not g[j].requires_grad:  # the cost does not depend on theta[j] here
                    rows.append(torch.zeros_like(theta))
                    continue
                (row,) = torch.autograd.grad(g[j], t, retain_graph=True, allow_unused=True)
                rows.append(torch.zeros_like(theta) if row is None else row)
            if meat is not None:
                m2 = model(t)
                (dcdm,) = torch.autograd.grad(loss.cost_terms(m2, wy, torch).sum(), m2)
        hess += torch.stack(rows).detach()
        grad -= g.detach()
        if meat is not None:
            jac, _ = _jacobian_forward(model, theta)
            gi = jac.to(torch.float64) * dcdm.detach()[:, None]
            meat += gi.T @ gi
    return 0.5 * (hess + hess.T), grad, meat


def fit_statistics(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    *,
    weights: torch.Tensor | None = None,
    absolute_sigma: bool = False,
    at_bound: Sequence[str] = (),
    grad_tol: float = 0.1,
    chunk_size: int | None = None,
    loss: Any = None,
    host: HostModel | None = None,
) -> FitStats:
    """Covariance, standard errors and goodness of fit of ``fn`` at ``theta`` (see module doc).

    Status, most serious first, with a reason naming the parameters concerned:

    - ``singular``: the column-scaled J^T J has an eigenvalue below 1e-13 of the largest (or
      n <= p). The parameters with weight in its null space are degenerate: their stderr and
      covariance entries are None; the others come from the pseudo-inverse, exact for them.
    - ``at_bound``: the named parameters sit on a bound; they are treated as fixed (stderr None)
      and the others' covariance is that of the free parameters alone.
    - ``not_converged``: the Gauss-Newton step to the least-squares minimum, ``(J^T J)^-1 J^T r``,
      is larger than ``grad_tol`` standard errors in some parameter: the numbers are reported but
      theta is not the minimum.
    - ``ok`` otherwise.

    ``condition_number`` is that of the column-scaled ``D^-1 J^T J D^-1`` with ``D^2 = diag(J^T J)``
    (the square of the scaled J's singular-value ratio); it does not depend on parameter units.

    With a `loss` (a `fitcli.losses.Loss` with information of its own) J^T J is its observed
    information and the covariance as in the module doc; `absolute_sigma` does not apply.

    ``host``: the same model in numpy at x (`fitcli.lm.HostModel`, checked against autograd by
    `fitcli.lm.host_ok`); J^T J (of the least-squares losses) then comes from its exact Jacobian
    instead of autograd's.
    """
    names = list(names)
    p = theta.numel()
    if len(names) != p:
        raise ValueError(f"{len(names)} names for {p} parameters")
    device = theta.device
    f64 = torch.float64
    theta = theta.detach().to(f64).reshape(-1)
    x = x.to(f64) if x.is_floating_point() else x
    y = y.to(f64).reshape(-1)
    w = weights.to(f64).reshape(-1) if weights is not None else None
    n = y.numel()

    info = loss is not None and loss.own_information
    sandwich = info and loss.sandwich
    meat = None
    if info:
        jtj, jtr, meat = loss_information(fn, theta, x, y, loss, w, chunk_size)
        rss = residual_sum_of_squares(fn, theta, x, y, w, chunk_size)
        matrix, minimum = "the observed information", "the minimum of the loss"
    else:
        if host is not None:
            jtj, jtr, rss = _host_jtj_jtr(host, theta, y, w)
        else:
            jtj, jtr, rss = jtj_jtr(fn, theta, x, y, w, chunk_size)
        matrix, minimum = "J^T J", "the least-squares minimum"
    if w is None:  # the weighted sums below with unit weights, without an n-array of ones
        ybar = y.sum() / n
        tss = float(((y - ybar) ** 2).sum())
    else:
        w2 = w * w
        ybar = (w2 * y).sum() / w2.sum()
        tss = float((w2 * (y - ybar) ** 2).sum())
    r2 = 1.0 - rss / tss if tss > 0 else (1.0 if rss == 0 else -math.inf)
    dof = n - p
    chi2_reduced = rss / dof if dof > 0 else None
    log_term = n * math.log(rss / n) if rss > 0 else -math.inf
    aic = log_term + 2 * p
    bic = log_term + math.log(n) * p

    problems: list[tuple[str, str]] = []  # (status, reason), most serious first at the end
    bound = [i for i, name in enumerate(names) if name in set(at_bound)]
    unknown = sorted(set(at_bound) - set(names))
    if unknown:
        raise ValueError(f"at_bound names unknown parameters: {', '.join(unknown)}")
    free = [i for i in range(p) if i not in bound]

    # Covariance of the free parameters, in column-scaled form for a unit-free rank decision.
    # The p x p algebra runs in numpy (a microsecond per operation where torch's dispatch costs
    # several); the eigendecomposition and the matrix products stay torch's, on the device, so
    # the numbers are those torch alone gave (its elementwise operations round as numpy's do).
    # (`1.0 / t` is torch's reciprocal, which may round otherwise than a division: in torch.)
    jtj_np = jtj.detach().cpu().numpy()
    sub = jtj_np[np.ix_(free, free)]
    diag_t = torch.diagonal(jtj)[free] if free else jtj.new_zeros(0)
    ok_t = diag_t > 0
    s = torch.where(ok_t, 1.0 / torch.sqrt(torch.where(ok_t, diag_t, 1.0)), 0.0).cpu().numpy()
    ok_col = ok_t.cpu().numpy()
    scaled = sub * s[:, None] * s[None, :]
    degenerate: list[int] = [free[k] for k in range(len(free)) if not bool(ok_col[k])]
    condition = None
    pinv = np.zeros_like(scaled)
    if free:
        evals_t, evecs_t = torch.linalg.eigh(torch.from_numpy(scaled).to(device))
        evals, evecs = evals_t.cpu().numpy(), evecs_t.cpu().numpy()
        top = float(evals.max())
        small = evals <= SINGULAR_RCOND * top if top > 0 else np.ones_like(evals, dtype=bool)
        lo = float(evals.min())
        condition = _finite(top / lo) if lo > 0 else None
        if bool(small.any()):
            null = evecs[:, small]
            # A parameter takes part in a degeneracy if a null vector has weight on it.
            weight = np.abs(null).max(axis=1)
            for k in range(len(free)):
                if float(weight[k]) > 1e-3 and free[k] not in degenerate:
                    degenerate.append(free[k])
        small_t = torch.from_numpy(small).to(device)
        inv_t = torch.where(small_t, 0.0, 1.0 / torch.where(small_t, 1.0, evals_t))
        pinv = ((evecs_t * inv_t[None, :]) @ evecs_t.T).cpu().numpy()
    degenerate.sort()

    if info:
        s2 = loss.information_scale if not sandwich or dof > 0 else math.nan
        chi2_reduced, aic, bic = None, math.nan, math.nan  # they assume Gaussian errors
    elif absolute_sigma:
        s2 = 1.0
    elif dof > 0:
        s2 = rss / dof
    else:
        s2 = math.nan
    cov_free = pinv * s[:, None] * s[None, :] * s2
    if sandwich and meat is not None:
        fidx = torch.tensor(free, dtype=torch.long, device=device)
        hc1 = n / dof if dof > 0 else math.nan
        cf = torch.from_numpy(cov_free).to(device)
        cov_free = (cf @ meat[fidx[:, None], fidx[None, :]] @ cf * hc1).cpu().numpy()
    cov = np.full((p, p), math.nan)
    if free:
        cov[np.ix_(free, free)] = cov_free
    bad = set(degenerate) | set(bound)
    keep = [i not in bad for i in range(p)]
    var = np.diagonal(cov).tolist()
    stderr_list = [
        math.sqrt(v) if keep[i] and math.isfinite(v) and v >= 0 else None for i, v in enumerate(var)
    ]
    sd = np.array([v if v is not None else math.nan for v in stderr_list], dtype=np.float64)
    with np.errstate(all="ignore"):  # NaN where a parameter has no error bar, as in torch
        corr = cov / (sd[:, None] * sd[None, :])

    if dof <= 0 and (sandwich or not (absolute_sigma or info)):
        problems.append(
            ("singular", f"no degrees of freedom: {n} points for {p} parameters, s^2 undefined")
        )
    elif degenerate:
        problems.append(
            (
                "singular",
                f"{matrix} is rank deficient: {_names(names, degenerate)} are not determined "
                "separately by the data (linear combinations of each other or without effect): "
                "they cannot be told apart here, likely a saddle, not a minimum, unless the "
                "model never tells them apart; try other starts",
            )
        )
    if bound:
        problems.append(("at_bound", f"at a bound, treated as fixed: {_names(names, bound)}"))

    # Gauss-Newton step to the minimum, in standard errors of each identifiable free parameter.
    if free and not any(st == "singular" for st, _ in problems):
        gauss_newton = torch.from_numpy(pinv * s[:, None] * s[None, :]).to(device)
        step_free = (gauss_newton @ jtr[free]).cpu().numpy()
        ratios = []
        values = theta.tolist()
        for k, i in enumerate(free):
            se = stderr_list[i]
            d = abs(float(step_free[k]))
            floor = 1e-10 * abs(values[i])
            if se is not None and d > max(grad_tol * se, floor):
                ratios.append((d / se if se > 0 else math.inf, i))
        if ratios:
            worst = max(r for r, _ in ratios)
            problems.append(
                (
                    "not_converged",
                    f"gradient still large: the parameters are {worst:.3g} stderr from "
                    f"{minimum} along {_names(names, sorted(i for _, i in ratios))}",
                )
            )

    status, reason = problems[0] if problems else ("ok", f"converged: at {minimum}")
    if len(problems) > 1:
        reason = "; ".join(r for _, r in problems)
    have_cov = any(keep) and math.isfinite(s2)
    return FitStats(
        n_points=n,
        n_params=p,
        rss=rss,
        r2=r2,
        chi2_reduced=chi2_reduced,
        aic=aic,
        bic=bic,
        stderr={name: stderr_list[i] for i, name in enumerate(names)},
        covariance=_matrix(cov, keep) if have_cov else None,
        correlation=_matrix(corr, keep) if have_cov else None,
        status=status,
        reason=reason,
        condition_number=condition,
    )


def _host_jtj_jtr(
    host: HostModel, theta: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`fitcli.lm.jtj_jtr` from a numpy model's value and exact Jacobian: J of ``w * fn`` and
    ``r = w * y - w * fn``, the products in numpy float64 (as the LM core's numpy path)."""
    wy = y.detach().cpu().numpy()
    with np.errstate(all="ignore"):  # non-finite entries are reported by the caller
        m, jac = host.jacobian(theta.detach().cpu().numpy())
        if w is not None:
            wn = w.detach().cpu().numpy()
            m, jac, wy = m * wn, jac * wn[:, None], wy * wn
        r = wy - m
        jtj, jtr, rss = jac.T @ jac, jac.T @ r, float(r @ r)
    return torch.from_numpy(jtj).to(theta.device), torch.from_numpy(jtr).to(theta.device), rss


def tied_stderr(
    model: FitModel,
    free_ext: torch.Tensor,
    covariance: list[list[float | None]] | None,
    at_bound: Sequence[str] = (),
) -> dict[str, float | None]:
    """Standard errors of the tied parameters by the delta method: ``var(t) = g^T C g`` with
    ``g = d t / d free`` (exact, by autograd through the ties, chained ones included) at the free
    parameters' values `free_ext`, and C their covariance (`fit_statistics`, in
    `model.free_names` order). A free parameter at a bound counts as fixed, as it does in C
    (variance 0); a tie that depends on one without a covariance entry (not determined by the
    data) or only on parameters at a bound has no standard error (None), nor has any tie when
    there is no covariance."""
    out: dict[str, float | None] = dict.fromkeys(model.tied)
    if covariance is None:
        return out
    theta = free_ext.detach().to(torch.float64).reshape(-1)
    jac = torch.autograd.functional.jacobian(model.full_vector, theta).tolist()
    bound = set(at_bound)
    free = model.free_names
    for name in model.tied:
        g = jac[model.names.index(name)]
        moving = [k for k, v in enumerate(g) if v != 0.0]
        used = [k for k in moving if free[k] not in bound]
        if moving and not used:  # it moves only with parameters treated as fixed: as they are
            continue
        entries = [covariance[i][j] for i in used for j in used]
        if any(c is None for c in entries):
            continue
        var = math.fsum(g[i] * g[j] * float(covariance[i][j] or 0.0) for i in used for j in used)
        out[name] = math.sqrt(var) if math.isfinite(var) and var >= 0 else None
    return out


# Uncertainty statuses at which the parameters are a least-squares minimum: a fit ending with
# any other (not_converged, singular, failed) did not converge, whatever stopped it.
MINIMUM_STATUSES = ("ok", "at_bound")


def verdict(
    status: str,
    reason: str | None,
    epochs_run: int,
    uncertainty: dict,
    minimum: str = "the least-squares minimum",
) -> dict:
    """``converged`` and ``reason`` of a finished run's summary, from its status, what stopped
    it (`reason`, None: it ran all its epochs) and its error bars' `uncertainty` block: the one
    place that decides whether a fit converged, so that the two never disagree.

    A completed run converged only if its error bars say it is at the least-squares minimum
    (`MINIMUM_STATUSES`); its reason then ends in "converged: ...", else in "did not converge:"
    and why. A run that did not complete did not converge, and keeps its reason. `minimum` names
    what the fit minimises (`minimum_of`).
    """
    kind = uncertainty.get("status")
    converged = status == RunStatus.COMPLETED and kind in MINIMUM_STATUSES
    if status != RunStatus.COMPLETED:
        return {"converged": False, "reason": reason}
    stop = reason or f"ran all {epochs_run} epochs"
    if kind == "ok":
        why = f"converged: at {minimum}"
    elif converged:
        why = f"converged: at {minimum} within the bounds ({uncertainty['reason']})"
    else:
        why = f"did not converge: {uncertainty.get('reason') or kind}"
    return {"converged": converged, "reason": f"{stop}; {why}"}


# Each uncertainty status but ok in words: what it is, and what it means for the error bars
# (its reason, from `fit_statistics`, says why and for which parameters).
STATUS_WORDS = {
    "not_converged": ("not converged", "the error bars are not reliable"),
    "singular": ("singular", "the parameters it names have no error bars"),
    "at_bound": ("at a bound", "those parameters have no error bars; the others' hold them fixed"),
    RunStatus.FAILED: ("no error bars", ""),
}


def uncertainty_words(uncertainty: Any) -> str | None:
    """A summary's `uncertainty` block in words where its status is not ok, e.g. "not
    converged: gradient still large: ...; the error bars are not reliable"; None for ok or no
    block (a run that did not complete)."""
    if not isinstance(uncertainty, dict) or uncertainty.get("status") in (None, "ok"):
        return None
    status = str(uncertainty["status"])
    label, meaning = STATUS_WORDS.get(status, (status.replace("_", " "), ""))
    reason = uncertainty.get("reason")
    words = f"{label}: {reason}" if isinstance(reason, str) and reason else label
    return f"{words}; {meaning}" if meaning else words


def minimum_of(loss: Any) -> str:
    """What a fit with the config's `loss` minimises, in the words of `verdict`."""
    from fitcli.losses import resolve

    spec = resolve(loss)
    return "the minimum of the loss" if spec.own_information else "the least-squares minimum"


def linear_optimum(
    design: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Closed-form least squares ``min |w (y - design @ theta)|^2`` in float64, via the SVD.

    Returns ``(theta_opt, rss_opt)``; for a rank-deficient design, the minimum-norm solution (as
    numpy's ``lstsq``), singular values below ``max(n, p) * eps * s_max`` being dropped.
    """
    a = design.to(torch.float64)
    b = y.to(torch.float64).reshape(-1)
    if weights is not None:
        w = weights.to(torch.float64).reshape(-1)
        a = a * w[:, None]
        b = b * w
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    cutoff = max(a.shape) * torch.finfo(torch.float64).eps * (sv.max() if sv.numel() else 0)
    inv = torch.where(sv > cutoff, 1.0 / torch.where(sv > cutoff, sv, 1.0), 0.0)
    theta = vh.T @ (inv * (u.T @ b))
    resid = b - a @ theta
    return theta, float(resid @ resid)


def truth_distance(
    fitted: dict[str, float], truth: dict[str, float], stderr: dict[str, float | None]
) -> dict[str, float | None]:
    """``(fitted - truth) / stderr`` per fitted parameter; None where truth or stderr is missing."""
    out: dict[str, float | None] = {}
    for name, value in fitted.items():
        t = truth.get(name)
        se = stderr.get(name)
        if t is None or se is None or not math.isfinite(se) or se <= 0:
            out[name] = None
        else:
            out[name] = _finite((value - t) / se)
    return out


# Above this many design-matrix entries the closed-form optimum is reduced chunk by chunk.
DESIGN_CHUNK_ENTRIES = 4_000_000
# y_true counts as "of the model's form" when the least-squares fit to it leaves a relative
# residual norm below this: the basis then reproduces the target up to rounding.
TRUTH_RTOL = 1e-9


def reduce_least_squares(
    design_rows: Callable[[slice], torch.Tensor],
    ys: Sequence[torch.Tensor],
    n: int,
    p: int,
    weights: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """QR-reduce ``min |w (y - A theta)|`` for several right-hand sides ``ys``, chunk by chunk.

    ``design_rows(sl)`` gives the rows ``sl`` of A. Returns ``(R, zs, rss_perp)``: A's p x p
    triangular factor, each ``Q^T (w y)`` (p-vector) and the part of each residual that no theta
    can remove, so that ``|w (y - A theta)|^2 = |z - R theta|^2 + rss_perp`` exactly (in exact
    arithmetic): `linear_optimum` on ``(R, z)`` then solves the full problem in p x p memory.
    """
    k = len(ys)
    size = chunk_rows or max(p + k, DESIGN_CHUNK_ENTRIES // max(p + k, 1))
    acc: torch.Tensor | None = None
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        a = design_rows(sl).to(torch.float64)
        cols = [a] + [y[sl].to(torch.float64).reshape(-1, 1) for y in ys]
        block = torch.cat(cols, dim=1)
        if weights is not None:
            block = block * weights[sl].to(torch.float64).reshape(-1, 1)
        stacked = block if acc is None else torch.cat([acc, block], dim=0)
        acc = torch.linalg.qr(stacked, mode="r").R
    assert acc is not None
    width = p + k
    if acc.shape[0] < width:  # fewer rows than columns: pad with zero rows
        pad = torch.zeros(width - acc.shape[0], width, dtype=acc.dtype, device=acc.device)
        acc = torch.cat([acc, pad], dim=0)
    r = acc[:p, :p]
    zs = [acc[:p, p + j] for j in range(k)]
    # Rows p and below of column p+j hold Q^T (w y_j) outside span(Q[:, :p]) ⊇ span(A).
    perp = []
    for j in range(k):
        tail = acc[p:, p + j]
        perp.append(float(tail @ tail))
    return r, zs, perp


def linear_optimum_chunked(
    design_rows: Callable[[slice], torch.Tensor],
    y: torch.Tensor,
    n: int,
    p: int,
    weights: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, float, int]:
    """`linear_optimum` for a design given by rows, in bounded memory; also returns the rank."""
    r, (z,), (perp,) = reduce_least_squares(design_rows, [y], n, p, weights, chunk_rows)
    return _optimum(r, z, perp, n, p)


def _optimum(
    r: torch.Tensor, z: torch.Tensor, perp: float, n: int, p: int
) -> tuple[torch.Tensor, float, int]:
    """`linear_optimum_chunked`'s result from a reduced problem (`reduce_least_squares`)."""
    theta, rss_r = linear_optimum(r, z)
    sv = torch.linalg.svdvals(r)
    cutoff = max(n, p) * torch.finfo(torch.float64).eps * (float(sv.max()) if sv.numel() else 0)
    rank = int((sv > cutoff).sum())
    return theta, perp + rss_r, rank


def expression_truth(model_expr: str, target: str, params: Sequence[str]) -> dict[str, float]:
    """Parameter values that turn `model_expr` into `target`, when both have the same form.

    The two expressions are compared as syntax trees: every node must match except where the
    model has a parameter name and the target a number (a signed literal), which binds that
    parameter (consistently, if it appears more than once). ``{}`` when the forms differ, e.g.
    ``a*sin(b*x)`` against ``1.5*sin(2*x)`` gives ``{"a": 1.5, "b": 2.0}``, against
    ``sin(2*x)*1.5`` nothing (the form differs even though the function is the same).
    """
    import ast

    names = set(params)
    bound: dict[str, float] = {}

    def number(node: ast.AST) -> float | None:
        value = getattr(node, "value", None) if isinstance(node, ast.Constant) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = number(node.operand)
            if inner is not None:
                return -inner if isinstance(node.op, ast.USub) else inner
        return None

    def match(m: ast.AST, t: ast.AST) -> bool:
        if isinstance(m, ast.Name) and m.id in names:
            v = number(t)
            if v is None or (m.id in bound and bound[m.id] != v):
                return False
            bound[m.id] = v
            return True
        if (
            isinstance(m, ast.BinOp)
            and isinstance(t, ast.BinOp)
            and isinstance(m.op, ast.Add)
            and isinstance(t.op, ast.Sub)
            and isinstance(m.right, ast.Name)
            and m.right.id in names
            and number(t.right) is not None
        ):
            # `... + c` against `... - 0.5`: c = -0.5.
            neg = ast.UnaryOp(op=ast.USub(), operand=t.right)
            return match(m.left, t.left) and match(m.right, neg)
        if type(m) is not type(t):
            return False
        for field in m._fields:
            a, b = getattr(m, field), getattr(t, field)
            if isinstance(a, ast.AST):
                if not isinstance(b, ast.AST) or not match(a, b):
                    return False
            elif isinstance(a, list):
                if not isinstance(b, list) or len(a) != len(b):
                    return False
                if not all(match(u, v) for u, v in zip(a, b, strict=True)):
                    return False
            elif field != "ctx" and a != b:
                return False
        return True

    try:
        m_tree = ast.parse(model_expr.strip(), mode="eval").body
        t_tree = ast.parse(target.strip(), mode="eval").body
    except SyntaxError:
        return {}
    if not match(m_tree, t_tree):
        return {}
    return bound


def run_report(
    model: FitModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    y_true: torch.Tensor | None = None,
    loss: Any = "mse",
    final_loss: float | None = None,
    model_expr: str | None = None,
    target: str | None = None,
    absolute_sigma: bool = True,
) -> dict:
    """The summary fields of a finished run, for a float64 `fitcli.model.FitModel` on x, y.

    Error bars are taken against the free parameters' external values through
    ``model.predict_external``, so the bounds' transforms do not distort them; fixed parameters
    get stderr None. With `weights` (1/sigma from the data) sigma is absolute, as in
    ``curve_fit(sigma=..., absolute_sigma=True)``; with ``absolute_sigma=False`` (the config's
    `data.absolute_sigma: false`) they are relative weights, the covariance scaled by the
    reduced chi-square. For a basis model the closed-form least-squares
    optimum gives ``optimum_loss`` (mse: RSS/n) and ``gap``; `loss` is the config's (a name or a
    mapping), whose own information gives the error bars where it has one (see the module
    doc); when the noiseless `y_true` is
    itself a combination of the basis (or, for an expression model, `target` is `model_expr`
    with numbers for the parameters), ``truth`` and ``truth_distance`` in standard errors.
    """
    from fitcli.losses import resolve

    spec = resolve(loss)
    free = list(model.free_names)
    with torch.no_grad():
        theta = model.external(model.raw.detach()).to(torch.float64)
    fn = model_function(model, external=True)
    host = None
    if not spec.own_information and host_eligible(x, theta):
        # A small fit on the CPU: J^T J from the numpy model's exact Jacobian (a fraction of
        # autograd's cost at these sizes), once it agrees with autograd at theta.
        from fitcli.lm_optim import host_model

        host = host_model(model, x, external=True)
        if host is not None and not host_ok(fn, host, theta, x):
            host = None
    stats = fit_statistics(
        fn,
        theta,
        x,
        y,
        free,
        weights=weights,
        absolute_sigma=weights is not None and absolute_sigma,
        at_bound=model.at_bound(),
        loss=spec if spec.own_information else None,
        host=host,
    )
    stderr = {name: stats.stderr.get(name) for name in model.names}
    if model.tied:
        stderr.update(tied_stderr(model, theta, stats.covariance, model.at_bound()))
    out: dict = {
        "stderr": stderr,
        "covariance_params": free,
        "covariance": stats.covariance,
        "correlation": stats.correlation,
        "uncertainty": {
            "status": stats.status,
            "reason": stats.reason,
            "condition_number": stats.condition_number,
        },
        "rss": _finite(stats.rss),
        "r2": _finite(stats.r2),
        "chi2_reduced": stats.chi2_reduced,
        "aic": _finite(stats.aic),
        "bic": _finite(stats.bic),
        "n_points": stats.n_points,
        "n_params": stats.n_params,
    }
    truth: dict[str, float] = {}
    n = int(y.shape[0])
    if isinstance(model, BasisModel):
        p = len(model.names)

        def rows(sl: slice) -> torch.Tensor:
            return torch.stack([b(x[sl]) for b in model.basis], dim=-1)

        # One QR pass over the design for y and y_true alike when both are unweighted (data
        # with sigma are a file's, which has no y_true): the chunks are those of y alone, so
        # y's result is the one it has by itself (bit for bit within one chunk, to rounding in
        # the last bit over several).
        both = y_true is not None and weights is None
        chunk = max(p + 1, DESIGN_CHUNK_ENTRIES // (p + 1))
        ys = [y] if y_true is None or not both else [y, y_true]
        r, zs, perps = reduce_least_squares(rows, ys, n, p, weights, chunk_rows=chunk)
        _, rss_opt, _ = _optimum(r, zs[0], perps[0], n, p)
        if spec.name == "mse":
            optimum = rss_opt / n
            out["optimum_loss"] = optimum
            if final_loss is not None and optimum > 0:
                out["gap"] = _finite((final_loss - optimum) / optimum)
            else:
                out["gap"] = None
        if y_true is not None:
            if both:
                t_opt, rss_true, rank = _optimum(r, zs[1], perps[1], n, p)
            else:
                t_opt, rss_true, rank = linear_optimum_chunked(rows, y_true, n, p)
            scale = float(y_true.to(torch.float64) @ y_true.to(torch.float64))
            if rank == p and rss_true <= (TRUTH_RTOL**2) * max(scale, 1e-300):
                top = float(t_opt.abs().max())
                # A coefficient at rounding level is an absent basis function: exactly 0.
                clean = [v if abs(v) > 1e-12 * top else 0.0 for v in t_opt.tolist()]
                truth = dict(zip(model.names, clean, strict=True))
    elif model_expr is not None and target is not None:
        truth = expression_truth(model_expr, target, model.names)
    if truth:
        values = model.values()
        out["truth"] = truth
        out["truth_distance"] = truth_distance(
            {k: values[k] for k in free if k in truth}, truth, stderr
        )
    return out
