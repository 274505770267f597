"""Levenberg-Marquardt on many independent least-squares problems at once: one tensor program
with a leading lane dimension.

Every grouped fit, profile or bootstrap refit and simulated replicate in fitcli is a batch of
small problems of the same model: lane b minimizes ``|r_b(theta_b)|^2`` over theta_b [p] (some
entries held fixed per lane). `solve` runs them as one program: residuals [B, n] and the Jacobian
[B, n, p] come from a `Lanes` object (which owns the data, its padding and weights), and each
lane has its own damping, stopping test, iteration count and status. The steps are those of
`fitcli.lm` (Moré's scaling by the running maximum of diag(J^T J), Nielsen's damping update,
MINPACK's gtol / ftol / xtol tests, and the polishing of nearly Gauss-Newton steps until they
stop contracting), so a lane ends where a single fit of the same problem ends.

Three things make it fast where a few lanes need many iterations:

- the Jacobian is taken at the trial point together with its residuals (one pass of the
  model per iteration, not a residual pass and then a Jacobian pass): a step is accepted far
  more often than not, and a rejected lane's linearization is simply not kept;
- active-lane compaction: the lanes still running are gathered into a smaller block
  (`Lanes.take`) once the stopped ones are a tenth of it, so later iterations compute only
  those;
- very large batches run block by block (`chunk` lanes), so that a block's arrays stay near the
  CPU caches and its memory bounded.

Nothing here is specific to a device or a dtype: the model runs in theta's dtype, the normal
equations in float64; the only host synchronisations are one per iteration (is any lane left,
should the block shrink) and the final statuses. Lanes that evaluate in numpy (``host``, e.g.
the profile refits of a small problem, whose model and Jacobian come from `fitcli.symdiff`)
run the same steps in numpy arrays: `solve` chooses the arrays once (`_Torch` or `_Numpy`,
the few operations the two spell differently), since on a few dozen lanes of a few dozen
residuals an iteration's cost is its some 150 operations' dispatch, which numpy's is a fraction
of. Not here: the curvature guard, the restarts and the trust region of `fitcli.lm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
import torch

from fitcli.lm import (
    _CHOLESKY,
    _SOLVE,
    MAX_DAMPING,
    MIN_DAMPING,
    POLISH_CONTRACTION,
    POLISH_DAMPING,
    POLISH_RTOL,
)

# A block is compacted when its running lanes fall below this fraction of it, if it has at
# least this many residuals (lanes x rows): below that, an iteration's cost is the per-operation
# overhead, which gathering the running lanes only adds to.
COMPACT_BELOW = 0.9
COMPACT_MIN_CELLS = 20_000


class _Torch:
    """The array operations of the core that numpy and torch spell differently: torch's."""

    lib = torch

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def full(self, shape: tuple[int, ...], value: float, dtype: Any = torch.float64) -> Any:
        return torch.full(shape, value, dtype=dtype, device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: Any = torch.float64) -> Any:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def eye(self, q: int, like: Any) -> Any:
        return torch.eye(q, dtype=like.dtype, device=like.device)

    def arange(self, lo: int, hi: int) -> Any:
        return torch.arange(lo, hi, device=self.device)

    def f64(self, t: Any) -> Any:
        return t.to(torch.float64)

    def like(self, t: Any, ref: Any) -> Any:
        return t.to(ref.dtype)

    def clamp_min(self, t: Any, v: float) -> Any:
        return torch.clamp_min(t, v)

    def diagonal(self, a: Any) -> Any:
        return torch.diagonal(a, dim1=-2, dim2=-1)

    def amax(self, t: Any) -> Any:
        return t.amax(-1)

    def norm(self, t: Any) -> Any:
        return torch.linalg.vector_norm(t, dim=-1)

    def finite_rows(self, t: Any) -> Any:
        return torch.isfinite(t).flatten(1).all(1)

    def nonzero(self, t: Any) -> Any:
        return torch.nonzero(t)[:, 0]

    def cholesky_solve(self, m: Any, rhs: Any) -> tuple[Any, Any]:
        chol, info = torch.linalg.cholesky_ex(m)
        return torch.cholesky_solve(rhs, chol), info != 0

    def rows_finite(self, z: Any) -> Any:
        return torch.isfinite(z).flatten(-2).all(-1)

    def nan_to_num(self, t: Any) -> Any:
        return torch.nan_to_num(t)


