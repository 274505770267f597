"""Levenberg-Marquardt on autograd Jacobians: one `step()` is one iteration, over a flat theta.

Conventions. ``fn(theta, x) -> yhat`` is a pure, differentiable torch function; the residuals are
``r = w * (y - fn(theta, x))`` with ``w = 1/sigma`` (or 1), the cost is ``0.5 * sum(r**2)``, and
``J = d(w * fn)/d(theta)`` is the Jacobian of the weighted model, so that the Gauss-Newton step is
``delta = (J^T J)^-1 J^T r`` and the steepest-descent direction of the cost is ``+J^T r``.

J is built by forward-mode autograd (`torch.func.jacfwd`: p forward passes, no finite differences)
or, for a model that treats each parameter as a scalar broadcast over the rows, by one reverse
pass with one leaf per parameter (`_jacobian_rowwise`). Only the p x p matrix J^T J and the
p-vector J^T r are kept, accumulated in float64 over chunks
of rows, so memory stays bounded however many points there are. The iteration is Moré's scaled
Levenberg-Marquardt (MINPACK) with Nielsen's damping update:

    (J^T J + lambda * D^2) delta = J^T r,   D^2 = running max of diag(J^T J)
    rho = (cost - cost(theta + delta)) / predicted reduction
    accept if rho > 0: lambda *= max(1/3, 1 - (2 rho - 1)^3), nu = 2;  else lambda *= nu, nu *= 2

Small fits on the CPU in float64 (up to SMALL_ROWS rows) can run on a `HostModel` instead: the
model and its exact Jacobian in numpy (`fitcli.symdiff` differentiates the expression tree), which
costs a fifth of torch's dispatch and reverse pass at those sizes. The core checks it against an
exact autograd Jacobian at the start (`host_ok`) and keeps torch if they disagree.

A loss other than least squares (`fitcli.losses.Loss`, the `loss` argument) enters through its
Gauss-Newton form: at each linearization the residuals become the loss's effective residuals and
each row of J is scaled (``J_eff = s J``), so that ``J_eff^T r_eff`` is minus the gradient of its
cost and ``J_eff^T J_eff`` its Gauss-Newton (robust losses, as scipy's ``least_squares``) or
Fisher-scoring (poisson, bce) curvature; "rss" then stands for twice the loss's cost throughout.

Two additions make it reach NIST's certified values from both StRD starting points: a curvature
guard that rejects large steps whose geodesic acceleration (Transtrum & Sethna 2012) is comparable
to the step itself, and a final polishing phase that follows J^T r past the point where cost
differences are rounding noise (see `LevenbergMarquardt.step`).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_DAMPING = 1e16
# Fits of up to this many rows on the CPU keep their Jacobian for the guard (`_normal_equations`).
SMALL_ROWS = 1024
MIN_DAMPING = 1e-300
# An eigenvalue of the unit-diagonal (column-scaled) J^T J below this, relative to the largest,
# is taken as zero: past a condition number of 1e13 the float64 inverse of J^T J keeps fewer than
# three correct digits. A stop at such a point restarts once (`_leave_singular_point`), and the
# error bars call it singular (`fitcli.stats`).
SINGULAR_RCOND = 1e-13
# Stops that no restart can improve on: nothing to evaluate, or nothing left to fit.
_FINAL_STOPS = ("non-finite", "exact fit")
# Rows per chunk are sized so that one chunk's Jacobian is about this many bytes. On the CPU a
# small working set matters more than few chunks: at 4 MB every temporary of a chunk stays in
# cache and the allocator reuses its blocks, where 64 MB chunks page-fault fresh memory for each
# elementwise op (several times slower at 10^6 rows). On CUDA big chunks keep kernel launches few.
JACOBIAN_CHUNK_BYTES = 4_000_000
JACOBIAN_CHUNK_BYTES_CUDA = 64_000_000
# Moré's initial trust radius: this factor times |D theta0| (MINPACK's default `factor`).
TRUST_FACTOR = 100.0
# The curvature guard estimates J^T m_vv from at most about this many evenly strided rows.
GUARD_ROWS = 65536
# A damped fit restarts (see `LevenbergMarquardt.step`) when, over the last two windows of this
# many iterations, the cost fell by less than STALL_RTOL relative, by about as much in each
# (the second window's reduction within STALL_BAND times the first's). Tuned on NIST: MGH10
# from start 1 trips it at iteration 150 (20% over 100 iterations, ratio 1.36); MGH17 from start 1
# (ratio 1.6-2.5) and Bennett5 (about 0.5) never do. A miss only delays the restart (to the next
# steady window, or `restart_after`); a false trip runs MINPACK's trust region from theta0.
STALL_WINDOW = 50
STALL_RTOL = 0.25
STALL_BAND = (0.7, 1.4)
# Polishing starts where the quadratic model predicts less than this relative cost reduction
# with the damping below POLISH_DAMPING (a nearly Gauss-Newton step): see `step`.
POLISH_RTOL = 1e-10
POLISH_DAMPING = 1e-2
# Polishing stops when a step is not shorter than this fraction of the one before.
POLISH_CONTRACTION = 0.9


def default_chunk_size(n_params: int, device: torch.device | None = None) -> int:
    """Rows per chunk so that one chunk's Jacobian stays near 4 MB in float64 (64 MB on CUDA),
    at least 4096 rows."""
    budget = JACOBIAN_CHUNK_BYTES
    if device is not None and device.type == "cuda":
        budget = JACOBIAN_CHUNK_BYTES_CUDA
    return max(4096, budget // (8 * max(n_params, 1)))


def _weighted_model(fn: Model, x: torch.Tensor, w: torch.Tensor | None):
    def model(theta: torch.Tensor) -> torch.Tensor:
        m = fn(theta, x)
        return m * w if w is not None else m

    return model


def _jacobian_forward(model, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d model / d theta ([m, p]) and the model values, by forward mode (p passes under vmap)."""

    def with_aux(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = model(t)
        return m, m

    try:
        jac, m = torch.func.jacfwd(with_aux, has_aux=True)(theta)
    except (RuntimeError, NotImplementedError):
        # An op without a forward-mode formula: reverse mode gives the same matrix.
        jac, m = torch.func.jacrev(with_aux, has_aux=True)(theta)
    return jac.reshape(m.numel(), theta.numel()), m.reshape(-1)


def _jacobian_rowwise(model, theta: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, in one reverse pass, for a model that treats each theta[i] as a scalar.

    The model gets a list of p leaves instead of theta, leaf k being theta[k] expanded to `rows`
    (a stride-0 view, no copy), so that ``theta[k]`` broadcasts against x as before. The
    gradient of sum(model) with respect to leaf k is column k of J, as it is: no parameter is
    selected out of a vector, so the backward pass builds no [rows, p] zero gradient per
    parameter read (that scatter was half of the pass). Several times faster than vmap for
    small p; only valid for such models, which `rowwise_ok` checks.
    """
    flat = theta.detach().reshape(-1)
    leaves = [flat[k].expand(rows).requires_grad_() for k in range(flat.numel())]
    with torch.enable_grad():
        m = model(leaves).reshape(-1)
        grads = torch.autograd.grad(m.sum(), leaves, allow_unused=True)
    zero = None
    cols = []
    for g in grads:
        if g is None:  # the model does not depend on this parameter
            if zero is None:
                zero = torch.zeros(rows, dtype=m.dtype, device=m.device)
            g = zero
        cols.append(g)
    # [p, rows] contiguous, returned transposed: J^T J is then one BLAS product of it.
    return torch.stack(cols).T, m.detach()


def _jacobian_columns(model, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d model / d theta ([m, p]) by reverse mode only, one column per backward pass.

    With ``g(u) = J^T u`` (one backward pass with a graph), ``d g_j / d u = J[:, j]``. Used as
    the reference of `rowwise_ok` because, unlike forward mode, it needs no functorch start-up
    (seconds on the first call in a process, which a short run would feel).
    """
    t = theta.detach().clone().requires_grad_()
    with torch.enable_grad():
        m = model(t).reshape(-1)
        u = torch.zeros_like(m, requires_grad=True)
        # A scalar output, never explicit grad_outputs: torch imports sympy (slow) for those.
        (g,) = torch.autograd.grad((m * u).sum(), t, create_graph=True)
        cols = []
        for j in range(t.numel()):
            if not g[j].requires_grad:  # theta[j] has no effect on the model
                cols.append(torch.zeros_like(m))
                continue
            (col,) = torch.autograd.grad(g[j], u, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(m) if col is None else col)
    return torch.stack(cols, dim=1).detach(), m.detach()


def rowwise_ok(
    fn: Model, theta: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None
) -> bool:
    """Whether the one-pass row-wise Jacobian agrees with forward mode on the first rows."""
    k = min(x.shape[0], 64)
    w = weights[:k] if weights is not None else None
    model = _weighted_model(fn, x[:k], w)
    try:
        ref, m_ref = _jacobian_columns(model, theta.detach())
        fast, m_fast = _jacobian_rowwise(model, theta.detach(), k)
    except Exception:  # any failure of the fast path just means: do not use it
        return False
    if fast.shape != ref.shape or m_fast.shape != m_ref.shape:
        return False
    same_nan = torch.isnan(ref) == torch.isnan(fast)
    close = torch.isclose(fast, ref, rtol=1e-5, atol=0.0, equal_nan=True)
    return bool(same_nan.all() and close.all())


class HostModel:
    """What the LM core needs of a model evaluated in numpy on the CPU (see `fitcli.symdiff`):
    ``value(theta)`` and ``jacobian(theta) -> (value, J)`` at the data's x, for a float64 theta
    (the model's internal vector).

    ``signature``: what identifies the numpy program and the torch model it stands for,
    whatever the data and the parameter values (`host_ok` judges each program once); None
    to have it checked at every fit."""

    signature: Hashable | None = None

    def value(self, theta: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


def host_eligible(x: torch.Tensor, theta: torch.Tensor) -> bool:
    """Whether a fit is small enough, and on the CPU in float64, for the numpy path: at up to
    SMALL_ROWS rows torch's per-operation dispatch and its reverse pass, not arithmetic, are
    what an iteration costs."""
    return (
        x.device.type == "cpu"
        and theta.dtype == torch.float64
        and x.dtype == torch.float64
        and x.shape[0] <= SMALL_ROWS
    )


# `host_ok`'s verdicts by `HostModel.signature`, the most recent last; bounded, so that a long
# session fitting many different models keeps only the recent ones.
_HOST_VERDICTS: OrderedDict[Hashable, bool] = OrderedDict()
HOST_VERDICTS_KEPT = 256


def forget_host_verdicts() -> None:
    """Drop every verdict of `host_ok`: the next fit of each program is checked again."""
    _HOST_VERDICTS.clear()


def host_ok(fn: Model, host: HostModel, theta: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the numpy model and its Jacobian agree with torch's model and an exact reverse-mode
    Jacobian on the first rows (values to 1e-9, Jacobian entries to 1e-6 relative, non-finite
    entries in the same places); any failure means: do not use it.

    The check is of the numpy program (`fitcli.symdiff`'s translation of the expression, the
    ties and bound transforms), so it is made once per `HostModel.signature`, on the first data
    and parameters that program meets, and its verdict is reused by later fits of the same
    model (a notebook fitting it to many data sets; the error bars after the LM core, whose
    numpy model is the same program where no parameter is bounded). A host without a
    signature is checked every time.

    The reference is first the one-pass row-wise Jacobian (`_jacobian_rowwise`, exact for a
    model that treats each parameter as a scalar, as every expression and basis model does: a
    fifth of the cost of the column-by-column one), and only where the numpy model does not
    agree with that, the column-by-column Jacobian (`_jacobian_columns`, exact for any model):
    the verdict is the column-by-column one's wherever the row-wise form does not hold."""
    key = host.signature
    if key is None:
        return _host_check(fn, host, theta, x)
    verdict = _HOST_VERDICTS.get(key)
    if verdict is None:
        verdict = _HOST_VERDICTS[key] = _host_check(fn, host, theta, x)
        while len(_HOST_VERDICTS) > HOST_VERDICTS_KEPT:
            _HOST_VERDICTS.popitem(last=False)
    else:
        _HOST_VERDICTS.move_to_end(key)
    return verdict


def _host_check(fn: Model, host: HostModel, theta: torch.Tensor, x: torch.Tensor) -> bool:
    """`host_ok`'s comparison itself, at theta on the first rows of x."""
    k = min(x.shape[0], 64)
    theta64 = theta.detach().cpu().numpy().astype(np.float64).reshape(-1)
    try:
        with np.errstate(all="ignore"):
            m, jac = host.jacobian(theta64)
            m2 = host.value(theta64)
    except Exception:  # a model the numpy path cannot evaluate: stay with torch
        return False
    m, m2, jac = m[:k], m2[:k], jac[:k]
    model = _weighted_model(fn, x[:k], None)
    for reference in ("rowwise", "columns"):
        try:
            if reference == "rowwise":
                ref_t, m_ref_t = _jacobian_rowwise(model, theta.detach(), k)
            else:
                ref_t, m_ref_t = _jacobian_columns(model, theta.detach())
        except Exception:  # no such reference for this model (the row-wise form), or none
            continue
        if _host_agrees(m, m2, jac, ref_t.numpy(), m_ref_t.numpy()):
            return True
    return False


def _host_agrees(
    m: np.ndarray, m2: np.ndarray, jac: np.ndarray, ref: np.ndarray, m_ref: np.ndarray
) -> bool:
    """`host_ok`'s comparison of the numpy values and Jacobian with torch's."""
    if jac.shape != ref.shape or m.shape != m_ref.shape:
        return False
    with np.errstate(all="ignore"):
        if all(np.isfinite(a).all() for a in (m, m2, jac, ref, m_ref)):
            # All finite (the usual case): `np.isclose`'s test written out, the same verdict
            # at a fraction of its cost.
            err = np.abs(jac - ref)
            scale = np.abs(ref)
            jac_ok = (err <= 1e-6 * scale) | (err <= 1e-9 * scale.max(axis=0, initial=0.0))
            m_ok = (np.abs(m - m_ref) <= 1e-9 * np.abs(m_ref)) & (
                np.abs(m2 - m_ref) <= 1e-9 * np.abs(m_ref)
            )
            return bool(jac_ok.all() and m_ok.all())
        scale = np.nanmax(np.where(np.isfinite(ref), np.abs(ref), 0.0), axis=0, initial=0.0)
        jac_close = np.isclose(jac, ref, rtol=1e-6, atol=0.0, equal_nan=True) | (
            np.abs(jac - ref) <= 1e-9 * scale
        )
        m_close = np.isclose(m, m_ref, rtol=1e-9, atol=0.0, equal_nan=True) & np.isclose(
            m2, m_ref, rtol=1e-9, atol=0.0, equal_nan=True
        )
    same_nan = (np.isnan(ref) == np.isnan(jac)).all() and (np.isnan(m_ref) == np.isnan(m)).all()
    return bool(same_nan and jac_close.all() and m_close.all())


def _jacobian_and_residual(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    rowwise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """J = d(w * fn)/d theta ([m, p]) and r = w * (y - fn)."""
    model = _weighted_model(fn, x, w)
    if rowwise:
        jac, m = _jacobian_rowwise(model, theta, y.shape[0])
    else:
        jac, m = _jacobian_forward(model, theta)
    wy = (y * w if w is not None else y).reshape(-1)
    return jac, wy - m


def _gauss_newton_rows(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    rowwise: bool,
    loss: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_jacobian_and_residual` in a loss's Gauss-Newton form (float64): ``s J``, ``r_eff`` and
    each point's cost (see `fitcli.losses.Loss.gauss_newton`)."""
    model = _weighted_model(fn, x, w)
    if rowwise:
        jac, m = _jacobian_rowwise(model, theta, y.shape[0])
    else:
        jac, m = _jacobian_forward(model, theta)
    wy = (y * w if w is not None else y).reshape(-1)
    f64 = torch.float64
    r, s, cost = loss.gauss_newton(m.to(f64), wy.to(f64), torch)
    return jac.to(f64) * s[:, None], r, cost


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def jtj_jtr(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    rowwise: bool | None = None,
    loss: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(J^T J, J^T r, sum(r**2))`` at theta, in float64, accumulated over chunks of rows.

    J is the Jacobian of the weighted model ``w * fn`` (the negative of d r / d theta), so that
    ``solve(J^T J, J^T r)`` is the Gauss-Newton step. Only one chunk's Jacobian is alive at a time.
    ``rowwise`` picks the one-pass Jacobian (see `rowwise_ok`); None decides by `rowwise_ok`.
    With a `loss`, J and r are its Gauss-Newton form and the third value is twice its cost.
    """
    theta = theta.detach()
    p = theta.numel()
    n = y.shape[0]
    size = chunk_size or default_chunk_size(p, theta.device)
    if rowwise is None:
        rowwise = rowwise_ok(fn, theta, x, weights)
    jtj = torch.zeros(p, p, dtype=torch.float64, device=theta.device)
    jtr = torch.zeros(p, dtype=torch.float64, device=theta.device)
    rss = torch.zeros((), dtype=torch.float64, device=theta.device)
    with _chunk_threads(theta.device):
        for sl in _chunks(n, size):
            w = weights[sl] if weights is not None else None
            if loss is None:
                jac, r = _jacobian_and_residual(fn, theta, x[sl], y[sl], w, rowwise)
                jac = jac.to(torch.float64)
                r = r.to(torch.float64)
                rss += r @ r
            else:
                jac, r, cost = _gauss_newton_rows(fn, theta, x[sl], y[sl], w, rowwise, loss)
                rss += 2 * cost.sum()
            jtj += jac.T @ jac
            jtr += jac.T @ r
    return jtj, jtr, float(rss)


def _normal_equations(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    chunk_size: int | None,
    rowwise: bool | None,
    loss: Any = None,
) -> tuple[np.ndarray, np.ndarray, float, tuple[np.ndarray, torch.Tensor] | None]:
    """`jtj_jtr` as numpy float64 arrays, for the iteration, and (J, w * fn) when kept.

    Up to SMALL_ROWS rows on the CPU (NIST's tens to hundreds of points, within one chunk), the
    products are taken in numpy straight from the one Jacobian, and J (float64) and the weighted
    model values are returned too, so that the curvature guard needs no reverse pass
    (`_second_derivative_jt_kept`). Above that, numpy's threaded BLAS products on a busy machine
    cost more than torch's single-threaded ones.
    """
    n = y.shape[0]
    size = chunk_size or default_chunk_size(theta.numel(), theta.device)
    if theta.device.type == "cpu" and n <= min(size, SMALL_ROWS):
        model = _weighted_model(fn, x, weights)
        with one_thread():
            if rowwise:
                jac_t, m = _jacobian_rowwise(model, theta.detach(), n)
            else:
                jac_t, m = _jacobian_forward(model, theta.detach())
            wy = (y * weights if weights is not None else y).reshape(-1)
            r_t = wy - m
        jac = jac_t.detach().to(torch.float64).numpy()
        r = r_t.detach().to(torch.float64).numpy()
        with np.errstate(all="ignore"):  # non-finite values are the caller's to report
            if loss is not None:
                wy_np = wy.detach().to(torch.float64).numpy()
                m_np = m.detach().to(torch.float64).numpy()
                r, s, cost = loss.gauss_newton(m_np, wy_np, np)
                jac = jac * s[:, None]
                return jac.T @ jac, jac.T @ r, float(2 * cost.sum()), (jac, m.detach())
            return jac.T @ jac, jac.T @ r, float(r @ r), (jac, m.detach())
    jtj, jtr, rss = jtj_jtr(fn, theta, x, y, weights, chunk_size, rowwise, loss)
    return jtj.cpu().numpy(), jtr.cpu().numpy(), rss, None


def residual_sum_of_squares(
    fn: Model,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    loss: Any = None,
) -> float:
    """``sum(r**2)`` at theta, accumulated in float64 over chunks (no Jacobian); with a `loss`,
    twice its cost."""
    n = y.shape[0]
    # No Jacobian here: an explicit chunk_size stretches p-fold; the default stays cache-sized.
    p = theta.numel()
    size = chunk_size * max(p, 1) if chunk_size else default_chunk_size(p, theta.device)
    if loss is not None:
        total = torch.zeros((), dtype=torch.float64, device=theta.device)
        with torch.no_grad(), _chunk_threads(theta.device):
            for sl in _chunks(n, size):
                m, wy = fn(theta, x[sl]), y[sl]
                if weights is not None:
                    m, wy = m * weights[sl], wy * weights[sl]
                m, wy = m.to(torch.float64).reshape(-1), wy.to(torch.float64).reshape(-1)
                total += 2 * loss.cost_terms(m, wy, torch).sum()
        return float(total)
    if n <= size and theta.device.type == "cpu":  # one chunk: no accumulator
        with torch.no_grad(), one_thread():
            r = y - fn(theta, x)
            if weights is not None:
                r = r * weights
            r = r.to(torch.float64).reshape(-1)
            return float(r @ r)
    total = torch.zeros((), dtype=torch.float64, device=theta.device)
    with torch.no_grad(), _chunk_threads(theta.device):
        for sl in _chunks(n, size):
            r = y[sl] - fn(theta, x[sl])
            if weights is not None:
                r = r * weights[sl]
            r = r.to(torch.float64).reshape(-1)
            total += r @ r
    return float(total)


def second_derivative_jt(
    fn: Model,
    theta: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    h: float = 0.1,
) -> torch.Tensor:
    """``J^T m_vv`` in float64, with m_vv the second derivative of ``w * fn`` along v.

    m_vv by the central difference ``(m(theta + h v) - 2 m(theta) + m(theta - h v)) / h^2`` and
    J^T m_vv by one reverse pass per chunk: the input of the geodesic acceleration.
    """
    theta = theta.detach()
    n = x.shape[0]
    size = chunk_size or default_chunk_size(theta.numel(), theta.device)
    hv = (h * v).to(theta.dtype)
    out = torch.zeros(theta.numel(), dtype=torch.float64, device=theta.device)
    with _chunk_threads(theta.device):
        for sl in _chunks(n, size):
            model = _weighted_model(fn, x[sl], weights[sl] if weights is not None else None)
            with torch.no_grad():
                m_plus = model(theta + hv)
                m_minus = model(theta - hv)
            with torch.enable_grad():
                t = theta.clone().requires_grad_()
                m0 = model(t)
                m_vv = (m_plus - 2 * m0.detach() + m_minus) / (h * h)
                (g,) = torch.autograd.grad((m0 * m_vv).sum(), t)  # scalar: see _jacobian_columns
            out += g.to(torch.float64).reshape(-1)
    return out


def _second_derivative_jt_kept(
    fn: Model,
    theta: torch.Tensor,
    v: np.ndarray,
    x: torch.Tensor,
    weights: torch.Tensor | None,
    kept: tuple[np.ndarray, torch.Tensor],
    h: float = 0.1,
) -> np.ndarray:
    """`second_derivative_jt` from the J and model values kept at theta by `_normal_equations`:
    two model passes and a numpy product instead of three passes and a reverse pass."""
    jac, m0 = kept
    model = _weighted_model(fn, x, weights)
    hv = torch.from_numpy(h * v).to(theta.dtype)
    with torch.no_grad():
        m_vv = (model(theta + hv) - 2 * m0 + model(theta - hv)) / (h * h)
    with np.errstate(all="ignore"):
        return jac.T @ m_vv.reshape(-1).to(torch.float64).numpy()


def _chunk_threads(device: torch.device):
    """One CPU thread for the chunked loops: a cache-sized chunk's elementwise ops gain little
    from a second thread, and on a busy machine each op's thread barrier waits for a descheduled
    thread (a large fit runs several times slower on two busy cores than on one)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:  # nothing to set (nor restore)
        return _NOTHING
    return one_thread()


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block, the setting restored after it. On busy cores a
    parallel region of a small op waits for a second thread far longer than the op takes (MKL's
    threaded Cholesky of a tiny matrix, by orders of magnitude)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


try:  # numpy.linalg's gufuncs, which `np.linalg.cholesky` and `np.linalg.solve` call
    from numpy.linalg import _umath_linalg

    _CHOLESKY: Any = _umath_linalg.cholesky_lo
    _SOLVE: Any = _umath_linalg.solve1
except (ImportError, AttributeError):  # pragma: no cover - another numpy's layout
    _CHOLESKY = _SOLVE = None


def _solve_damped_np(
    jtj: np.ndarray, jtr: np.ndarray, damping: float, scale2: np.ndarray
) -> np.ndarray:
    """Solve ``(J^T J + damping * diag(scale2)) delta = J^T r`` in float64 (numpy: a few
    microseconds per call where torch's dispatch costs tens).

    The system is solved in the scaled variables ``z = D delta`` (unit-diagonal matrix when
    ``scale2 = diag(J^T J)``) by Cholesky; if that fails (not positive definite to rounding) by a
    symmetric eigendecomposition that drops the null space.
    """
    s = 1.0 / np.sqrt(scale2)
    a = jtj * s[:, None] * s[None, :]
    b = jtr * s
    m = a.copy()
    m.flat[:: a.shape[0] + 1] += damping  # a + damping * I, without building I
    if _CHOLESKY is not None:
        # numpy.linalg's own kernels without its wrappers (most of a call at p x p): the same
        # numbers; a failure is NaN rather than LinAlgError, caught by the finiteness test.
        with np.errstate(all="ignore"):
            chol = _CHOLESKY(m, signature="d->d")
            z = _SOLVE(chol.T, _SOLVE(chol, b, signature="dd->d"), signature="dd->d")
        if np.isfinite(z).all():
            return z * s
    else:  # pragma: no cover - a numpy without those kernels
        try:
            chol = np.linalg.cholesky(m)
            z = np.linalg.solve(chol.T, np.linalg.solve(chol, b))
            if np.isfinite(z).all():
                return z * s
        except np.linalg.LinAlgError:
            pass
    evals, evecs = np.linalg.eigh(a)
    evals = evals + damping
    cutoff = np.abs(evals).max() * a.shape[0] * np.finfo(np.float64).eps
    safe = np.where(evals > cutoff, evals, 1.0)
    inv = np.where(evals > cutoff, 1.0 / safe, 0.0)
    with np.errstate(all="ignore"):  # a non-finite step is rejected by the caller
        z = evecs @ (inv * (evecs.T @ b))
    return z * s


def _trust_region_damping(
    jtj: np.ndarray, jtr: np.ndarray, scale2: np.ndarray, radius: float
) -> float:
    """Moré's ``lmpar``: the damping whose step has ``|D delta| = radius`` (within 10%), or 0
    when the Gauss-Newton step is shorter than that.

    In the scaled variables ``z = D delta`` the system is ``(A + par I) z = b`` with eigenvalues
    e_i and components q_i of b, so ``|z(par)|^2 = sum q_i^2 / (e_i + par)^2`` and the root is
    found by Hebden's safeguarded Newton iteration on ``1/|z| - 1/radius``.
    """
    s = 1.0 / np.sqrt(scale2)
    a = jtj * s[:, None] * s[None, :]
    evals, evecs = np.linalg.eigh(a)
    q2 = (evecs.T @ (jtr * s)) ** 2
    cutoff = max(float(np.abs(evals).max()), 1e-300) * a.shape[0] * np.finfo(np.float64).eps
    keep = evals > cutoff
    gn = math.sqrt(float((q2[keep] / evals[keep] ** 2).sum()))
    if not math.isfinite(gn) or gn <= 1.1 * radius:
        return 0.0
    lo, hi = 0.0, math.sqrt(float(q2.sum())) / radius
    par = hi * 1e-3
    for _ in range(30):
        inv = 1.0 / np.maximum(evals + par, 1e-300)
        znorm = math.sqrt(float((q2 * inv**2).sum()))
        if abs(znorm - radius) <= 0.1 * radius:
            break
        if znorm > radius:
            lo = par
        else:
            hi = par
        slope = float((q2 * inv**3).sum())
        par = par + (znorm - radius) / radius * znorm**2 / slope if slope > 0 else hi
        if not lo < par < hi:
            par = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
    return par


def _norm(v: np.ndarray) -> float:
    """The 2-norm of a vector: what `np.linalg.norm` computes for one (the square root of its
    dot product with itself), without that function's dispatch."""
    return math.sqrt(float(v.dot(v)))


def _host_vector(theta: torch.Tensor) -> np.ndarray:
    """theta as a flat float64 numpy array, read only: a view of a CPU float64 vector (the
    iteration's usual case, without the conversions' dispatch), else a copy."""
    if theta.dtype == torch.float64 and theta.device.type == "cpu" and theta.dim() == 1:
        return theta.detach().numpy()
    return theta.detach().cpu().numpy().astype(np.float64).reshape(-1)


def _like(values: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """A float64 numpy vector as a tensor of ref's dtype, device and shape."""
    out = torch.from_numpy(values)
    if ref.dtype == torch.float64 and ref.device.type == "cpu" and ref.dim() == 1:
        return out
    return out.to(ref.device, ref.dtype).reshape(ref.shape)


def _damping_factor(rho: float) -> float:
    """Nielsen's factor for lambda after an accepted step with gain ratio rho."""
    return max(1 / 3, 1 - (2 * rho - 1) ** 3)


@dataclass
class LMStep:
    """What one Levenberg-Marquardt iteration did."""

    cost: float  # 0.5 * sum(r**2) at theta after this iteration
    accepted: bool
    damping: float  # lambda after this iteration
    converged: bool
    reason: str | None  # why it stopped, when converged
    cost_before: float = math.nan  # 0.5 * sum(r**2) at theta before this iteration


class LevenbergMarquardt:
    """Levenberg-Marquardt for ``min 0.5 * sum((w * (y - fn(theta, x)))**2)``; see the module doc.

    Stops (``converged=True``, with a reason) when polishing steps stop contracting (rounding
    level, the usual end at tight tolerances); when an accepted step reduces the cost by less than
    ``ftol`` relative while the model predicted no more than that either; when the scaled step
    ``|D delta|`` is below ``xtol * (xtol + |D theta|)``; when the largest cosine between a Jacobian
    column and the residual vector is below ``gtol``; when the damping exceeds 1e16 (no decrease
    is possible); or at once, without an exception, if the residuals are non-finite at the start.
    A trial point with non-finite residuals is rejected like any step that raises the cost.

    ``trust_region=True`` picks Moré's trust-region control of the damping (MINPACK lmder: a
    radius on ``|D delta|``, started at 100 |D theta0|) instead of Nielsen's update. A fit not
    converged after ``restart_after`` iterations (None: never), or whose cost falls by a steady
    trickle before that (see `_stalled`), restarts once from theta0 with the trust region and no
    curvature guard: the damped iteration can crawl for thousands of iterations along a curved
    valley (NIST MGH10, start 1) that MINPACK's long steps jump. A fit that stops where the
    column-scaled J^T J is singular restarts once, with the trust region, from a point moved
    along its null space, and keeps the lower of the two ends (`_leave_singular_point`).

    ``loss`` (a `fitcli.losses.Loss`, None: least squares) replaces the cost by that loss's, see
    the module doc; the curvature guard is then off.

    ``max_accel_ratio`` (None to disable) bounds the geodesic-acceleration ratio of steps that
    change some parameter by more than 10%, see `step`. ``theta0`` may be float32 or float64 on
    any device; the model runs in its dtype, the normal equations in float64.
    """

    def __init__(
        self,
        fn: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        theta0: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        ftol: float = 1e-15,
        xtol: float = 1e-15,
        gtol: float = 1e-15,
        damping: float = 1e-3,
        max_accel_ratio: float | None = 0.75,
        chunk_size: int | None = None,
        trust_region: bool = False,
        restart_after: int | None = 1000,
        host: HostModel | None = None,
        loss: Any = None,
    ) -> None:
        self.fn = fn
        # A `fitcli.losses.Loss` other than least squares, minimised in its Gauss-Newton form.
        # The curvature guard's geodesic acceleration is that of the plain residuals: off for it.
        self.loss = loss
        if loss is not None:
            max_accel_ratio = None
        # The numpy model (`HostModel`), used once `host_ok` has checked it at the start; None
        # when there is none or the check failed.
        self.host = host
        self._host_checked = host is None
        self._host_data: tuple[np.ndarray, np.ndarray | None] | None = None
        self.x = x
        self.y = y
        self.weights = weights
        self.theta = theta0.detach().clone()
        self.theta0 = self.theta.clone()
        self.ftol = ftol
        self.xtol = xtol
        self.gtol = gtol
        self.chunk_size = chunk_size
        self.max_accel_ratio = max_accel_ratio
        self.rowwise: bool | None = None
        self.damping = float(damping)
        self.nu = 2.0
        # Moré's trust region (MINPACK lmder): the damping follows from a radius on |D delta|,
        # started at TRUST_FACTOR * |D theta0|; None until the first Jacobian.
        self.trust_region = trust_region
        self.radius: float | None = None
        self.restart_after = restart_after
        self.cost: float | None = None
        self.scale2: np.ndarray | None = None
        self.n_iter = 0
        self.n_fev = 0
        self.n_jev = 0
        self.converged = False
        self.reason: str | None = None
        self.polish_norm: float | None = None
        # The cost every STALL_WINDOW iterations (the last three), for the stall restart.
        self.cost_marks: list[float] = []
        # The singular-point restart (`_leave_singular_point`): where it began (theta, cost,
        # reason) while it runs, and whether it has been tried (once per fit).
        self.singular_from: dict[str, Any] | None = None
        self.singular_restarted = False
        self._jtj: np.ndarray | None = None
        self._jtr: np.ndarray | None = None
        self._pending: tuple | None = None
        self._kept: tuple[np.ndarray, torch.Tensor] | None = None  # J and w * fn at theta
        self._cost_before: float | None = None

    # -- one iteration -------------------------------------------------------------------------

    def step(self) -> LMStep:
        """One LM iteration: build J^T J at theta if stale, solve, try the step, adapt lambda."""
        # On the CPU the whole iteration runs on one thread (see `_chunk_threads`): at NIST's
        # sizes every op is tiny, and a thread barrier on a busy machine costs more than the op.
        # Overflow in a trial's norms or residuals is an outcome the iteration handles (a rejected
        # step, a stop with a reason), not something to warn a user about.
        with _chunk_threads(self.theta.device), np.errstate(all="ignore"):
            return self._step()

    def _step(self) -> LMStep:
        self._cost_before = self.cost
        if self.converged:
            return self._result(accepted=False)
        if self._jtj is None and not self._linearize():
            self._cost_before = self.cost
            return self._result(accepted=False)
        self._cost_before = self.cost
        if (
            not self.trust_region
            and self.restart_after is not None
            and self.polish_norm is None
            and (self.n_iter >= self.restart_after or self._stalled())
        ):
            # Restart: a fit still far from converged after this many iterations, or whose cost
            # has been falling by a steady trickle for 100 iterations, is crawling along a curved
            # valley under damping. Start over from theta0 with Moré's trust region and without
            # the curvature guard, whose long first steps jump the valley (MGH10 from NIST's
            # start 1, as MINPACK does).
            self._restart_trust_region(self.theta0.clone())
            if not self._linearize():
                return self._result(accepted=False)
        self.n_iter += 1
        # The p x p algebra runs in numpy: a few microseconds per call where torch's dispatch
        # costs tens, which is most of an iteration on NIST-sized problems.
        jtj, jtr, scale2 = self._jtj, self._jtr, self.scale2
        cost = self.cost
        # `_linearize` has set them all.
        assert jtj is not None and jtr is not None and scale2 is not None and cost is not None
        d = np.sqrt(scale2)
        theta64 = _host_vector(self.theta)
        theta_norm = _norm(d * theta64)
        radius = self.radius
        if self.trust_region:
            self.radius_fresh = radius is None
            if radius is None:
                radius = TRUST_FACTOR * theta_norm if theta_norm > 0 else TRUST_FACTOR
                self.radius = radius
            self.damping = _trust_region_damping(jtj, jtr, scale2, radius)
        delta = _solve_damped_np(jtj, jtr, self.damping, scale2)
        step_norm = _norm(d * delta)
        if self.trust_region and self.radius_fresh:
            assert radius is not None  # the trust region has its radius from above
            self.radius = min(radius, step_norm)
            self.radius_fresh = False
        # Predicted reduction of the quadratic model: g.d - 0.5 d.A.d.
        predicted = float(jtr @ delta - 0.5 * (delta @ (jtj @ delta)))
        # Polishing: once the model predicts almost nothing (and the step is nearly Gauss-Newton),
        # cost differences are rounding noise, but J^T r still points to the minimum; steps are
        # then taken while they keep contracting, which puts theta where the gradient vanishes.
        # (With the trust region: only for a Gauss-Newton step the radius does not cut short.)
        nearly_gn = self.damping == 0 if self.trust_region else self.damping <= POLISH_DAMPING
        polishing = predicted <= POLISH_RTOL * cost and nearly_gn
        if self.polish_norm is not None and (
            step_norm > POLISH_CONTRACTION * self.polish_norm
            or step_norm <= self.xtol * (self.xtol + theta_norm)
        ):
            return self._stop("Gauss-Newton steps have reached rounding level", False)
        if not polishing and self.max_accel_ratio is not None and self._large_step(delta, theta64):
            # Curvature guard: the geodesic acceleration a (Transtrum & Sethna 2012) is the
            # second-order correction to the step along the model's curvature. A large step whose
            # correction is comparable to itself leaves the region where the linear model holds;
            # it is rejected even if it happens to lower the cost (it lands BoxBOD on a plateau).
            # The guard is a yes/no on a ratio: at large n an evenly strided sample of rows
            # estimates J^T m_vv well enough, at a fraction of three model passes over all rows.
            if self._kept is not None and self.host is not None:
                jt_vv = self._host_second_derivative_jt(theta64, delta)
                self.n_fev += 2
            elif self._kept is not None:
                jt_vv = _second_derivative_jt_kept(
                    self.fn, self.theta, delta, self.x, self.weights, self._kept
                )
                self.n_fev += 2
            else:
                v = torch.from_numpy(delta).to(self.theta.device)
                n = self.x.shape[0]
                stride = -(-n // GUARD_ROWS)
                rows = slice(None, None, stride)
                w = self.weights[rows] if self.weights is not None else None
                sampled = second_derivative_jt(
                    self.fn, self.theta, v, self.x[rows], w, self.chunk_size
                )
                jt_vv = (sampled * (n / self.x[rows].shape[0])).cpu().numpy()
                self.n_fev += 3
            accel = _solve_damped_np(jtj, jt_vv, self.damping, scale2)
            ratio = _norm(d * accel) / step_norm if step_norm else 0.0
            if not (math.isfinite(ratio) and ratio <= self.max_accel_ratio):
                return self._reject(step_norm, theta_norm, curvature=True)
        trial = _like(theta64 + delta, self.theta)
        pending = None
        if self.nu == 2.0 and (self.rowwise or self.host is not None):
            # The last step was accepted, so this one likely is too: linearize at the trial
            # right away. Its pass yields the cost as well, so an accepted trial costs one model
            # pass instead of two (the Jacobian at the new theta re-ran the model); a rejected
            # one wastes a backward pass.
            pending = self._equations(trial)
            self.n_jev += 1
            new_cost = 0.5 * pending[2]
        elif self.host is not None:
            new_cost = 0.5 * self._host_rss(theta64 + delta)
            self.n_fev += 1
        else:
            new_cost = 0.5 * residual_sum_of_squares(
                self.fn, trial, self.x, self.y, self.weights, self.chunk_size, self.loss
            )
            self.n_fev += 1
        actual = cost - new_cost if math.isfinite(new_cost) else -math.inf
        rho = actual / predicted if predicted > 0 else -math.inf
        if polishing and actual >= -POLISH_RTOL * cost:
            self.polish_norm = step_norm
            rho = max(rho, 0.0)
        elif self.trust_region:
            self._update_radius(rho, actual, cost, delta, step_norm)
            if not (rho >= 1e-4 and math.isfinite(new_cost)):
                return self._reject(step_norm, theta_norm, radius_done=True)
        elif not (rho > 0 and math.isfinite(new_cost)):
            return self._reject(step_norm, theta_norm)
        self.theta = trial
        self.cost = new_cost
        self._jtj = self._jtr = self._kept = None
        self._pending = pending
        if not self.trust_region:
            self.damping = max(self.damping * _damping_factor(rho), MIN_DAMPING)
        self.nu = 2.0
        if self.polish_norm is not None:
            return self._result(True)
        if actual <= self.ftol * cost and predicted <= self.ftol * cost:
            return self._stop(f"ftol: relative cost reduction < {self.ftol:g}", True)
        if step_norm <= self.xtol * (self.xtol + theta_norm):
            return self._stop(f"xtol: relative step < {self.xtol:g}", True)
        return self._result(True)

    def _stalled(self) -> bool:
        """Record the cost every STALL_WINDOW iterations; True when the last two windows lowered
        it by less than STALL_RTOL together, by about the same amount each: a steady crawl (MGH10
        from start 1: 9% then 12% over iterations 50-150), unlike the shrinking reductions of a fit
        closing in on its minimum (Bennett5: ratio about 0.5) or the growing ones of a fit
        finding its way out of a flat region (MGH17 from start 1: ratio 1.6-2.5)."""
        if self.n_iter % STALL_WINDOW:
            return False
        assert self.cost is not None  # linearized before any iteration
        self.cost_marks = [*self.cost_marks, self.cost][-3:]
        if len(self.cost_marks) < 3:
            return False
        c0, c1, c2 = self.cost_marks
        lo, hi = STALL_BAND
        first, second = c0 - c1, c1 - c2
        return 0 < c0 - c2 <= STALL_RTOL * c0 and lo * first <= second <= hi * first

    @staticmethod
    def _large_step(delta: np.ndarray, theta: np.ndarray) -> bool:
        """Whether some parameter would change by more than 10% of its value."""
        return bool((np.abs(delta) > 0.1 * np.abs(theta)).any())

    def _update_radius(
        self, rho: float, actual: float, cost: float, delta: np.ndarray, step_norm: float
    ) -> None:
        """MINPACK lmder's radius update from the ratio of actual to predicted reduction."""
        jtj, radius = self._jtj, self.radius
        assert jtj is not None and radius is not None  # a trust-region step at a linearization
        if rho <= 0.25:
            if actual >= 0 or not math.isfinite(actual):
                temp = 0.5
            else:
                # Interpolate the cost along the step (Moré 1978, eq. 8.5) for the shrink factor.
                dirder = -(float(delta @ (jtj @ delta)) + self.damping * step_norm**2) / (2 * cost)
                act = actual / cost
                temp = 0.5 * dirder / (dirder + 0.5 * act) if dirder + 0.5 * act != 0 else 0.1
            if not math.isfinite(actual) or actual < -99 * cost or temp < 0.1:
                temp = 0.1
            self.radius = temp * min(radius, step_norm / 0.1)
        elif self.damping == 0 or rho >= 0.75:
            self.radius = step_norm / 0.5

    def _reject(
        self,
        step_norm: float,
        theta_norm: float,
        *,
        curvature: bool = False,
        radius_done: bool = False,
    ) -> LMStep:
        """A rejected trial: raise lambda (doubling its growth factor) or shrink the trust
        radius, and test for a stall."""
        if self.trust_region:
            radius = self.radius
            assert radius is not None  # set by the first trust-region step
            if not radius_done:
                radius = self.radius = 0.5 * min(radius, step_norm)
            self.nu *= 2.0
            if step_norm <= self.xtol * (self.xtol + theta_norm):
                return self._stop(f"xtol: relative step < {self.xtol:g}", False)
            if radius <= 1e-300:
                return self._stop("trust region vanished: no decrease possible", False)
            return self._result(False)
        self.damping *= self.nu
        self.nu *= 2.0
        if step_norm <= self.xtol * (self.xtol + theta_norm):
            return self._stop(f"xtol: relative step < {self.xtol:g}", False)
        if self.damping > MAX_DAMPING:
            return self._stop("damping too large: no decrease possible", False)
        return self._result(False)

    def _equations(self, theta: torch.Tensor) -> tuple:
        """`_normal_equations` at theta, by the numpy model when there is one."""
        if self.host is not None:
            return self._host_equations(theta.numpy().reshape(-1))
        return _normal_equations(
            self.fn, theta, self.x, self.y, self.weights, self.chunk_size, self.rowwise, self.loss
        )

    def _host_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(w * y, w) as numpy float64, made once."""
        if self._host_data is None:
            y = self.y.detach().reshape(-1).numpy().astype(np.float64)
            w = None
            if self.weights is not None:
                w = self.weights.detach().reshape(-1).numpy().astype(np.float64)
                y = y * w
            self._host_data = (y, w)
        return self._host_data

    def _host_equations(self, theta: np.ndarray) -> tuple:
        host = self.host
        assert host is not None  # the `_host_*` methods run only with a numpy model
        wy, w = self._host_arrays()
        with np.errstate(all="ignore"):  # non-finite values are the caller's to report
            m, jac = host.jacobian(theta)
            if w is not None:
                m = m * w
                jac = jac * w[:, None]
            if self.loss is not None:
                r, s, cost = self.loss.gauss_newton(m, wy, np)
                jac = jac * s[:, None]
                return jac.T @ jac, jac.T @ r, float(2 * cost.sum()), (jac, m)
            r = wy - m
            return jac.T @ jac, jac.T @ r, float(r @ r), (jac, m)

    def _host_rss(self, theta: np.ndarray) -> float:
        host = self.host
        assert host is not None  # the `_host_*` methods run only with a numpy model
        wy, w = self._host_arrays()
        with np.errstate(all="ignore"):
            m = host.value(theta)
            if self.loss is not None:
                m = m * w if w is not None else m
                return float(2 * self.loss.cost_terms(m, wy, np).sum())
            r = wy - (m * w if w is not None else m)
            return float(r @ r)

    def _host_second_derivative_jt(
        self, theta: np.ndarray, v: np.ndarray, h: float = 0.1
    ) -> np.ndarray:
        """`_second_derivative_jt_kept` by the numpy model."""
        host, kept = self.host, self._kept
        assert host is not None and kept is not None  # called only with both (`_step`)
        jac, m0 = kept
        _, w = self._host_arrays()
        with np.errstate(all="ignore"):
            m_plus = host.value(theta + h * v)
            m_minus = host.value(theta - h * v)
            if w is not None:
                m_plus, m_minus = m_plus * w, m_minus * w
            return jac.T @ ((m_plus - 2 * m0 + m_minus) / (h * h))

    def _linearize(self) -> bool:
        """J^T J, J^T r and the cost at theta; False (and converged) at a stopping point."""
        if not self._host_checked:
            self._host_checked = True
            if self.host is not None and not host_ok(self.fn, self.host, self.theta, self.x):
                self.host = None
        if self.rowwise is None and self.host is None:
            self.rowwise = rowwise_ok(self.fn, self.theta, self.x, self.weights)
        if self._pending is not None:  # already built at this theta when it was a trial
            jtj, jtr, rss, self._kept = self._pending
            self._pending = None
        else:
            jtj, jtr, rss, self._kept = self._equations(self.theta)
            self.n_jev += 1
        first = self.cost is None
        self.cost = 0.5 * rss
        if not (math.isfinite(rss) and bool(np.isfinite(jtj).all())):
            where = "at start" if first else "at the current parameters"
            self._stop(f"non-finite residuals or Jacobian {where}", False)
            return False
        diag = np.diagonal(jtj)
        # A column that is zero everywhere gets scale 1 until it ever becomes non-zero (MINPACK).
        diag = np.where(diag > 0, diag, 1.0)
        self.scale2 = diag if self.scale2 is None else np.maximum(self.scale2, diag)
        self._jtj, self._jtr = jtj, jtr
        if rss == 0.0:
            self._stop("exact fit: residuals are zero", False)
            return False
        cosine = np.abs(jtr) / np.sqrt(np.maximum(np.diagonal(jtj), 1e-300) * rss)
        if float(cosine.max()) <= self.gtol:
            self._stop(f"gtol: gradient cosine < {self.gtol:g}", False)
            return False
        return True

    def _restart_trust_region(self, theta: torch.Tensor) -> None:
        """Continue from theta with Moré's trust region, no curvature guard and no further stall
        restart, the damping and scaling started afresh (the restarts of `_step` and `_stop`)."""
        self.trust_region = True
        self.max_accel_ratio = None
        self.radius = None
        self.restart_after = None
        self.theta = theta
        self.scale2 = None
        self.polish_norm = None
        self._jtj = self._jtr = self._pending = self._kept = None
        self.nu = 2.0

    def _stop(self, reason: str, accepted: bool) -> LMStep:
        """Stop with `reason`; but at a singular point (J^T J rank deficient, see
        `_leave_singular_point`), first restart once from a perturbation along its null space,
        and of the two ends keep the lower cost."""
        if self.singular_from is None and not self.singular_restarted:
            if not reason.startswith(_FINAL_STOPS) and self._leave_singular_point(reason):
                return self._result(accepted)
        elif self.singular_from is not None:
            start = self.singular_from
            self.singular_from = None
            if self.cost is not None and self.cost < start["cost"]:
                reason = f"{reason}, after a restart that left a singular point"
            else:
                # The restart ended no lower: back to where it began.
                ref = self.theta
                self.theta = torch.tensor(start["theta"], dtype=ref.dtype, device=ref.device)
                self.theta = self.theta.reshape(ref.shape)
                self.cost = start["cost"]
                reason = (
                    f"{start['reason']}; a restart along the null space of J^T J ended no lower"
                )
                self._jtj = self._jtr = self._pending = self._kept = None
        self.converged = True
        self.reason = reason
        return self._result(accepted)

    def _leave_singular_point(self, reason: str) -> bool:
        """At a stop where the column-scaled J^T J is singular (an eigenvalue below
        SINGULAR_RCOND of the largest), restart with the trust region from theta moved along
        the sum of its null vectors by 1% of |D theta| (0.1%, 0.01% if that point's residuals
        are not finite); False, changing nothing, where J^T J is regular or no such point is.

        Such a point is typically a saddle that the exact Jacobian cannot leave: two terms of
        the same form that have met (``a*log(x + 1 + b) + c*log(x + 1 + d)`` at a = c, b = d)
        keep meeting, since the gradient has no component that tells them apart. MINPACK's
        finite-difference Jacobian breaks that symmetry by its rounding; the perturbation
        breaks it on purpose. Where the model itself cannot tell the parameters apart
        (a duplicated basis column) the restart ends at the same cost and `_stop` keeps the
        first end.
        """
        if self._jtj is not None:
            jtj = self._jtj
        elif self._pending is not None:  # the equations at theta, built when it was a trial
            jtj = self._pending[0]
        else:
            jtj = self._equations(self.theta)[0]
            self.n_jev += 1
        if not np.isfinite(jtj).all():
            return False
        diag = np.diagonal(jtj)
        d = np.sqrt(np.where(diag > 0, diag, 1.0))
        evals, evecs = np.linalg.eigh(jtj / d[:, None] / d[None, :])
        top = float(evals.max())
        small = evals <= SINGULAR_RCOND * top if top > 0 else np.ones_like(evals, dtype=bool)
        if not small.any():
            return False
        v = evecs[:, small].sum(axis=1)
        v = v / np.linalg.norm(v)
        theta64 = self.theta.detach().cpu().numpy().astype(np.float64).reshape(-1)
        size = float(np.linalg.norm(d * theta64)) or 1.0
        for frac in (1e-2, 1e-3, 1e-4):
            moved = theta64 + frac * size * v / d
            trial = torch.from_numpy(moved).to(self.theta.device, self.theta.dtype)
            trial = trial.reshape(self.theta.shape)
            if self.host is not None:
                rss = self._host_rss(moved)
            else:
                rss = residual_sum_of_squares(
                    self.fn, trial, self.x, self.y, self.weights, self.chunk_size, self.loss
                )
            self.n_fev += 1
            if math.isfinite(rss):
                break
        else:
            return False
        self.singular_from = {
            "theta": [float(t) for t in theta64],
            "cost": self.cost,
            "reason": reason,
        }
        self.singular_restarted = True
        # self.cost stays the cost at the singular point until the next step linearizes at the
        # new theta: it is the cost of the parameters this iteration began from.
        self._restart_trust_region(trial)
        return True

    def _result(self, accepted: bool) -> LMStep:
        cost = self.cost if self.cost is not None else math.nan
        before = self._cost_before if self._cost_before is not None else math.nan
        return LMStep(cost, accepted, self.damping, self.converged, self.reason, before)

    def reset_theta(self, theta: torch.Tensor) -> None:
        """Continue from another theta (set from outside): J^T J and the cost are rebuilt there."""
        self.theta = theta.detach().clone().to(dtype=self.theta.dtype, device=self.theta.device)
        self.cost = None
        self.polish_norm = None
        self._jtj = self._jtr = self._pending = self._kept = None

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as JSON-able floats and lists."""

        def finite(v: float | None) -> float | None:
            return v if v is not None and math.isfinite(v) else None

        return {
            "theta": [float(v) for v in self.theta.detach().cpu().reshape(-1).tolist()],
            "damping": self.damping,
            "nu": self.nu,
            "cost": finite(self.cost),
            "scale2": None if self.scale2 is None else [float(v) for v in self.scale2],
            "n_iter": self.n_iter,
            "n_fev": self.n_fev,
            "n_jev": self.n_jev,
            "converged": self.converged,
            "reason": self.reason,
            "polish_norm": self.polish_norm,
            "cost_marks": list(self.cost_marks),
            "radius": self.radius,
            "trust_region": self.trust_region,
            "restart_after": self.restart_after,
            "singular_from": self.singular_from,
            "singular_restarted": self.singular_restarted,
            "max_accel_ratio": self.max_accel_ratio,
            "theta0": [float(v) for v in self.theta0.detach().cpu().reshape(-1).tolist()],
            "ftol": self.ftol,
            "xtol": self.xtol,
            "gtol": self.gtol,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; J^T J is rebuilt at the restored theta on the next step."""
        ref = self.theta
        self.theta = torch.tensor(state["theta"], dtype=ref.dtype, device=ref.device).reshape(
            ref.shape
        )
        self.damping = float(state["damping"])
        self.nu = float(state.get("nu", 2.0))
        self.cost = state.get("cost")
        scale2 = state.get("scale2")
        self.scale2 = None if scale2 is None else np.asarray(scale2, dtype=np.float64)
        self.n_iter = int(state.get("n_iter", 0))
        self.n_fev = int(state.get("n_fev", 0))
        self.n_jev = int(state.get("n_jev", 0))
        self.converged = bool(state.get("converged", False))
        self.reason = state.get("reason")
        self.polish_norm = state.get("polish_norm")
        self.cost_marks = [float(c) for c in state.get("cost_marks", [])]
        self.radius = state.get("radius")
        self.trust_region = bool(state.get("trust_region", self.trust_region))
        self.restart_after = state.get("restart_after", self.restart_after)
        self.singular_from = state.get("singular_from")
        self.singular_restarted = bool(state.get("singular_restarted", False))
        self.max_accel_ratio = state.get("max_accel_ratio", self.max_accel_ratio)
        if state.get("theta0") is not None:
            self.theta0 = torch.tensor(state["theta0"], dtype=ref.dtype, device=ref.device).reshape(
                ref.shape
            )
        for key in ("ftol", "xtol", "gtol"):
            if key in state:
                setattr(self, key, float(state[key]))
        self._jtj = self._jtr = self._pending = self._kept = None
