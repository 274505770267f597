"""Intervals beyond the covariance: profile likelihood and bootstrap, as batched refits.

Both methods are many least-squares refits of the same model; here they run as one tensor
program with a leading lane dimension (`_refit`: `fitcli.lm_batch.solve` over ``theta [B, p]``,
each lane with its own data weights, its own y and its own held parameter), so that their cost
is a few dozen batched model evaluations instead of hundreds of sequential fits. A small
problem on the CPU in float64 refits in numpy lanes (`_HostLanes`, which `lm_batch` runs in
numpy arrays): an expression without ties or one-sided bounds through the symdiff Jacobian of
all lanes at once (`_LanesModel`, checked against torch), any other model through torch's
Jacobian; there an iteration's cost is per-operation overhead, which numpy's is a fraction of.

Profile likelihood (``method: profile``), the F-test of lmfit's ``conf_interval``: with
``S(v)`` the least-squares RSS when parameter i is held at v and the others are refitted,
``S_min`` the minimum and n - p degrees of freedom, the interval at level L is where

    S(v) <= S_min * (1 + F^-1(L; 1, n - p) / (n - p))

Every (parameter, direction, level) is one lane. Each lane solves
``h(u) = sqrt(S(u) - S_min) = sqrt(dS_L)`` for the held parameter's internal value u by
safeguarded Newton steps, using ``dS/du = -2 J_i^T r`` at the refitted point (no extra
evaluations), and warm-starts the refit of the others along the local profile trace
``d theta_o / du = -(J_o^T J_o)^-1 J_o^T J_i``. For a model linear in its parameters h is
linear in u and the first guess, ``u_hat ± sqrt(dS_L (J^T J)^-1_ii)``, is exact: the interval
is the covariance's t-interval. Ends may be asymmetric; an end the profile does not reach
inside the parameter's bounds (or at all) is None, with a note.

Bootstrap (``method: bootstrap``): B resamples refitted from the least-squares estimate, and
percentile intervals ``[q_{(1-L)/2}, q_{(1+L)/2}]`` of the refitted values. Residual resampling
(the default) keeps x and adds to the fit resampled residuals, centred and rescaled by
``sqrt(n / (n - p))`` (Davison & Hinkley 1997, eq. 6.9; weighted residuals ``w r`` when the data
have sigma); case resampling draws (x, y, sigma) rows with replacement, as weights: a row drawn
k times enters the sum of squares with weight k. The draws come from `resample_indices`.

Pure: no printing, no files. Least squares only (the F-test and the residuals assume it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fitcli import lm_batch
from fitcli.errors import InputError
from fitcli.lm import SMALL_ROWS, HostModel, host_ok, one_thread, rowwise_ok
from fitcli.lm_batch import LMOptions
from fitcli.model import ExprModel, FitModel, model_function

# The methods computed here (`compute`); covariance intervals are the run's error bars.
COMPUTED = ("profile", "bootstrap", "mcmc")
METHODS = ("covariance", *COMPUTED)
RESAMPLING = ("residual", "case")
# Lanes of one batched refit are sized so that its Jacobian ([lanes, n, p] float64) stays near
# this many bytes; more lanes run as several batches one after another.
LANE_BYTES = 256_000_000
# A refit stops where the Gauss-Newton step would lower the cost 0.5*RSS by less than this
# fraction of it (bootstrap and the estimate's polish), or, in a profile, by less than
# PROFILE_TOL of the F-test's increment of the cost.
REFIT_RTOL = 1e-15
PROFILE_TOL = 1e-8
MAX_REFIT_ITER = 200
# A profile end is found when sqrt(S - S_min) is within this relative distance of its target:
# the end's distance from the estimate is then good to about as many digits.
PROFILE_RTOL = 1e-7
MAX_PROFILE_STEPS = 200
# Residuals (lanes x rows) up to which a refit of a small problem runs in numpy lanes.
HOST_CELLS = 200_000
# A profile refit not converged after this many iterations counts as beyond the end.
PROFILE_ITER = 40
# The start damping of a profile refit at a new point (a warm start near its minimum).
PROFILE_DAMPING = 1e-6
# Rounds of PROFILE_ITER iterations a refit above the target may take before it counts as
# beyond the end.
STALLS = 3
# Doublings of the distance from the estimate before an end is declared out of reach.
MAX_EXPANSIONS = 40


class IntervalError(InputError):
    """The intervals cannot be computed for this fit (the message says why); exit 2."""


@dataclass
class Problem:
    """A fitted least-squares problem: a float64 model at its fitted parameters and its data."""

    model: FitModel
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor | None = None  # 1/sigma

    def __post_init__(self) -> None:
        self.x = self.x.to(torch.float64)
        self.y = self.y.to(torch.float64).reshape(-1)
        if self.weights is not None:
            self.weights = self.weights.to(torch.float64).reshape(-1)
        self.n = int(self.y.numel())
        self.p = len(self.model.free_names)
        self._fn = model_function(self.model)
        theta = self.model.raw.detach()
        self.rowwise = rowwise_ok(self._fn, theta, self.x, self.weights)
        self.host = _host_model(self)

    def values(self, theta: torch.Tensor) -> torch.Tensor:
        """The model at x for each lane of theta [B, p] (internal values): [B, n]."""
        with torch.no_grad():
            return self.model.predict(theta, self.x).expand(theta.shape[0], self.n)

    def jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, n], d values / d theta [B, n, p]) for each lane of theta [B, p]."""
        b = theta.shape[0]
        if self.rowwise:
            # One reverse pass: leaf k is theta[:, k] expanded over the rows, so the gradient of
            # sum(values) with respect to it is column k of every lane's Jacobian.
            leaves = [
                theta[:, k, None].detach().expand(b, self.n).clone().requires_grad_()
                for k in range(self.p)
            ]
            with torch.enable_grad():
                # An expression takes its output's shape from x: x (n, or n x k) for every lane.
                x = self.x.expand(b, *self.x.shape) if isinstance(self.model, ExprModel) else self.x
                m = self._fn(leaves, x).expand(b, self.n)
                grads = torch.autograd.grad(m.sum(), leaves, allow_unused=True)
            cols = [torch.zeros_like(m) if g is None else g for g in grads]
            return m.detach(), torch.stack(cols, dim=-1)
        if self.p == 0:
            return self.values(theta), theta.new_zeros(b, self.n, 0)
        cols = []
        for k in range(self.p):
            # Forward mode, one pass per parameter, for models the one-pass form cannot take.
            tangent = torch.zeros_like(theta)
            tangent[:, k] = 1.0
            out = torch.func.jvp(lambda t: self.model.predict(t, self.x), (theta,), (tangent,))
            cols.append(out[1].expand(b, self.n))
        return out[0].detach().expand(b, self.n), torch.stack(cols, dim=-1).detach()

    def external(self, theta: np.ndarray) -> np.ndarray:
        """Free parameters' values from internal theta [B, p]."""
        with torch.no_grad():
            return self.model.external(torch.from_numpy(np.ascontiguousarray(theta))).numpy()