class _Numpy:
    """The same in numpy float64 on the CPU: for lanes that evaluate in numpy (`Lanes.host`),
    where torch's per-operation dispatch, not arithmetic, is what an iteration of a few dozen
    lanes of a few dozen residuals costs."""

    lib = np

    def full(self, shape: tuple[int, ...], value: float, dtype: Any = np.float64) -> Any:
        return np.full(shape, value, dtype=_NP_DTYPE.get(dtype, dtype))

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float64) -> Any:
        return np.zeros(shape, dtype=_NP_DTYPE.get(dtype, dtype))

    def eye(self, q: int, like: Any) -> Any:
        return np.eye(q, dtype=like.dtype)

    def arange(self, lo: int, hi: int) -> Any:
        return np.arange(lo, hi)

    def f64(self, t: Any) -> Any:
        return t.astype(np.float64, copy=False)

    def like(self, t: Any, ref: Any) -> Any:
        return t.astype(ref.dtype, copy=False)

    def clamp_min(self, t: Any, v: float) -> Any:
        return np.maximum(t, v)

    def diagonal(self, a: Any) -> Any:
        return np.diagonal(a, axis1=-2, axis2=-1)

    def amax(self, t: Any) -> Any:
        return t.max(-1)

    def norm(self, t: Any) -> Any:
        return np.sqrt((t * t).sum(-1))

    def finite_rows(self, t: Any) -> Any:
        return np.isfinite(t).reshape(t.shape[0], -1).all(1)

    def nonzero(self, t: Any) -> Any:
        return np.flatnonzero(t)

    def cholesky_solve(self, m: Any, rhs: Any) -> tuple[Any, Any]:
        if _CHOLESKY is not None and rhs.shape[-1] == 1:
            # numpy.linalg's kernels without their wrappers (`fitcli.lm`'s host path): a
            # failed factorization is NaN in its own lane rather than an error for all.
            with np.errstate(all="ignore"):
                chol = _CHOLESKY(m, signature="d->d")
                half = _SOLVE(chol, rhs[..., 0], signature="dd->d")
                z = _SOLVE(chol.swapaxes(-1, -2), half, signature="dd->d")[..., None]
            return z, ~np.isfinite(chol).reshape(m.shape[0], -1).all(1)
        with np.errstate(all="ignore"):
            try:
                np.linalg.cholesky(m)
                bad = np.zeros(m.shape[0], dtype=bool)
            except np.linalg.LinAlgError:  # which ones: each on its own
                bad = np.ones(m.shape[0], dtype=bool)
                for k in range(m.shape[0]):
                    with contextlib.suppress(np.linalg.LinAlgError):
                        np.linalg.cholesky(m[k])
                        bad[k] = False
            # L L^T z = rhs by two solves with the triangular factors.
            # Cholesky tells which systems are positive definite; those are solved directly.
            if not bad.any():
                return np.linalg.solve(m, rhs), bad
            z = np.full(rhs.shape, np.nan)
            good = ~bad
            if good.any():
                z[good] = np.linalg.solve(m[good], rhs[good])
        return z, bad

    def rows_finite(self, z: Any) -> Any:
        return np.isfinite(z).reshape(z.shape[0], -1).all(-1)

    def nan_to_num(self, t: Any) -> Any:
        return t if np.isfinite(t).all() else np.nan_to_num(t)


_NP_DTYPE: dict[Any, Any] = {torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_}


class Lanes(Protocol):
    """The problems of a batch: what `solve` evaluates. Lanes with a true ``host`` attribute
    evaluate in numpy: `take` gets a numpy int array and `linearize` a float64 array, and
    returns numpy arrays; the solve then runs in numpy too (`_Numpy`)."""

    def take(self, idx: Any) -> Lanes:
        """The same problems restricted to the lanes `idx` (a long tensor), in that order."""
        ...

    def linearize(self, theta: Any) -> tuple[Any, Any]:
        """(residuals [b, n], Jacobian d r / d theta up to sign [b, n, p]) at theta [b, p]:
        the solve minimizes ``|r|^2`` with the Gauss-Newton step ``(J^T J)^-1 J^T r``, so J
        is the Jacobian of the model, ``r = y - f``. Masked rows are zero in both."""
        ...


class Stop(IntEnum):
    """Why a lane stopped (RUNNING: it has not)."""

    RUNNING = 0
    GTOL = 1
    FTOL = 2
    XTOL = 3
    ROUNDING = 4
    EXACT = 5
    DECREMENT = 6
    DAMPING = 7
    NONFINITE_START = 8
    NONFINITE = 9
    LIMIT = 10
    INTERRUPTED = 11


