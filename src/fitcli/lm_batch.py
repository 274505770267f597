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
should the block shrink) and the final statuses. Not here: the curvature guard, the restarts
and the trust region of `fitcli.lm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import torch

from fitcli.lm import MAX_DAMPING, MIN_DAMPING, POLISH_CONTRACTION, POLISH_DAMPING, POLISH_RTOL

# A block is compacted when its running lanes fall below this fraction of it, if it has at
# least this many residuals (lanes x rows): below that, an iteration's cost is the per-operation
# overhead, which gathering the running lanes only adds to.
COMPACT_BELOW = 0.9
COMPACT_MIN_CELLS = 20_000


class Lanes(Protocol):
    """The problems of a batch: what `solve` evaluates."""

    def take(self, idx: torch.Tensor) -> Lanes:
        """The same problems restricted to the lanes `idx` (a long tensor), in that order."""
        ...

    def linearize(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    NaN where a lane never had a finite linearization)."""

    theta: torch.Tensor
    damping: torch.Tensor
    iterations: torch.Tensor
    code: torch.Tensor
    cost: torch.Tensor
    jtj: torch.Tensor
    jtr: torch.Tensor

    def converged(self) -> torch.Tensor:
        """Lanes stopped at a minimum by one of the convergence tests [B] bool."""
        return (self.code >= min(CONVERGED)) & (self.code <= max(CONVERGED))


def damped_solve(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Solve ``(a + lam I) z = b`` for a batch of symmetric q x q systems (b [..., q] or
    [..., q, m]); Cholesky, or a symmetric eigendecomposition dropping the null space where
    Cholesky fails."""
    q = a.shape[-1]
    eye = torch.eye(q, dtype=a.dtype, device=a.device)
    m = a + lam[..., None, None] * eye
    vec = b.dim() == a.dim() - 1
    rhs = b[..., None] if vec else b
    chol, info = torch.linalg.cholesky_ex(m)
    z = torch.cholesky_solve(rhs, chol)
    bad = (info != 0) | ~torch.isfinite(z).flatten(-2).all(-1)
    if bool(bad.any()):
        evals, evecs = torch.linalg.eigh(torch.nan_to_num(m[bad]))
        cutoff = evals.abs().amax(-1, keepdim=True).clamp_min(1e-300) * q * 2.2e-16
        inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(1e-300), 0.0)
        z[bad] = evecs @ (inv[..., None] * (evecs.transpose(-1, -2) @ rhs[bad]))
    return z[..., 0] if vec else z


def normal_equations(
    r: torch.Tensor, jac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J^T J [b, p, p], J^T r [b, p], 0.5 * RSS [b]), summed in J's dtype (a float32 fit's
    sums are float32, ten times faster than converting J first), returned in float64. J as a
    transposed view of a [b, p, n] tensor is read fastest."""
    f64 = torch.float64
    jt = jac.transpose(-1, -2)
    jtj = (jt @ jac).to(f64)
    jtr = (jt @ r[..., None].to(jt.dtype))[..., 0].to(f64)
    return jtj, jtr, 0.5 * (r * r).sum(-1).to(f64)


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
) -> Solution:
    """Levenberg-Marquardt on every lane of `lanes` from theta0 [B, p] (module doc).

    `free` [B, p] bool: the entries each lane fits (the others stay at theta0's values; None:
    all). `damping` [B]: each lane's start damping (None: ``opts.damping``), e.g. the damping a
    previous call returned, to continue it. `decrement_tol` [B]: a lane also stops (DECREMENT)
    where its Gauss-Newton step would lower 0.5 * RSS by at most this. `should_stop` is called
    once per iteration; on True the call returns at once, the lanes still running stopped as
    INTERRUPTED with their current values and damping. `chunk`: lanes per block (None: all)."""
    nb, p = theta0.shape
    dev = theta0.device
    f64 = torch.float64
    theta = theta0.detach().clone()
    free_t = None if free is None else free.to(dev).bool()
    lam = (
        torch.full((nb,), opts.damping, dtype=f64, device=dev)
        if damping is None
        else damping.to(device=dev, dtype=f64).clone()
    )
    tol = None if decrement_tol is None else decrement_tol.to(device=dev, dtype=f64)
    out = Solution(
        theta,
        lam,
        torch.zeros(nb, dtype=torch.int64, device=dev),
        torch.full((nb,), int(Stop.RUNNING), dtype=torch.int64, device=dev),
        torch.full((nb,), math.nan, dtype=f64, device=dev),
        torch.full((nb, p, p), math.nan, dtype=f64, device=dev),
        torch.full((nb, p), math.nan, dtype=f64, device=dev),
    )
    size = nb if chunk is None else max(1, int(chunk))
    interrupted = False
    for lo in range(0, nb, size):
        idx = torch.arange(lo, min(nb, lo + size), device=dev)
        if interrupted:
            out.code[idx] = int(Stop.INTERRUPTED)
            continue
        interrupted = _solve_block(lanes.take(idx), idx, out, free_t, tol, opts, should_stop)
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

    def keep(self, sel: torch.Tensor) -> _Block:
        """The lanes at the block positions `sel` (a long tensor) only, problems included."""
        values: dict[str, Any] = {
            name: None if getattr(self, name) is None else getattr(self, name)[sel]
            for name in _STATE
        }
        return _Block(lanes=self.lanes.take(sel), **values)


_STATE = [f.name for f in dataclasses.fields(_Block) if f.name != "lanes"]


def _masked(
    jtj: torch.Tensor, jtr: torch.Tensor, free: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations of the free entries: held rows and columns replaced by the
    identity's, their gradient by zero (so their step is zero); as they are with no mask."""
    if free is None:
        return jtj, jtr
    f = free.to(jtj.dtype)
    eye = torch.eye(jtj.shape[-1], dtype=jtj.dtype, device=jtj.device)
    return jtj * f[:, :, None] * f[:, None, :] + eye * (1 - f)[:, None, :], jtr * f


def _check(blk: _Block, new: torch.Tensor, first: bool, opts: LMOptions) -> None:
    """The tests at a fresh linearization of the lanes `new` [b] bool: non-finite (failed),
    exact fit, gtol, the decrement; and the scaling's running maximum."""
    a, g = blk.a, blk.g
    rss = 2 * blk.cost
    finite = torch.isfinite(rss) & torch.isfinite(blk.jtj).flatten(1).all(1)
    bad = new & ~finite
    blk.code[bad] = int(Stop.NONFINITE_START if first else Stop.NONFINITE)
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    upd = torch.maximum(blk.scale2, torch.where(diag > 0, diag, 1.0))
    blk.scale2 = torch.where(new[:, None], upd, blk.scale2)
    ok = new & finite
    blk.code[ok & (rss == 0)] = int(Stop.EXACT)
    d_raw = diag.clamp_min(1e-300)
    cosine = (g.abs() / torch.sqrt(d_raw * rss[:, None])).amax(-1)
    blk.code[ok & (rss > 0) & (cosine <= opts.gtol) & (blk.code == 0)] = int(Stop.GTOL)
    if blk.tol is not None:
        d = torch.sqrt(d_raw)
        gn = damped_solve(torch.nan_to_num(a / d[:, :, None] / d[:, None, :]), g / d, blk.lam * 0)
        dec = 0.5 * ((gn / d) * g).sum(-1)
        blk.code[ok & (dec <= blk.tol) & (blk.code == 0)] = int(Stop.DECREMENT)


def _solve_block(
    lanes: Lanes,
    idx: torch.Tensor,
    out: Solution,
    free: torch.Tensor | None,
    tol: torch.Tensor | None,
    opts: LMOptions,
    should_stop: Callable[[], bool] | None,
) -> bool:
    """LM on the lanes `idx` of `out` (written back there); True if interrupted."""
    f64 = torch.float64
    b, p = idx.numel(), out.theta.shape[1]
    dev = out.theta.device
    theta = out.theta[idx]
    r, jac = lanes.linearize(theta)
    rows = r.shape[-1]
    jtj, jtr, cost = normal_equations(r, jac)
    held = None if free is None else free[idx]
    masked = _masked(jtj, jtr, held)
    blk = _Block(
        idx,
        lanes,
        theta,
        out.damping[idx],
        torch.full((b,), 2.0, dtype=f64, device=dev),
        torch.zeros(b, p, dtype=f64, device=dev),
        cost,
        torch.full((b,), math.nan, dtype=f64, device=dev),
        jtj,
        jtr,
        masked[0],
        masked[1],
        held,
        None if tol is None else tol[idx],
        torch.zeros(b, dtype=torch.int64, device=dev),
        torch.zeros(b, dtype=torch.int64, device=dev),
    )
    _check(blk, torch.ones(b, dtype=torch.bool, device=dev), True, opts)
    interrupted = False
    for _ in range(opts.max_iter):
        run = blk.code == 0
        n_run = int(run.sum())
        if n_run == 0:
            break
        if n_run < COMPACT_BELOW * run.numel() and run.numel() * rows >= COMPACT_MIN_CELLS:
            blk.write(out, torch.nonzero(~run)[:, 0])  # the stopped lanes, as they are
            blk = blk.keep(torch.nonzero(run)[:, 0])
            run = torch.ones(n_run, dtype=torch.bool, device=dev)
        if should_stop is not None and should_stop():
            interrupted = True
            break
        _iterate(blk, run, opts)
    blk.code[blk.code == 0] = int(Stop.INTERRUPTED if interrupted else Stop.LIMIT)
    blk.write(out)
    return interrupted


def _iterate(blk: _Block, run: torch.Tensor, opts: LMOptions) -> None:
    """One LM iteration of the running lanes of a block (the others are computed, not kept)."""
    f64 = torch.float64
    blk.iters += run
    a, g = blk.a, blk.g
    d = torch.sqrt(blk.scale2)
    sc = 1.0 / d
    z = damped_solve(torch.nan_to_num(a * sc[:, :, None] * sc[:, None, :]), g * sc, blk.lam)
    delta = torch.nan_to_num(z * sc)
    th64 = blk.theta.to(f64)
    step_norm = torch.linalg.vector_norm(d * delta, dim=-1)
    theta_norm = torch.linalg.vector_norm(d * th64, dim=-1)
    c = blk.cost
    predicted = (g * delta).sum(-1) - 0.5 * (delta * (a @ delta[..., None])[..., 0]).sum(-1)
    polishing = (predicted <= POLISH_RTOL * c) & (blk.lam <= POLISH_DAMPING)
    xsmall = step_norm <= opts.xtol * (opts.xtol + theta_norm)
    polished = torch.isfinite(blk.polish)
    rounding = run & polished & ((step_norm > POLISH_CONTRACTION * blk.polish) | xsmall)
    trial = (th64 + delta).to(blk.theta.dtype)
    jtj_t, jtr_t, new = normal_equations(*blk.lanes.linearize(trial))
    actual = torch.where(torch.isfinite(new), c - new, -math.inf)
    rho = torch.where(predicted > 0, actual / predicted, -math.inf)
    pol_ok = run & polishing & (actual >= -POLISH_RTOL * c) & ~rounding
    rho = torch.where(pol_ok, rho.clamp_min(0.0), rho)
    accept = run & ~rounding & (pol_ok | ((rho > 0) & torch.isfinite(new)))
    reject = run & ~rounding & ~accept
    # Accepted: move (with the linearization taken there), Nielsen's damping update.
    blk.theta = torch.where(accept[:, None], trial, blk.theta)
    blk.cost = torch.where(accept, new, c)
    blk.jtj = torch.where(accept[:, None, None], jtj_t, blk.jtj)
    blk.jtr = torch.where(accept[:, None], jtr_t, blk.jtr)
    if blk.free is None:
        blk.a, blk.g = blk.jtj, blk.jtr
    else:
        a_t, g_t = _masked(jtj_t, jtr_t, blk.free)
        blk.a = torch.where(accept[:, None, None], a_t, a)
        blk.g = torch.where(accept[:, None], g_t, g)
    factor = torch.clamp_min(1 - (2 * rho - 1) ** 3, 1 / 3)
    lam = torch.where(accept, torch.clamp_min(blk.lam * factor, MIN_DAMPING), blk.lam)
    nu = torch.where(accept, 2.0, blk.nu)
    blk.polish = torch.where(pol_ok, step_norm, blk.polish)
    plain = accept & ~torch.isfinite(blk.polish)
    ftol = plain & (actual <= opts.ftol * c) & (predicted <= opts.ftol * c)
    xt = plain & ~ftol & xsmall
    # Rejected: raise the damping, doubling its growth.
    blk.lam = torch.where(reject, lam * nu, lam)
    blk.nu = torch.where(reject, nu * 2.0, nu)
    code = blk.code
    code[rounding] = int(Stop.ROUNDING)
    code[ftol] = int(Stop.FTOL)
    code[xt | (reject & xsmall)] = int(Stop.XTOL)
    code[reject & ~xsmall & (blk.lam > MAX_DAMPING)] = int(Stop.DAMPING)
    # The tests of the next iteration's linearization, for the lanes that moved and go on.
    _check(blk, accept & (code == 0), False, opts)