class _LanesModel(HostModel):
    """The model and its exact Jacobian in numpy for many parameter vectors at once
    (`fitcli.symdiff.compile_lanes`), for a small expression model without ties or one-sided
    bounds on the CPU in float64: there torch's per-operation dispatch and its reverse pass,
    not arithmetic, are what a refit costs. Two-sided bounds go through the single fit's
    transform (`fitcli.lm_optim.NumpyModel.external`, one row per parameter over the lanes).
    `build` checks it against torch (`fitcli.lm.host_ok`, as the single fit's numpy path is
    checked) and returns None where it does not hold."""

    def __init__(self, model: ExprModel, x: torch.Tensor) -> None:
        from fitcli.lm_optim import NumpyModel
        from fitcli.symdiff import compile_lanes

        single = NumpyModel(model, x)
        self._single = single
        self.x, self.fixed, self.free_names = single.x, single.fixed, single.free_names
        self._lanes = compile_lanes(model.expression, self.free_names)

    @classmethod
    def build(cls, model: FitModel, x: torch.Tensor, fn: Any) -> _LanesModel | None:
        theta = model.raw.detach()
        if not (
            isinstance(model, ExprModel)
            and not model._ties
            and not any(i.free and (i.min is None) != (i.max is None) for i in model.infos)
        ):
            return None
        try:
            host = cls(model, x)
        except Exception:  # an expression the numpy path cannot take: stay with torch
            return None
        return host if host_ok(fn, host, theta, x) else None

    def lanes(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values [B, n], d values / d theta [B, n, p]) at theta [B, p]."""
        ext, slope = self._single.external(theta.T)  # [p, B]: each parameter over the lanes
        values: dict[str, Any] = dict(self.fixed)
        for k, name in enumerate(self.free_names):
            values[name] = ext[k, :, None]
        m, jac = self._lanes(self.x, values, theta.shape[0])
        return (m, jac) if slope is None else (m, jac * slope.T[:, None, :])

    def value(self, theta: np.ndarray) -> np.ndarray:
        return self.lanes(theta[None, :])[0][0]

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, jac = self.lanes(theta[None, :])
        return m[0], jac[0]


class _TorchLanesModel:
    """`_LanesModel`'s `lanes` by torch's Jacobian (`Problem.jacobian`), for a small CPU
    problem symdiff does not take (bounds, ties, a basis): the refit's bookkeeping still runs
    in numpy."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob

    def lanes(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, jac = self.prob.jacobian(torch.from_numpy(theta))
        return m.numpy(), jac.numpy()


def _host_model(prob: Problem) -> _LanesModel | _TorchLanesModel | None:
    """How a small problem on the CPU in float64 is evaluated in numpy lanes (None: too large,
    or not on the CPU in float64: torch lanes)."""
    theta = prob.model.raw.detach()
    if not (prob.x.device.type == "cpu" and theta.dtype == torch.float64 and prob.n <= SMALL_ROWS):
        return None
    return _LanesModel.build(prob.model, prob.x, prob._fn) or _TorchLanesModel(prob)


class _HostLanes:
    """`_Lanes` in numpy, on the model's `_LanesModel`: `fitcli.lm_batch.solve` runs these in
    numpy (``host``)."""

    host = True

    def __init__(
        self, model: _LanesModel | _TorchLanesModel, wy: np.ndarray, w: np.ndarray | None
    ) -> None:
        self.model, self.wy, self.w = model, wy, w

    def take(self, idx: np.ndarray) -> _HostLanes:
        pick = lambda t: t if t is None or t.ndim == 1 else t[idx]  # noqa: E731
        return _HostLanes(self.model, pick(self.wy), pick(self.w))

    def linearize(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            m, jac = self.model.lanes(theta)
            if self.w is not None:
                m = m * self.w
                jac = jac * self.w[..., None]
            return self.wy - m, jac

    def cost(self, theta: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        lanes = self if idx is None else self.take(idx)
        with np.errstate(all="ignore"):
            m = self.model.lanes(theta)[0]
            if lanes.w is not None:
                m = m * lanes.w
            r = lanes.wy - m
            return 0.5 * (r * r).sum(-1)


def _lanes(prob: Problem, wy: torch.Tensor, w: torch.Tensor | None) -> _Lanes | _HostLanes:
    """The lanes of a refit: numpy lanes for a small problem (`_host_model`) in a batch of up
    to HOST_CELLS residuals; beyond that the arithmetic, not the per-operation overhead, is
    what counts, and torch spreads it over the CPU's threads."""
    if prob.host is None or (wy.dim() == 2 and wy.numel() > HOST_CELLS):
        return _Lanes(prob, wy, w)
    return _HostLanes(prob.host, wy.numpy(), None if w is None else w.numpy())


class _Lanes:
    """Each lane's weighted observations ``w * y`` and weights ``w``: [n] when shared, [B, n]
    when each lane has its own (bootstrap), as torch tensors; the lanes of
    `fitcli.lm_batch.solve`."""

    def __init__(self, prob: Problem, wy: torch.Tensor, w: torch.Tensor | None) -> None:
        self.prob, self.wy, self.w = prob, wy, w

    def take(self, idx: torch.Tensor) -> _Lanes:
        pick = lambda t: t if t is None or t.dim() == 1 else t[idx]  # noqa: E731
        return _Lanes(self.prob, pick(self.wy), pick(self.w))

    def linearize(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w y - w f [B, n], d (w f) / d theta [B, n, p]) at theta [B, p]."""
        m, jac = self.prob.jacobian(theta)
        if self.w is not None:
            m = m * self.w
            jac = jac * self.w[..., None]
        return self.wy - m, jac

    def cost(self, theta: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        """0.5 * RSS [B] at theta for the lanes idx (None: all)."""
        lanes = self if idx is None else self.take(torch.from_numpy(idx))
        m = self.prob.values(torch.from_numpy(theta))
        if lanes.w is not None:
            m = m * lanes.w
        r = lanes.wy - m
        return 0.5 * (r * r).sum(-1).numpy()


@dataclass
class Refit:
    """The end of a batched refit, per lane (numpy float64)."""

    theta: np.ndarray  # [B, p] internal
    rss: np.ndarray  # [B] weighted residual sum of squares
    jtj: np.ndarray  # [B, p, p] of all parameters (held ones included), at theta
    jtr: np.ndarray  # [B, p]
    converged: np.ndarray  # [B] bool
    damping: np.ndarray  # [B] where each lane's LM ended (to continue it)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve the batch of symmetric systems a x = b ([B, p, p], [B, p]) in unit-diagonal
    scaling; a lane whose matrix is singular gets the pseudo-inverse solution."""
    with np.errstate(all="ignore"):
        d = np.sqrt(np.maximum(np.diagonal(a, axis1=-2, axis2=-1), 1e-300))
        s = a / d[:, :, None] / d[:, None, :]
        rhs = b / d
        try:
            z = np.linalg.solve(s, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            z = np.empty_like(rhs)
            for k in range(s.shape[0]):
                if not (np.isfinite(s[k]).all() and np.isfinite(rhs[k]).all()):
                    z[k] = np.nan
                    continue
                try:
                    z[k] = np.linalg.solve(s[k], rhs[k])
                except np.linalg.LinAlgError:
                    z[k] = np.linalg.pinv(s[k], hermitian=True) @ rhs[k]
        return z / d


def _inverse(jtj: np.ndarray) -> np.ndarray:
    """(J^T J)^-1 [p, p], the pseudo-inverse taken in unit-diagonal scaling: unscaled, its
    cut-off relative to the largest eigenvalue drops the variance of a parameter whose column
    is small next to another's (Misra1c's b1, 1e-13 of b2's diagonal)."""
    d = np.sqrt(np.maximum(np.diagonal(jtj), 1e-300))
    scaled = np.linalg.pinv(jtj / d[:, None] / d[None, :], hermitian=True)
    return scaled / d[:, None] / d[None, :]


# A refit's LM: the only tests are its decrement tolerance and the rounding level of polished
# Gauss-Newton steps (ftol, xtol and gtol off).
REFIT = LMOptions(ftol=0.0, xtol=0.0, gtol=0.0, damping=1e-3, max_iter=MAX_REFIT_ITER)


def _refit(
    lanes: _Lanes | _HostLanes,
    theta: np.ndarray,
    free: np.ndarray,
    tol: np.ndarray,
    *,
    damping: float | np.ndarray = 1e-3,
    max_iter: int = MAX_REFIT_ITER,
) -> Refit:
    """Minimize ``|w y - w f(theta)|^2`` on every lane at once (`fitcli.lm_batch.solve`) over
    the entries of theta [B, p] where `free` [B, p] is True (the others stay as given). A
    lane converges where its Gauss-Newton step would lower 0.5*RSS by at most `tol` [B] (or
    its polished steps reach rounding level); damping too large or `max_iter` iterations
    leave it unconverged."""
    lam = np.broadcast_to(np.asarray(damping, dtype=np.float64), theta.shape[:1]).copy()
    sol = lm_batch.solve(
        lanes,
        torch.from_numpy(np.array(theta, dtype=np.float64)),
        dataclasses.replace(REFIT, max_iter=max_iter),
        free=torch.from_numpy(np.asarray(free, dtype=bool)),
        damping=torch.from_numpy(lam),
        decrement_tol=torch.from_numpy(np.asarray(tol, dtype=np.float64)),
    )
    return Refit(
        sol.theta.numpy(),
        2 * sol.cost.numpy(),
        sol.jtj.numpy(),
        sol.jtr.numpy(),
        sol.converged().numpy(),
        sol.damping.numpy(),
    )


def _batches(n: int, p: int, lanes: int) -> int:
    """Lanes per batch for a problem of n rows and p parameters."""
    return max(1, min(lanes, LANE_BYTES // max(1, 8 * n * (p + 2))))


def _shared(prob: Problem) -> _Lanes | _HostLanes:
    w = prob.weights
    return _lanes(prob, prob.y * w if w is not None else prob.y, w)


def _polish(prob: Problem) -> Refit:
    """The least-squares minimum from the model's parameters: one lane, every parameter free."""
    theta = prob.model.raw.detach().to(torch.float64).numpy()[None, :].copy()
    lanes = _shared(prob)
    tol = REFIT_RTOL * lanes.cost(theta, None)
    return _refit(lanes, theta, np.ones_like(theta, dtype=bool), tol)


def _levels(levels: float | Sequence[float]) -> list[float]:
    out = [float(levels)] if isinstance(levels, int | float) else [float(v) for v in levels]
    if not out:
        raise IntervalError("level: give at least one level")
    for v in out:
        if not 0 < v < 1:
            raise IntervalError(f"level: must be between 0 and 1 (got {v:g})")
    return sorted(set(out))


def _check(prob: Problem) -> None:
    if prob.p == 0:
        raise IntervalError("the model has no free parameters")
    if prob.n <= prob.p:
        raise IntervalError(
            f"{prob.n} points for {prob.p} free parameters leave no degrees of freedom"
        )


def _estimate_doc(prob: Problem, fit: Refit) -> tuple[dict[str, float], list[str]]:
    """The estimate the intervals are about, and a note when it is not the fitted values."""
    names = list(prob.model.free_names)
    est = prob.external(fit.theta)[0]
    fitted = prob.external(prob.model.raw.detach().to(torch.float64).numpy()[None, :])[0]
    notes = []
    if not bool(fit.converged[0]):
        notes.append("the refit to the least-squares minimum did not converge")
    # Standard errors in external units by the delta method through the bounds' transform.
    h = 1e-7 * np.maximum(np.abs(fit.theta[0]), 1.0)
    slope = (prob.external(fit.theta + np.diag(h)) - est) / h
    cov = _inverse(fit.jtj[0])
    s2 = float(fit.rss[0]) / (prob.n - prob.p)
    se = np.sqrt(np.maximum(s2 * np.diagonal(cov), 0.0)) * np.abs(np.diagonal(slope))
    moved = [n for k, n in enumerate(names) if abs(est[k] - fitted[k]) > 0.01 * se[k]]
    if moved:
        notes.append(
            "the run's parameters were not at the least-squares minimum (they moved by more "
            f"than 0.01 standard errors: {', '.join(moved)}); the intervals are about the minimum"
        )
    return {n: float(v) for n, v in zip(names, est, strict=True)}, notes


def profile(prob: Problem, levels: float | Sequence[float] = 0.95) -> dict[str, Any]:
    """Profile-likelihood intervals of every free parameter (see the module doc)."""
    from scipy import stats as sps  # noqa: F401 - imported before the clock starts (slow)

    t0 = time.perf_counter()
    levs = _levels(levels)
    _check(prob)
    with one_thread():
        fit = _polish(prob)
        doc = _profile(prob, fit, levs)
    doc["elapsed_s"] = time.perf_counter() - t0
    return doc


def _profile(prob: Problem, fit: Refit, levs: list[float]) -> dict[str, Any]:
    from scipy import stats as sps

    n, p = prob.n, prob.p
    dof = n - p
    estimate, notes = _estimate_doc(prob, fit)
    s_min = float(fit.rss[0])
    hat = fit.theta[0]
    cov = _inverse(fit.jtj[0])  # (J^T J)^-1 in internal coordinates
    # Lanes: (parameter, direction, level).
    lanes = [(i, d, lv) for i in range(p) for d in (-1.0, 1.0) for lv in levs]
    nb = len(lanes)
    rows_all = np.arange(nb)
    par = np.array([i for i, _, _ in lanes])
    direction = np.array([d for _, d, _ in lanes])
    f_ppf = {lv: float(sps.f.ppf(lv, 1, dof)) for lv in levs}
    target_ds = np.array([s_min * f_ppf[lv] / dof for _, _, lv in lanes])
    goal = np.sqrt(target_ds)  # sqrt(S - S_min) at the end
    free = np.ones((nb, p), dtype=bool)
    free[rows_all, par] = False
    cii = np.maximum(cov[par, par], 0.0)
    u_hat = hat[par]
    with np.errstate(all="ignore"):
        # First guess: the quadratic approximation, and the others along its profile trace.
        dist = np.sqrt(target_ds * cii)
        dist = np.where(np.isfinite(dist) & (dist > 0), dist, 1e-3 * (np.abs(u_hat) + 1))
        slope = cov[:, par].T / np.where(cii > 0, cii, 1.0)[:, None]  # d theta / d u_i
        slope = np.where(np.isfinite(slope), slope, 0.0)
    slope[rows_all, par] = 1.0
    theta = hat[None, :] + slope * (direction * dist)[:, None]
    lanes_data = _shared(prob)
    tol = PROFILE_TOL * 0.5 * target_ds
    # Bracket of the end's distance from the estimate: inside (S below the target), outside
    # (above; inf until one is seen).
    inner = np.zeros(nb)
    outer = np.full(nb, np.inf)
    found = np.zeros(nb, dtype=bool)
    expansions = np.zeros(nb, dtype=np.int64)
    stalls = np.zeros(nb, dtype=np.int64)
    halvings = np.zeros(nb, dtype=np.int64)
    active = np.ones(nb, dtype=bool)
    # Each lane's last converged refit (the estimate at first) and the profile trace there:
    # every new trial point is warm-started from it, never from a refit that failed.
    anchor = np.repeat(hat[None, :], nb, axis=0)
    anchor_slope = slope.copy()
    anchor_dist = np.zeros(nb)
    lam = np.full(nb, PROFILE_DAMPING)
    for _ in range(MAX_PROFILE_STEPS):
        idx = rows_all[active]
        if not idx.size:
            break
        res = _refit(
            lanes_data, theta[idx], free[idx], tol[idx], damping=lam[idx], max_iter=PROFILE_ITER
        )
        theta[idx] = res.theta
        k = par[idx]
        rows = np.arange(idx.size)
        conv = res.converged
        with np.errstate(all="ignore"):
            h = np.sqrt(np.maximum(res.rss - s_min, 0.0))
            # d S / d u_i = -2 J_i^T r; along the lane's direction, d h / d dist:
            dh = -res.jtr[rows, k] * direction[idx] / np.maximum(h, 1e-300)
            g = goal[idx]
            close = conv & (np.abs(h - g) <= PROFILE_RTOL * g)
            # An unfinished refit's RSS bounds the profile's from above: below the target it
            # is inside all the same. Above it, the refit continues from where it stopped
            # (`pending`) for up to STALLS rounds. A point is beyond the end only when its
            # refit converged not far above the target; a refit that does not converge, or
            # that ends far above (a stray minimum), makes the lane step back halfway to its
            # anchor instead, so that it walks out from the estimate in smaller steps.
            inside = h < g
            stalls[idx] += ~conv & ~inside
            pending = ~conv & ~inside & (stalls[idx] <= STALLS)
            beyond = conv & ~inside & (h <= 2 * g)
            back = ~inside & ~pending & ~beyond
            stalls[idx[~pending]] = 0
            # A refit that goes on continues its LM where it stopped, damping included.
            lam[idx] = np.where(pending, res.damping, PROFILE_DAMPING)
            now = dist[idx]
            inner[idx] = np.where(inside, np.maximum(inner[idx], now), inner[idx])
            outer[idx] = np.where(beyond, np.minimum(outer[idx], now), outer[idx])
            newton = now + (g - h) / dh
            ok = conv & np.isfinite(newton) & (dh > 0) & ~back
            ok &= (newton > inner[idx]) & (newton < outer[idx])
            bracketed = np.isfinite(outer[idx])
            fallback = np.where(bracketed, 0.5 * (inner[idx] + outer[idx]), 2 * now)
            fallback = np.where(back, 0.5 * (anchor_dist[idx] + now), fallback)
            new = np.where(ok, newton, fallback)
            new = np.where(pending, now, new)
        expansions[idx] += ~ok & ~bracketed & ~pending & ~back
        halvings[idx] += back
        lost = ~np.isfinite(new) | (expansions[idx] > MAX_EXPANSIONS)
        lost |= halvings[idx] > MAX_EXPANSIONS
        lost |= ~np.isfinite(u_hat[idx] + direction[idx] * new)
        lost |= bracketed & (outer[idx] - inner[idx] <= 1e-12 * outer[idx])  # no end between
        found[idx[close]] = True
        stop = close | lost
        active[idx[stop]] = False
        # Converged refits near the profile (not a stray minimum far above it) become the
        # anchors, with the profile trace at them: d theta_o / du = -(J_o^T J_o)^-1 J_o^T J_i.
        near = conv & (h <= 2 * g)
        ci, cr = idx[near], rows[near]
        if ci.size:
            fo = free[ci].astype(np.float64)
            a = res.jtj[cr] * fo[:, :, None] * fo[:, None, :]
            a += np.eye(p)[None] * (1 - fo)[:, None]
            col = res.jtj[cr, :, par[ci]] * fo
            trace = -_solve(a, col)
            trace[np.arange(ci.size), par[ci]] = 1.0
            anchor[ci] = res.theta[cr]
            anchor_slope[ci] = np.where(np.isfinite(trace), trace, 0.0)
            anchor_dist[ci] = dist[ci]
        keep = ~stop
        if not keep.any():
            break
        cont = idx[keep & pending]
        ki = idx[keep & ~pending]
        theta[cont] = res.theta[rows[keep & pending]]
        if not ki.size:
            continue
        new = new[keep & ~pending]
        du = (new - anchor_dist[ki]) * direction[ki]
        # Warm start along the trace, or with the others left at the anchor where that fits
        # better (the trace is a linearization, poor far from its anchor).
        along = anchor[ki] + anchor_slope[ki] * du[:, None]
        flat = anchor[ki].copy()
        flat[np.arange(ki.size), par[ki]] = along[np.arange(ki.size), par[ki]]
        sel = None if ki.size == nb else ki
        with np.errstate(all="ignore"):
            c_along = lanes_data.cost(along, sel)
            c_flat = lanes_data.cost(flat, sel)
        better = ~(c_along <= c_flat)
        theta[ki] = np.where(better[:, None], flat, along)
        theta[ki, par[ki]] = u_hat[ki] + direction[ki] * new
        dist[ki] = new
    ends = prob.external(theta)
    names = list(prob.model.free_names)
    out: dict[str, Any] = {}
    unreached: list[str] = []
    for i, name in enumerate(names):
        entries = []
        for lv in levs:
            pair: dict[str, Any] = {"level": lv}
            for b, (j, d, lev) in enumerate(lanes):
                if j != i or lev != lv:
                    continue
                key = "lower" if d < 0 else "upper"
                pair[key] = float(ends[b, i]) if found[b] else None
                if not found[b]:
                    unreached.append(f"{name} {key} at {lv:g}")
            entries.append(pair)
        out[name] = {"estimate": estimate[name], "intervals": entries}
    if unreached:
        notes.append(
            "the profile does not reach the level within the parameter's range for: "
            + "; ".join(unreached)
            + " (those ends are null)"
        )
    return {
        "method": "profile",
        "levels": levs,
        "statistic": "F-test, n - p degrees of freedom (as lmfit's conf_interval)",
        "n_points": n,
        "n_params": p,
        "params": out,
        "notes": notes,
    }


def resample_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """The bootstrap's draws: [samples, n] row indices in 0..n-1, from numpy's PCG64 `seed`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(samples, n))


def bootstrap(
    prob: Problem,
    levels: float | Sequence[float] = 0.95,
    *,
    samples: int = 1000,
    resampling: str = "residual",
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap percentile intervals of every free parameter (see the module doc)."""
    t0 = time.perf_counter()
    levs = _levels(levels)
    _check(prob)
    if resampling not in RESAMPLING:
        raise IntervalError(f"resampling: {resampling!r} is not one of {', '.join(RESAMPLING)}")
    if samples < 10:
        raise IntervalError(f"samples: must be at least 10 (got {samples})")
    n, p = prob.n, prob.p
    with one_thread() if n * samples < 1_000_000 else contextlib.nullcontext():
        fit = _polish(prob)
        estimate, notes = _estimate_doc(prob, fit)
        values = refit_resamples(prob, fit.theta[0], resample_indices(n, samples, seed), resampling)
    ok = np.isfinite(values).all(axis=1)
    if not ok.all():
        notes.append(f"{int((~ok).sum())} of {samples} refits did not converge; left out")
    good = values[ok]
    names = list(prob.model.free_names)
    out: dict[str, Any] = {}
    for k, name in enumerate(names):
        entries = []
        for lv in levs:
            if good.shape[0] == 0:
                entries.append({"level": lv, "lower": None, "upper": None})
                continue
            lower, upper = np.quantile(good[:, k], [(1 - lv) / 2, (1 + lv) / 2])
            entries.append({"level": lv, "lower": float(lower), "upper": float(upper)})
        std = float(good[:, k].std(ddof=1)) if good.shape[0] > 1 else None
        out[name] = {"estimate": estimate[name], "std": std, "intervals": entries}
    return {
        "method": "bootstrap",
        "levels": levs,
        "resampling": resampling,
        "samples": samples,
        "seed": seed,
        "converged": int(ok.sum()),
        "n_points": n,
        "n_params": p,
        "params": out,
        "notes": notes,
        "elapsed_s": time.perf_counter() - t0,
    }


def refit_resamples(
    prob: Problem, theta_hat: np.ndarray, indices: np.ndarray, resampling: str
) -> np.ndarray:
    """The free parameters refitted to each resample (rows of `indices`), from theta_hat
    (internal): [samples, p] external values, NaN for a refit that did not converge."""
    n, p = prob.n, prob.p
    f64 = torch.float64
    w = prob.weights
    m_hat = prob.values(torch.from_numpy(theta_hat[None, :]))[0]
    wm = m_hat * w if w is not None else m_hat
    wy0 = prob.y * w if w is not None else prob.y
    resid = wy0 - wm  # weighted residuals
    scale = 0.5 * float(resid @ resid)
    centred = (resid - resid.mean()) * math.sqrt(n / (n - p))
    idx_all = torch.from_numpy(np.ascontiguousarray(indices))
    out = np.full((indices.shape[0], p), np.nan)
    per = _batches(n, p, indices.shape[0])
    for start in range(0, indices.shape[0], per):
        idx = idx_all[start : start + per]
        nb = idx.shape[0]
        if resampling == "residual":
            lanes = _lanes(prob, wm[None, :] + centred[idx], w)
        else:
            counts = torch.zeros(nb, n, dtype=f64)
            counts.scatter_add_(1, idx, torch.ones(nb, n, dtype=f64))
            root = torch.sqrt(counts)
            lane_w = root if w is None else root * w[None, :]
            lanes = _lanes(prob, prob.y[None, :] * lane_w, lane_w)
        theta = np.repeat(theta_hat[None, :], nb, axis=0)
        tol = np.full(nb, REFIT_RTOL * scale)
        res = _refit(lanes, theta, np.ones((nb, p), dtype=bool), tol)
        ext = prob.external(res.theta)
        ext[~res.converged] = np.nan
        out[start : start + nb] = ext
    return out


def check_loss(loss: Any) -> None:
    """Profile and bootstrap intervals are for least squares: the config's loss must be mse."""
    name = loss if isinstance(loss, str) else getattr(loss, "name", None)
    if name != "mse":
        raise IntervalError(
            f"profile and bootstrap intervals need least squares (loss: mse); this fit's loss "
            f"is {name}"
        )


def compute(
    prob: Problem,
    method: str,
    levels: float | Sequence[float] = 0.95,
    *,
    samples: int = 1000,
    resampling: str = "residual",
    seed: int = 0,
    absolute: bool = False,
    walkers: int | None = None,
    steps: int | None = None,
    burn: int | None = None,
) -> dict[str, Any]:
    """`profile`, `bootstrap` or `mcmc` (`fitcli.mcmc`) by name: the document intervals.json
    holds. `absolute`: the data's sigma is absolute (the MCMC likelihood's noise is known)."""
    if method == "profile":
        return profile(prob, levels)
    if method == "bootstrap":
        return bootstrap(prob, levels, samples=samples, resampling=resampling, seed=seed)
    if method == "mcmc":
        from fitcli import mcmc

        return mcmc.sample(
            prob,
            _levels(levels),
            absolute=absolute,
            walkers=walkers,
            steps=mcmc.DEFAULT_STEPS if steps is None else steps,
            burn=burn,
            seed=seed,
        )
    raise IntervalError(
        f"method: {method!r} is not one of profile, bootstrap, mcmc (covariance intervals are "
        "the error bars of summary.json)"
    )


def for_config(
    prob: Problem,
    cfg: Any,
    method: str,
    *,
    weighted: bool,
    level: float | Sequence[float] | None = None,
    samples: int | None = None,
    resampling: str | None = None,
    seed: int | None = None,
    walkers: int | None = None,
    steps: int | None = None,
    burn: int | None = None,
) -> dict[str, Any]:
    """`compute` with a config's settings: each given argument, or else the config's
    `uncertainty` one; the seed from the config's seed (`seed_of`); the MCMC likelihood's noise
    known where the data are `weighted` by a sigma column taken as absolute."""
    spec = cfg.uncertainty

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return compute(
        prob,
        method,
        given(level, spec.level),
        samples=given(samples, spec.samples),
        resampling=given(resampling, spec.resampling),
        seed=given(seed, seed_of(cfg.seed, method)),
        absolute=weighted and cfg.data.absolute_sigma is not False,
        walkers=given(walkers, spec.walkers),
        steps=given(steps, spec.steps),
        burn=given(burn, spec.burn),
    )


def seed_of(config_seed: int, method: str) -> int:
    """The seed of a method's random draws, from the config's seed (bootstrap resamples and
    MCMC walkers draw from streams of their own)."""
    from fitcli.data import seed_streams

    return seed_streams(config_seed)["mcmc" if method == "mcmc" else "bootstrap"]