# Stops at a minimum (to the tolerances; consecutive codes); DAMPING is decided by the caller.
CONVERGED = (Stop.GTOL, Stop.FTOL, Stop.XTOL, Stop.ROUNDING, Stop.EXACT, Stop.DECREMENT)
FAILED = (Stop.NONFINITE_START, Stop.NONFINITE)


@dataclass
class LMOptions:
    """Tolerances of the tests of `fitcli.lm`, the start damping and the iteration limit."""

    ftol: float = 1e-15
    xtol: float = 1e-15
    gtol: float = 1e-15
    damping: float = 1e-3
    max_iter: int = 500


def reason(code: int, opts: LMOptions, iterations: int) -> str:
    """The words of a stop (groups.csv's `reason`)."""
    s = Stop(code)
    return {
        Stop.GTOL: f"gtol: gradient cosine < {opts.gtol:g}",
        Stop.FTOL: f"ftol: relative cost reduction < {opts.ftol:g}",
        Stop.XTOL: f"xtol: relative step < {opts.xtol:g}",
        Stop.ROUNDING: "Gauss-Newton steps have reached rounding level",
        Stop.EXACT: "exact fit: residuals are zero",
        Stop.DECREMENT: "the Gauss-Newton decrement is below its tolerance",
        Stop.DAMPING: "damping too large: no decrease possible",
        Stop.NONFINITE_START: "non-finite residuals or Jacobian at start",
        Stop.NONFINITE: "non-finite residuals or Jacobian at the current parameters",
        Stop.LIMIT: f"iteration limit: not converged in {opts.max_iter} iterations",
        Stop.INTERRUPTED: f"interrupted after {iterations} iterations",
        Stop.RUNNING: "",
    }[s]


@dataclass
class Solution:
    """Per lane: the final parameters [B, p] (theta's dtype), damping [B], iterations [B] of
    this call, stop code [B] (`Stop`), 0.5 * RSS [B], and the normal equations J^T J [B, p, p]
    and J^T r [B, p] of all parameters (held ones included) at the final parameters (float64;
    NaN where a lane never had a finite linearization); and the rest of each lane's LM state
    (nu, scale2, polish: a `Carry` for a later call to continue exactly)."""

    theta: torch.Tensor
    damping: torch.Tensor
    iterations: torch.Tensor
    code: torch.Tensor
    cost: torch.Tensor
    jtj: torch.Tensor
    jtr: torch.Tensor
    nu: torch.Tensor
    scale2: torch.Tensor
    polish: torch.Tensor

    def converged(self) -> torch.Tensor:
        """Lanes stopped at a minimum by one of the convergence tests [B] bool."""
        return (self.code >= min(CONVERGED)) & (self.code <= max(CONVERGED))


@dataclass
class Carry:
    """The LM state of each lane besides its parameters and damping: the growth of the damping
    after rejections nu [B], Moré's scaling (the running maximum of diag(J^T J)) scale2 [B, p],
    and the scaled length of the last polishing step polish [B] (NaN before polishing). A call
    given a lane's carry (and its damping) continues where the call that returned it stopped,
    as one uninterrupted call would."""

    nu: torch.Tensor
    scale2: torch.Tensor
    polish: torch.Tensor

    @staticmethod
    def start(b: int, p: int) -> Carry:
        """The state of lanes that have not started: nu 2, no scaling, no polishing."""
        f64 = torch.float64
        return Carry(
            torch.full((b,), 2.0, dtype=f64),
            torch.zeros((b, p), dtype=f64),
            torch.full((b,), math.nan, dtype=f64),
        )


