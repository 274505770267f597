"""Error bars and fit statistics at the final parameters; the closed-form linear optimum.

All in float64, from the same chunked ``J^T J`` and ``J^T r`` as the Levenberg-Marquardt core
(`fitcli.lm.jtj_jtr`), where ``r = w * (y - fn(theta, x))`` and J is the Jacobian of ``w * fn``:

    covariance = s^2 (J^T J)^-1,   s^2 = RSS / (n - p)   (s^2 = 1 with absolute_sigma)
    stderr_i   = sqrt(covariance_ii),   correlation_ij = cov_ij / (stderr_i stderr_j)
    R^2        = 1 - RSS / TSS,  TSS = sum(w^2 (y - ybar_w)^2),  ybar_w = sum(w^2 y) / sum(w^2)
    chi2_red   = RSS / (n - p)                              (RSS weighted when weights are given)
    AIC        = n log(RSS / n) + 2 p,   BIC = n log(RSS / n) + log(n) p     (lmfit's conventions)

These match scipy's ``curve_fit`` ``pcov`` (with ``sigma = 1/w`` and ``absolute_sigma``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fitcli.lm import jtj_jtr

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# An eigenvalue of the unit-diagonal (column-scaled) J^T J below this, relative to the largest,
# is taken as zero: past a condition number of 1e13 the float64 inverse of J^T J keeps fewer than
# three correct digits, so its standard errors would be noise.
SINGULAR_RCOND = 1e-13


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


def _matrix(m: torch.Tensor, keep: list[bool]) -> list[list[float | None]]:
    rows = m.tolist()
    return [
        [v if keep[i] and keep[j] and math.isfinite(v) else None for j, v in enumerate(row)]
        for i, row in enumerate(rows)
    ]


def _names(names: Sequence[str], idx) -> str:
    return ", ".join(names[i] for i in idx)


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

    jtj, jtr, rss = jtj_jtr(fn, theta, x, y, w, chunk_size)
    w2 = w * w if w is not None else torch.ones_like(y)
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
    sub = jtj[free][:, free]
    diag = torch.diagonal(sub)
    ok_col = diag > 0
    s = torch.where(ok_col, 1.0 / torch.sqrt(torch.where(ok_col, diag, 1.0)), 0.0)
    scaled = sub * s[:, None] * s[None, :]
    degenerate: list[int] = [free[k] for k in range(len(free)) if not bool(ok_col[k])]
    condition = None
    pinv = torch.zeros_like(scaled)
    if free:
        evals, evecs = torch.linalg.eigh(scaled)
        top = float(evals.max())
        small = evals <= SINGULAR_RCOND * top if top > 0 else torch.ones_like(evals, dtype=bool)
        lo = float(evals.min())
        condition = _finite(top / lo) if lo > 0 else None
        if bool(small.any()):
            null = evecs[:, small]
            # A parameter takes part in a degeneracy if a null vector has weight on it.
            weight = null.abs().max(dim=1).values
            for k in range(len(free)):
                if float(weight[k]) > 1e-3 and free[k] not in degenerate:
                    degenerate.append(free[k])
        inv = torch.where(small, 0.0, 1.0 / torch.where(small, 1.0, evals))
        pinv = (evecs * inv[None, :]) @ evecs.T
    degenerate.sort()

    if absolute_sigma:
        s2 = 1.0
    elif dof > 0:
        s2 = rss / dof
    else:
        s2 = math.nan
    cov_free = pinv * s[:, None] * s[None, :] * s2
    cov = torch.full((p, p), math.nan, dtype=f64, device=device)
    idx = torch.tensor(free, dtype=torch.long, device=device)
    if free:
        cov[idx[:, None], idx[None, :]] = cov_free
    bad = set(degenerate) | set(bound)
    keep = [i not in bad for i in range(p)]
    var = torch.diagonal(cov).tolist()
    stderr_list = [
        math.sqrt(v) if keep[i] and math.isfinite(v) and v >= 0 else None for i, v in enumerate(var)
    ]
    sd = torch.tensor([v if v is not None else math.nan for v in stderr_list], dtype=f64)
    corr = cov.cpu() / (sd[:, None] * sd[None, :])

    if dof <= 0 and not absolute_sigma:
        problems.append(
            ("singular", f"no degrees of freedom: {n} points for {p} parameters, s^2 undefined")
        )
    elif degenerate:
        problems.append(
            (
                "singular",
                f"J^T J is rank deficient: {_names(names, degenerate)} are not determined "
                "separately by the data (linear combinations of each other or without effect)",
            )
        )
    if bound:
        problems.append(("at_bound", f"at a bound, treated as fixed: {_names(names, bound)}"))

    # Gauss-Newton step to the minimum, in standard errors of each identifiable free parameter.
    if free and not any(st == "singular" for st, _ in problems):
        step_free = (pinv * s[:, None] * s[None, :]) @ jtr[free]
        ratios = []
        for k, i in enumerate(free):
            se = stderr_list[i]
            d = abs(float(step_free[k]))
            floor = 1e-10 * abs(float(theta[i]))
            if se is not None and d > max(grad_tol * se, floor):
                ratios.append((d / se if se > 0 else math.inf, i))
        if ratios:
            worst = max(r for r, _ in ratios)
            problems.append(
                (
                    "not_converged",
                    f"gradient still large: the parameters are {worst:.3g} stderr from the "
                    f"least-squares minimum along {_names(names, sorted(i for _, i in ratios))}",
                )
            )

    status, reason = problems[0] if problems else ("ok", "converged: at the least-squares minimum")
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
        covariance=_matrix(cov.cpu(), keep) if have_cov else None,
        correlation=_matrix(corr, keep) if have_cov else None,
        status=status,
        reason=reason,
        condition_number=condition,
    )


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