def damped_solve(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Solve ``(a + lam I) z = b`` for a batch of symmetric q x q systems (b [..., q] or
    [..., q, m]); Cholesky, or a symmetric eigendecomposition dropping the null space where
    Cholesky fails."""
    return _damped_solve(_Torch(a.device), a, b, lam)


def _damped_solve(ops: Any, a: Any, b: Any, lam: Any) -> Any:
    """`damped_solve` in the arrays of `ops` (`_Torch` or `_Numpy`)."""
    xp = ops.lib
    q = a.shape[-1]
    m = a + lam[..., None, None] * ops.eye(q, a)
    vec = b.ndim == a.ndim - 1
    rhs = b[..., None] if vec else b
    z, bad = ops.cholesky_solve(m, rhs)
    bad = bad | ~ops.rows_finite(z)
    if bool(bad.any()):
        evals, evecs = xp.linalg.eigh(ops.nan_to_num(m[bad]))
        cutoff = ops.clamp_min(ops.amax(abs(evals))[..., None], 1e-300) * q * 2.2e-16
        inv = xp.where(evals > cutoff, 1.0 / ops.clamp_min(evals, 1e-300), 0.0)
        z[bad] = evecs @ (inv[..., None] * (evecs.swapaxes(-1, -2) @ rhs[bad]))
    return z[..., 0] if vec else z


def normal_equations(
    r: torch.Tensor, jac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J^T J [b, p, p], J^T r [b, p], 0.5 * RSS [b]), summed in J's dtype (a float32 fit's
    sums are float32, ten times faster than converting J first), returned in float64. J as a
    transposed view of a [b, p, n] tensor is read fastest."""
    return _normal_equations(_Torch(jac.device), r, jac)


def _normal_equations(ops: Any, r: Any, jac: Any) -> tuple[Any, Any, Any]:
    jt = jac.swapaxes(-1, -2)
    jtj = ops.f64(jt @ jac)
    jtr = ops.f64((jt @ ops.like(r[..., None], jt))[..., 0])
    return jtj, jtr, ops.f64(0.5 * (r * r).sum(-1))


def solve(
    lanes: Lanes,
    theta0: torch.Tensor,
    opts: LMOptions,
    *,
    free: torch.Tensor | None = None,
    damping: torch.Tensor | None = None,
    decrement_tol: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    chunk: int | None = None,
    carry: Carry | None = None,
) -> Solution:
    """Levenberg-Marquardt on every lane of `lanes` from theta0 [B, p] (module doc).

    `free` [B, p] bool: the entries each lane fits (the others stay at theta0's values; None:
    all). `damping` [B]: each lane's start damping (None: ``opts.damping``), e.g. the damping a
    previous call returned, to continue it. `decrement_tol` [B]: a lane also stops (DECREMENT)
    where its Gauss-Newton step would lower 0.5 * RSS by at most this. `should_stop` is called
    once per iteration; on True the call returns at once, the lanes still running stopped as
    INTERRUPTED with their current values and damping. `chunk`: lanes per block (None: all).
    `carry`: each lane's state from a previous call (its Solution's nu, scale2 and polish; None:
    the start's)."""
    nb, p = theta0.shape
    dev = theta0.device
    f64 = torch.float64
    host = bool(getattr(lanes, "host", False))
    ops: Any = _Numpy() if host else _Torch(dev)
    # The one place the arrays are chosen: numpy copies for host lanes, torch otherwise.
    arr = (lambda t: t.detach().cpu().numpy().copy()) if host else (lambda t: t.detach().clone())  # noqa: E731
    theta = arr(theta0)
    free_t = None if free is None else arr(free.to(dev).bool())
    lam = (
        ops.full((nb,), opts.damping) if damping is None else arr(damping.to(device=dev, dtype=f64))
    )
    tol = None if decrement_tol is None else arr(decrement_tol.to(device=dev, dtype=f64))
    i64 = torch.int64
    start = Carry.start(nb, p) if carry is None else carry
    out = Solution(
        theta,
        lam,
        ops.zeros((nb,), i64),
        ops.full((nb,), int(Stop.RUNNING), i64),
        ops.full((nb,), math.nan),
        ops.full((nb, p, p), math.nan),
        ops.full((nb, p), math.nan),
        *(arr(t.to(device=dev, dtype=f64)) for t in (start.nu, start.scale2, start.polish)),
    )
    size = nb if chunk is None else max(1, int(chunk))
    interrupted = False
    # numpy warns where torch is silent: non-finite values are the stopping tests' to report.
    with np.errstate(all="ignore") if host else contextlib.nullcontext():
        for lo in range(0, nb, size):
            idx = ops.arange(lo, min(nb, lo + size))
            if interrupted:
                out.code[idx] = int(Stop.INTERRUPTED)
                continue
            interrupted = _solve_block(
                ops, lanes.take(idx), idx, out, free_t, tol, opts, should_stop
            )
    if host:
        fields = {f.name: torch.from_numpy(getattr(out, f.name)) for f in dataclasses.fields(out)}
        out = Solution(**fields)
    return out


@dataclass
class _Block:
    """The state of the lanes `idx` (positions in the whole batch) of one block."""

    idx: torch.Tensor
    lanes: Lanes
    theta: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    scale2: torch.Tensor
    cost: torch.Tensor
    polish: torch.Tensor
    jtj: torch.Tensor
    jtr: torch.Tensor
    a: torch.Tensor  # J^T J and J^T r of the free entries (`_masked`)
    g: torch.Tensor
    free: torch.Tensor | None
    tol: torch.Tensor | None
    code: torch.Tensor
    iters: torch.Tensor

    def write(self, out: Solution, sel: torch.Tensor | None = None) -> None:
        """Into `out`: the lanes at the block positions `sel` (None: all)."""
        pick = (lambda t: t) if sel is None else (lambda t: t[sel])  # noqa: E731
        i = pick(self.idx)
        out.theta[i], out.damping[i], out.cost[i] = map(pick, (self.theta, self.lam, self.cost))
        out.jtj[i], out.jtr[i] = pick(self.jtj), pick(self.jtr)
        out.code[i], out.iterations[i] = pick(self.code), pick(self.iters)
        out.nu[i], out.scale2[i], out.polish[i] = (
            pick(self.nu),
            pick(self.scale2),
            pick(self.polish),
        )

    def keep(self, sel: torch.Tensor) -> _Block:
        """The lanes at the block positions `sel` (a long tensor) only, problems included."""
        values: dict[str, Any] = {
            name: None if getattr(self, name) is None else getattr(self, name)[sel]
            for name in _STATE
        }
        return _Block(lanes=self.lanes.take(sel), **values)


_STATE = [f.name for f in dataclasses.fields(_Block) if f.name != "lanes"]


def _masked(ops: Any, jtj: Any, jtr: Any, free: Any | None) -> tuple[Any, Any]:
    """The normal equations of the free entries: held rows and columns replaced by the
    identity's, their gradient by zero (so their step is zero); as they are with no mask."""
    if free is None:
        return jtj, jtr
    f = ops.like(free, jtj)
    eye = ops.eye(jtj.shape[-1], jtj)
    return jtj * f[:, :, None] * f[:, None, :] + eye * (1 - f)[:, None, :], jtr * f


def _check(ops: Any, blk: _Block, new: Any, first: bool, opts: LMOptions) -> None:
    """The tests at a fresh linearization of the lanes `new` [b] bool: non-finite (failed),
    exact fit, gtol, the decrement; and the scaling's running maximum."""
    xp = ops.lib
    a, g = blk.a, blk.g
    rss = 2 * blk.cost
    finite = xp.isfinite(rss) & ops.finite_rows(blk.jtj)
    bad = new & ~finite
    blk.code[bad] = int(Stop.NONFINITE_START if first else Stop.NONFINITE)
    diag = ops.diagonal(a)
    upd = xp.maximum(blk.scale2, xp.where(diag > 0, diag, 1.0))
    blk.scale2 = xp.where(new[:, None], upd, blk.scale2)
    ok = new & finite
    blk.code[ok & (rss == 0)] = int(Stop.EXACT)
    d_raw = ops.clamp_min(diag, 1e-300)
    cosine = ops.amax(abs(g) / xp.sqrt(d_raw * rss[:, None]))
    blk.code[ok & (rss > 0) & (cosine <= opts.gtol) & (blk.code == 0)] = int(Stop.GTOL)
    if blk.tol is not None:
        d = xp.sqrt(d_raw)
        gn = _damped_solve(
            ops, ops.nan_to_num(a / d[:, :, None] / d[:, None, :]), g / d, blk.lam * 0
        )
        dec = 0.5 * ((gn / d) * g).sum(-1)
        blk.code[ok & (dec <= blk.tol) & (blk.code == 0)] = int(Stop.DECREMENT)


def _solve_block(
    ops: Any,
    lanes: Lanes,
    idx: Any,
    out: Solution,
    free: Any | None,
    tol: Any | None,
    opts: LMOptions,
    should_stop: Callable[[], bool] | None,
) -> bool:
    """LM on the lanes `idx` of `out` (written back there); True if interrupted."""
    b = idx.shape[0]
    theta = out.theta[idx]
    r, jac = lanes.linearize(theta)
    rows = r.shape[-1]
    jtj, jtr, cost = _normal_equations(ops, r, jac)
    held = None if free is None else free[idx]
    masked = _masked(ops, jtj, jtr, held)
    i64 = torch.int64
    blk = _Block(
        idx,
        lanes,
        theta,
        out.damping[idx],
        out.nu[idx],
        out.scale2[idx],
        cost,
        out.polish[idx],
        jtj,
        jtr,
        masked[0],
        masked[1],
        held,
        None if tol is None else tol[idx],
        ops.zeros((b,), i64),
        ops.zeros((b,), i64),
    )
    _check(ops, blk, ops.full((b,), True, torch.bool), True, opts)
    interrupted = False
    for _ in range(opts.max_iter):
        run = blk.code == 0
        n_run = int(run.sum())
        if n_run == 0:
            break
        if n_run < COMPACT_BELOW * run.shape[0] and run.shape[0] * rows >= COMPACT_MIN_CELLS:
            blk.write(out, ops.nonzero(~run))  # the stopped lanes, as they are
            blk = blk.keep(ops.nonzero(run))
            run = ops.full((n_run,), True, torch.bool)
        if should_stop is not None and should_stop():
            interrupted = True
            break
        _iterate(ops, blk, run, opts)
    blk.code[blk.code == 0] = int(Stop.INTERRUPTED if interrupted else Stop.LIMIT)
    blk.write(out)
    return interrupted


def _iterate(ops: Any, blk: _Block, run: Any, opts: LMOptions) -> None:
    """One LM iteration of the running lanes of a block (the others are computed, not kept)."""
    xp = ops.lib
    blk.iters += run
    a, g = blk.a, blk.g
    d = xp.sqrt(blk.scale2)
    sc = 1.0 / d
    z = _damped_solve(ops, ops.nan_to_num(a * sc[:, :, None] * sc[:, None, :]), g * sc, blk.lam)
    delta = ops.nan_to_num(z * sc)
    th64 = ops.f64(blk.theta)
    step_norm = ops.norm(d * delta)
    theta_norm = ops.norm(d * th64)
    c = blk.cost
    predicted = (g * delta).sum(-1) - 0.5 * (delta * (a @ delta[..., None])[..., 0]).sum(-1)
    polishing = (predicted <= POLISH_RTOL * c) & (blk.lam <= POLISH_DAMPING)
    xsmall = step_norm <= opts.xtol * (opts.xtol + theta_norm)
    polished = xp.isfinite(blk.polish)
    rounding = run & polished & ((step_norm > POLISH_CONTRACTION * blk.polish) | xsmall)
    trial = ops.like(th64 + delta, blk.theta)
    jtj_t, jtr_t, new = _normal_equations(ops, *blk.lanes.linearize(trial))
    actual = xp.where(xp.isfinite(new), c - new, -math.inf)
    rho = xp.where(predicted > 0, actual / predicted, -math.inf)
    pol_ok = run & polishing & (actual >= -POLISH_RTOL * c) & ~rounding
    rho = xp.where(pol_ok, ops.clamp_min(rho, 0.0), rho)
    accept = run & ~rounding & (pol_ok | ((rho > 0) & xp.isfinite(new)))
    reject = run & ~rounding & ~accept
    # Accepted: move (with the linearization taken there), Nielsen's damping update.
    blk.theta = xp.where(accept[:, None], trial, blk.theta)
    blk.cost = xp.where(accept, new, c)
    blk.jtj = xp.where(accept[:, None, None], jtj_t, blk.jtj)
    blk.jtr = xp.where(accept[:, None], jtr_t, blk.jtr)
    if blk.free is None:
        blk.a, blk.g = blk.jtj, blk.jtr
    else:
        a_t, g_t = _masked(ops, jtj_t, jtr_t, blk.free)
        blk.a = xp.where(accept[:, None, None], a_t, a)
        blk.g = xp.where(accept[:, None], g_t, g)
    factor = ops.clamp_min(1 - (2 * rho - 1) ** 3, 1 / 3)
    lam = xp.where(accept, ops.clamp_min(blk.lam * factor, MIN_DAMPING), blk.lam)
    nu = xp.where(accept, 2.0, blk.nu)
    blk.polish = xp.where(pol_ok, step_norm, blk.polish)
    plain = accept & ~xp.isfinite(blk.polish)
    ftol = plain & (actual <= opts.ftol * c) & (predicted <= opts.ftol * c)
    xt = plain & ~ftol & xsmall
    # Rejected: raise the damping, doubling its growth.
    blk.lam = xp.where(reject, lam * nu, lam)
    blk.nu = xp.where(reject, nu * 2.0, nu)
    code = blk.code
    code[rounding] = int(Stop.ROUNDING)
    code[ftol] = int(Stop.FTOL)
    code[xt | (reject & xsmall)] = int(Stop.XTOL)
    code[reject & ~xsmall & (blk.lam > MAX_DAMPING)] = int(Stop.DAMPING)
    # The tests of the next iteration's linearization, for the lanes that moved and go on.
    _check(ops, blk, accept & (code == 0), False, opts)
