"""Fits over groups of data: many independent fits at once, or one global fit with shared
parameters, as one tensor program with a leading group dimension.

The groups are padded to the longest one (`Packed`: a weight of 0 marks a pad, whose x repeats
the group's first point so that the model stays finite there). Parameters are a per-group block
``theta [G, q]`` (internal, unconstrained values, as `FitModel.raw`) and a shared block
``shared [s]``; the model is `FitModel.predict` on their merged ``[G, n_free]`` vector, which
broadcasts a leading dimension. Columns of the Jacobian come from forward-mode derivatives
(one `torch.func.jvp` per parameter, every group at once).

With no shared parameter (`fit_independent`), every group is its own Levenberg-Marquardt fit,
a lane of `fitcli.lm_batch.solve`: per-group damping, per-group stopping by the tests of
`fitcli.lm` (gtol, ftol, xtol, rounding level of the Gauss-Newton steps, damping too large),
per-group status. With shared parameters
(`fit_global`) it is one LM on the stacked problem, whose normal equations are block-arrow
shaped::

    [U_1        W_1] [d_1]   [a_1]
    [    ...    ...] [...] = [...]      U_g = A_g^T A_g,  W_g = A_g^T B,  V = sum B_g^T B_g
    [W_1^T ...  V  ] [d_s]   [ b ]

so the per-group blocks are eliminated (`schur_solve`: batched q x q solves) and only the
s x s Schur complement is solved densely: the cost grows linearly with the number of groups.

Not here (said in the README): the curvature guard, the stall and singular-point restarts and
the trust region of `fitcli.lm`, and losses other than least squares for LM.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fitcli import lm_batch, lm_jit
from fitcli.errors import GroupStatus
from fitcli.lm import (
    MAX_DAMPING,
    MIN_DAMPING,
    POLISH_CONTRACTION,
    POLISH_DAMPING,
    POLISH_RTOL,
    SINGULAR_RCOND,
    one_thread,
)
from fitcli.lm_batch import LMOptions, damped_solve
from fitcli.model import FitModel

# Bytes of one group chunk's Jacobian for the error bars, and for an independent fit on a GPU:
# they run chunk by chunk.
CHUNK_BYTES = 64_000_000
# On the CPU an independent fit runs in blocks of groups whose [groups, points] arrays are about
# this many bytes, so that the model's temporaries stay in the caches (BENCHMARKS.md: 1.6x at
# 10^4 groups of 100 points in float64).
BLOCK_BYTES = 1_000_000
# A global fit's polishing ends after this many Gauss-Newton steps in a row that do not
# contract: a stacked problem with correlated parameters converges linearly, by uneven steps.
POLISH_STRIKES = 3


@dataclass
class Packed:
    """Grouped observations padded to the longest group: x [G, L] (or [G, L, k]), the weighted
    y ``w * y`` and the weights w [G, L] (0 at a pad), and each group's number of points.

    Several variables are stored variable by variable ([G, k, L] in memory, x a transposed view
    of it): each variable's column ``x[..., j]`` of a group is contiguous, which the batched
    program reads as it is and the compiled fit's loop over points vectorizes on."""

    x: torch.Tensor
    wy: torch.Tensor
    w: torch.Tensor
    counts: np.ndarray

    @property
    def groups(self) -> int:
        return int(self.w.shape[0])

    def take(self, idx: torch.Tensor) -> Packed:
        if idx.numel() == self.groups and bool(
            (idx == torch.arange(self.groups, device=idx.device)).all()
        ):
            return self  # every group, in order: no copy
        x = self.x[idx] if self.x.ndim == 2 else self.x.transpose(1, 2)[idx].transpose(1, 2)
        return Packed(x, self.wy[idx], self.w[idx], self.counts[idx.cpu().numpy()])


def packed_bytes(counts: np.ndarray, k: int, p: int, itemsize: int, compiled: bool = False) -> int:
    """What packing and fitting these groups allocates at most, in bytes: the padded x, y, w
    and the model's temporaries (about 8 arrays of G x L) plus the float64 Jacobian G x L x p;
    for a compiled fit (`fitcli.lm_jit`, which never stores J) the padded arrays and each
    group's state."""
    g, length = counts.size, int(counts.max()) if counts.size else 0
    if compiled:
        cells = g * lm_jit.padded_length(length)
        return cells * itemsize * (k + 2) + g * 8 * (2 * p * p + 4 * p + 16)
    cells = g * length
    return cells * (itemsize * (k + 2 + 8) + 8 * (p + 2))


def pack(
    x: np.ndarray,
    y: np.ndarray,
    sigma: np.ndarray | None,
    group: np.ndarray,
    n_groups: int,
    dtype: torch.dtype,
    device: torch.device,
    length: int | None = None,
) -> Packed:
    """Pad each group's rows (in file order) to the longest group, or to `length` points (at
    least the longest group's: the compiled fit's `lm_jit.padded_length`)."""
    counts = np.bincount(group, minlength=n_groups)
    most = max(int(counts.max()), 1)
    length = most if length is None else max(length, most)

    def t(a: np.ndarray) -> torch.Tensor:  # a read-only array (a dataset's) is copied
        return torch.as_tensor(a if a.flags.writeable else a.copy(), dtype=dtype).to(device)

    if group.size == n_groups * most and bool((group[1:] >= group[:-1]).all()):
        # Every group has `most` rows, one group after another: the table already is [G, most]
        # (what the general path below builds, without its scatter of every row), copied once
        # into the padded arrays; pads repeat each group's first point, with weight 0.
        xs = x.reshape(n_groups, most, *x.shape[1:])
        if x.ndim == 1:
            xp = np.empty((n_groups, length))
            xp[:, :most] = xs
            xp[:, most:] = xs[:, :1]
        else:  # variable by variable in memory (`Packed`)
            xp = np.empty((n_groups, x.shape[1], length))
            xp[:, :, :most] = xs.transpose(0, 2, 1)
            xp[:, :, most:] = xs[:, :1].transpose(0, 2, 1)
        w = np.zeros((n_groups, length))
        yp = np.zeros((n_groups, length))
        if sigma is None:
            w[:, :most] = 1.0
            yp[:, :most] = y.reshape(n_groups, most)
        else:
            w[:, :most] = 1.0 / sigma.reshape(n_groups, most)
            yp[:, :most] = y.reshape(n_groups, most) * w[:, :most]
        xt = t(xp) if x.ndim == 1 else t(xp).transpose(1, 2)
        return Packed(xt, t(yp), t(w), counts)
    return _pack_rows(x, y, sigma, group, counts, length, t)


def _pack_rows(x, y, sigma, group, counts, length, t) -> Packed:
    """`pack` of any grouping: each row scattered to its group's next place."""
    n_groups = counts.size
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(group.size) - np.repeat(starts, counts)
    g_sorted = group[order]
    # A pad repeats its group's first point (an empty group: the first row of all).
    first = np.where(counts > 0, order[np.minimum(starts, group.size - 1)], 0)
    xs = x[first]
    if x.ndim == 1:
        xp = np.repeat(xs[:, None], length, axis=1)
        xp[g_sorted, pos] = x[order]
    else:  # variable by variable in memory (`Packed`)
        xp = np.repeat(xs[:, :, None], length, axis=2)
        xp[g_sorted, :, pos] = x[order]
    w = np.zeros((n_groups, length))
    w[g_sorted, pos] = 1.0 if sigma is None else 1.0 / sigma[order]
    yp = np.zeros((n_groups, length))
    yp[g_sorted, pos] = y[order]
    xt = t(xp) if x.ndim == 1 else t(xp).transpose(1, 2)
    return Packed(xt, t(yp * w), t(w), counts)


@dataclass
class Layout:
    """Which free parameters of the model (`FitModel.free_names` order) are per group."""

    per_group: list[int]
    shared: list[int]

    def merge(self, theta: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The model's free vector for each group, [G, n_free]."""
        g = theta.shape[0]
        both = torch.cat([theta, shared.expand(g, shared.shape[-1])], dim=1)
        order = self.per_group + self.shared
        inv = [order.index(k) for k in range(len(order))]
        return both[:, inv]


def _model(model: FitModel, layout: Layout, x: torch.Tensor, external: bool):
    expression: Any = getattr(model, "expression")  # noqa: B009  # groups need model.expr

    def fn(theta: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        # Each group's parameters [G, 1] broadcast over its own row of x ([G, L] or [G, L, k]).
        free = layout.merge(theta, shared)
        full = model.full_vector(free if external else model.external(free))
        return expression(x, {name: full[:, k, None] for k, name in enumerate(model.names)})

    return fn


def jacobian(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    shared: torch.Tensor,
    external: bool = False,
    float64: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [G, L, q], B [G, L, s], r [G, L]) of the weighted model, in float64 (or the model's
    dtype with `float64` False): the Jacobian columns of the per-group and shared parameters
    and the residuals ``w * (y - fn)``, zero at the pads (their weight is 0). A and B are
    views of one [G, q + s, L] tensor: each column is contiguous over the rows, the layout
    that J^T J and J^T r read fastest."""
    # One reverse pass with one leaf per model parameter (by name), expanded over the rows:
    # the model is elementwise in the rows, so d sum(w * m) / d leaf_j[g, i] is w * dm/dp_j at
    # row i (as `fitcli.lm`'s row-wise Jacobian); no functorch, whose start-up costs seconds.
    # The columns of the free parameters follow by the chain rule through the small per-group
    # map free -> all values (bounds, fixed values, ties): J_free = J_names @ D, D [G, n, f].
    # (A stacked [G, L, f] leaf instead costs a full [G, L, f] zero-fill per column backward.)
    g, length = data.w.shape
    free = layout.merge(theta.detach(), shared.detach())
    order = layout.per_group + layout.shared
    expression: Any = getattr(model, "expression")  # noqa: B009  # groups need model.expr
    with torch.enable_grad():
        if getattr(model, "_all_free_unbounded", False):
            full = free
            d = None
        else:
            leaf = free.clone().requires_grad_()
            full_g = model.full_vector(leaf if external else model.external(leaf))
            rows = []
            for j in range(full_g.shape[1]):
                (dj,) = torch.autograd.grad(
                    full_g[:, j].sum(), leaf, retain_graph=True, allow_unused=True
                )
                rows.append(torch.zeros_like(free) if dj is None else dj)
            full = full_g.detach()
            # D [G, n, f] in the (per-group, shared) order of the columns.
            d = torch.stack(rows, dim=1)[:, :, order]
        leaves = [full[:, k, None].expand(g, length).requires_grad_() for k in range(full.shape[1])]
        m = expression(data.x, dict(zip(model.names, leaves, strict=True)))
        grads = torch.autograd.grad((m * data.w).sum(), leaves, allow_unused=True)
    m = m.detach()
    # The gradients are w * dm/dp: zero at a pad already, as the residual w y - w m.
    cols = list(grads) if d is not None else [grads[j] for j in order]
    zero = torch.zeros(g, length, dtype=m.dtype, device=m.device)
    jac_t = torch.stack([zero if c is None else c.expand(g, length) for c in cols], dim=1)
    if d is not None:
        jac_t = d.transpose(-1, -2).to(jac_t.dtype) @ jac_t
    r = data.wy - m * data.w
    if float64:
        jac_t, r = jac_t.to(torch.float64), r.to(torch.float64)
    jac = jac_t.transpose(-1, -2)
    q = theta.shape[1]
    return jac[..., :q], jac[..., q:], r


def residual_ss(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    shared: torch.Tensor,
    program: lm_jit.Program | None = None,
) -> torch.Tensor:
    """Each group's ``sum(r**2)`` [G] in float64 (no Jacobian; by `program` where it may)."""
    jit = None if shared.numel() else compiled(program, model, layout, data, theta)
    if jit is not None:
        cost = jit.linearize(*_arrays(data), _numpy(theta))[0]
        return torch.from_numpy(2.0 * cost)
    fn = _model(model, layout, data.x, False)
    with torch.no_grad():
        r = (data.wy - fn(theta, shared) * data.w).to(torch.float64)  # 0 at the pads
    return (r * r).sum(-1)


def schur_solve(
    u: torch.Tensor, w: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the block-arrow system ``[[diag(U_g), W], [W^T, V]] [d_g; d_s] = [a_g; b]``
    (U [G, q, q], W [G, q, s], V [s, s], a [G, q], b [s]) by eliminating the per-group blocks:
    ``S = V - sum_g W_g^T U_g^-1 W_g``, ``d_s = S^-1 (b - sum_g W_g^T U_g^-1 a_g)``,
    ``d_g = U_g^-1 (a_g - W_g d_s)``. Returns (d_g [G, q], d_s [s])."""
    zero = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    rhs = torch.cat([w, a[..., None]], dim=-1)  # one batched solve for U^-1 W and U^-1 a
    sol = damped_solve(u, rhs, zero)
    uw, ua = sol[..., :-1], sol[..., -1]
    wt = w.transpose(-1, -2)
    schur = v - (wt @ uw).sum(0)
    rhs_s = b - (wt @ ua[..., None])[..., 0].sum(0)
    ds = damped_solve(schur, rhs_s, torch.zeros((), dtype=u.dtype, device=u.device))
    dg = ua - (uw @ ds)
    return dg, ds


@dataclass
class GroupFit:
    """The outcome of a grouped fit: per-group internal parameters, the shared ones, and per
    group its status, reason, iterations and ``sum(r**2)``."""

    theta: torch.Tensor  # [G, q]
    shared: torch.Tensor  # [s]
    status: list[str]
    reason: list[str]
    iterations: np.ndarray
    rss: np.ndarray
    history: list[float] = field(default_factory=list)  # total cost per iteration
    damping: np.ndarray | None = None  # [G] each group's damping at the end (independent fits)
    carry: lm_batch.Carry | None = None  # the rest of each group's LM state (independent fits)


def _threads(device: torch.device) -> contextlib.AbstractContextManager:
    """One torch CPU thread for a grouped LM fit and its error bars on the CPU
    (`fitcli.lm.one_thread`): their ops are many small batched ones (q x q solves, [G, L]
    elementwise), where waiting on a second thread of busy cores costs more than it gains (3x
    to 8x slower independent fits at 10^3 and 10^4 groups, and 2x to 40x slower, erratic,
    global fits of 10^3 groups, on two shared cores)."""
    return one_thread() if device.type == "cpu" else contextlib.nullcontext()


def too_few(counts: np.ndarray, q: int) -> np.ndarray:
    """Groups with no more points than their per-group parameters (no degrees of freedom)."""
    return counts <= q


def _few_reason(n: int, q: int) -> str:
    return f"too few points: {n} for {q} per-group parameter(s); need more than {q}"


def fit_independent(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta0: torch.Tensor,
    opts: LMOptions,
    on_iter: Callable[[int], bool] | None = None,
    *,
    damping: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    program: lm_jit.Program | None = None,
    carry: lm_batch.Carry | None = None,
) -> GroupFit:
    """Every group its own LM fit (no shared parameter) over the groups with enough points,
    from theta0 [G, q] and, per group, the start `damping` [G] (None: ``opts.damping``): by
    `program` (the model's compiled fit, `fitcli.lm_jit`) where `compiled` lets it, else one
    `fitcli.lm_batch.solve`; the same steps either way. `on_iter(it)` and `should_stop()` are
    asked once per iteration (of each block of groups); on True the groups still running stop
    with their current values and damping (completed, "interrupted"), which a later call can
    continue from exactly (`GroupFit.theta`, `.damping`, and `.carry` as `carry`)."""
    with _threads(theta0.device):
        return _fit_independent(
            model, layout, data, theta0, opts, on_iter, damping, should_stop, program, carry
        )


class _GroupLanes:
    """The groups of `data` as the lanes of `fitcli.lm_batch.solve`."""

    def __init__(self, model: FitModel, layout: Layout, data: Packed) -> None:
        self.model, self.layout, self.data = model, layout, data
        self.shared = torch.zeros(0, dtype=data.w.dtype, device=data.w.device)

    def take(self, idx: torch.Tensor) -> _GroupLanes:
        return _GroupLanes(self.model, self.layout, self.data.take(idx))

    def linearize(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, _, r = jacobian(self.model, self.layout, self.data, theta, self.shared, float64=False)
        return r, a


def _asker(
    on_iter: Callable[[int], bool] | None, should_stop: Callable[[], bool] | None
) -> Callable[[], bool] | None:
    """One `should_stop` from the two callbacks (on_iter gets the iteration's number)."""
    if on_iter is None:
        return should_stop
    count = iter(range(1 << 62))

    def ask() -> bool:
        return bool(should_stop is not None and should_stop()) or bool(on_iter(next(count)))

    return ask


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


def _arrays(data: Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, w y, w and the counts of `data` as the compiled fit's numpy arrays (no copy): x [G, L],
    or [G, k, L] for several variables (`Packed`'s memory)."""
    x = data.x if data.x.ndim == 2 else data.x.transpose(1, 2)
    return _numpy(x), _numpy(data.wy), _numpy(data.w), data.counts


def compiled(
    program: lm_jit.Program | None,
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
) -> lm_jit.Program | None:
    """`program` (a run's compiled fit, `fitcli.lm_jit`) where it may fit these groups: on the
    CPU, no shared parameter, and its translation agrees with torch's autograd on the first
    groups (J^T J, J^T r and the RSS, to rounding); else None (`lm_batch` fits them)."""
    if program is None or data.w.device.type != "cpu" or layout.shared or not data.groups:
        return None
    few = data.take(torch.arange(min(4, data.groups)))
    th = theta[: few.groups].detach()
    digest = hashlib.sha256()
    for part in _arrays(few):
        digest.update(part.tobytes())
    key = (id(program), digest.hexdigest())
    if key not in _AGREES:
        if len(_AGREES) > 256:
            _AGREES.clear()
        _AGREES[key] = _agrees(program, model, layout, few, th)
    return program if _AGREES[key] else None


def verified(
    program: lm_jit.Program, model: FitModel, layout: Layout, data: Packed, theta: torch.Tensor
) -> lm_jit.Program | None:
    """`compiled` asked at a run's set-up, on the groups an independent fit would give it
    (those with enough points for their parameters) at theta [G, q]: the program, or None where
    its translation disagrees with torch's autograd. The verdict is kept, so the fit's own ask
    on the same groups costs a digest of their data."""
    keep = np.flatnonzero(~too_few(data.counts, theta.shape[1]))
    if not keep.size:
        return program
    idx = torch.as_tensor(keep, device=theta.device)
    return compiled(program, model, layout, data.take(idx), theta[idx])


# Verdicts of `_agrees` by (program, the first groups' data): a run asks at the fit, the
# residuals and the error bars, on the same groups (at the parameters of its first ask).
_AGREES: dict[tuple[int, str], bool] = {}


def _agrees(
    program: lm_jit.Program, model: FitModel, layout: Layout, few: Packed, th: torch.Tensor
) -> bool:
    a, _, r = jacobian(model, layout, few, th, torch.zeros(0, dtype=th.dtype), float64=True)
    at = a.transpose(-1, -2)
    ref = [0.5 * (r * r).sum(-1), at @ a, (at @ r[..., None])[..., 0]]
    got = program.linearize(*_arrays(few), _numpy(th))
    rtol = 1e-9 if few.w.dtype == torch.float64 else 1e-4
    for reference, have in zip(ref, got, strict=True):
        want = reference.numpy()
        if not np.array_equal(np.isfinite(want), np.isfinite(have)):
            return False
        fin = np.isfinite(want)
        scale = np.abs(want[fin]).max(initial=0.0)
        if not np.allclose(have[fin], want[fin], rtol=rtol, atol=rtol * scale):
            return False
    return True


def _fit_compiled(
    program: lm_jit.Program,
    data: Packed,
    theta: torch.Tensor,
    lam: torch.Tensor,
    opts: LMOptions,
    should_stop: Callable[[], bool] | None,
    carry: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    return program.fit(*_arrays(data), _numpy(theta), lam.numpy(), opts, should_stop, carry)


def _fit_independent(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta0: torch.Tensor,
    opts: LMOptions,
    on_iter: Callable[[int], bool] | None = None,
    damping: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    program: lm_jit.Program | None = None,
    carry: lm_batch.Carry | None = None,
) -> GroupFit:
    g, q = theta0.shape
    dev = theta0.device
    theta = theta0.detach().clone()
    lam = torch.full((g,), opts.damping, dtype=torch.float64, device=dev)
    if damping is not None:
        lam[:] = damping.to(device=dev, dtype=torch.float64)
    status = [GroupStatus.FAILED.value] * g
    reason = [""] * g
    iters = np.zeros(g, dtype=np.int64)
    few = too_few(data.counts, q)
    for j in np.flatnonzero(few):
        reason[j] = _few_reason(int(data.counts[j]), q)
    keep = torch.as_tensor(np.flatnonzero(~few), device=dev)
    shared = torch.zeros(0, dtype=theta.dtype, device=dev)
    known = np.full(g, math.nan)  # each group's sum(r**2), where the fit already has it
    state = lm_batch.Carry.start(g, q) if carry is None else carry
    state = lm_batch.Carry(
        *(t.detach().cpu().clone() for t in (state.nu, state.scale2, state.polish))
    )
    if keep.numel():
        length = data.w.shape[1]
        if dev.type == "cpu":
            chunk = max(1, BLOCK_BYTES // max(1, data.w.element_size() * length))
        else:
            chunk = max(1, CHUNK_BYTES // max(1, 8 * length * max(q, 1)))
        sub = data.take(keep)
        jit = compiled(program, model, layout, sub, theta[keep])
        if jit is not None:
            kept = keep.cpu()
            out = _fit_compiled(
                jit,
                sub,
                theta[keep],
                lam[keep],
                opts,
                _asker(on_iter, should_stop),
                (state.nu[kept].numpy(), state.scale2[kept].numpy(), state.polish[kept].numpy()),
            )
            theta[keep] = torch.from_numpy(out["theta"])
            lam[keep] = torch.from_numpy(out["damping"])
            state.nu[kept] = torch.from_numpy(out["nu"])
            state.scale2[kept] = torch.from_numpy(out["scale2"])
            state.polish[kept] = torch.from_numpy(out["polish"])
            codes, n_it = out["code"], out["iterations"]
            # 0.5 RSS at each group's final values, from its last linearization (NaN for the
            # groups an interruption left unstarted, computed below).
            known[keep.numpy()] = 2.0 * out["cost"]
        else:
            sol = lm_batch.solve(
                _GroupLanes(model, layout, sub),
                theta[keep],
                opts,
                damping=lam[keep],
                should_stop=_asker(on_iter, should_stop),
                chunk=chunk,
                carry=lm_batch.Carry(
                    *(t[keep.cpu()] for t in (state.nu, state.scale2, state.polish))
                ),
            )
            theta[keep], lam[keep] = sol.theta, sol.damping
            kept = keep.cpu()
            state.nu[kept], state.scale2[kept] = sol.nu.cpu(), sol.scale2.cpu()
            state.polish[kept] = sol.polish.cpu()
            codes, n_it = sol.code.cpu().numpy(), sol.iterations.cpu().numpy()
        kept_np = keep.cpu().numpy()
        status, reason = _stop_words(status, reason, kept_np, codes, n_it, opts)
        iters[kept_np] = n_it
    missing = torch.as_tensor(np.flatnonzero(~np.isfinite(known)), device=dev)
    if missing.numel():
        part = residual_ss(model, layout, data.take(missing), theta[missing], shared, program)
        known[missing.cpu().numpy()] = part.cpu().numpy()
    known[few] = math.nan
    return GroupFit(
        theta,
        shared,
        status,
        reason,
        iters,
        known,
        damping=lam.cpu().numpy(),
        carry=state,
    )


def _stop_words(
    status: list[str],
    reason: list[str],
    lanes: np.ndarray,
    codes: np.ndarray,
    iterations: np.ndarray,
    opts: LMOptions,
) -> tuple[list[str], list[str]]:
    """`status` and `reason` with the groups `lanes` given the words of their stop codes (an
    interruption's reason names its iterations): each distinct stop worded once."""
    codes = np.asarray(codes, dtype=np.int64)
    iterations = np.asarray(iterations, dtype=np.int64)
    interrupted = codes == int(lm_batch.Stop.INTERRUPTED)
    key = np.where(interrupted, iterations + 1, 0) * (max(lm_batch.Stop) + 1) + codes
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    words = [
        (_outcome(_failed(int(codes[j]))), lm_batch.reason(int(codes[j]), opts, int(iterations[j])))
        for j in first.tolist()
    ]
    st, rs = np.array(status, dtype=object), np.array(reason, dtype=object)
    st[lanes] = np.array([w[0] for w in words], dtype=object)[inverse]
    rs[lanes] = np.array([w[1] for w in words], dtype=object)[inverse]
    return st.tolist(), rs.tolist()


def _failed(code: int) -> bool | None:
    """A stop as `_outcome`'s argument: failed, converged (False), or unconverged (None)."""
    if code in lm_batch.FAILED:
        return True
    if code in (lm_batch.Stop.LIMIT, lm_batch.Stop.INTERRUPTED):
        return None
    return False


def _outcome(failed: bool | None) -> str:
    """A group's status: failed, converged, or completed without converging (failed None: LM
    reached its iteration limit, which is not a failure of the group, as for a single run)."""
    if failed is None:
        return GroupStatus.COMPLETED.value
    return GroupStatus.FAILED.value if failed else GroupStatus.CONVERGED.value


def fit_global(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta0: torch.Tensor,
    shared0: torch.Tensor,
    opts: LMOptions,
    on_iter: Callable[[int], bool] | None = None,
    *,
    damping: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GroupFit:
    """One LM on the stacked problem (per-group and shared parameters), each step by
    `schur_solve`. Groups with too few points are left out of it (failed, at their start).
    `damping`: the start damping (None: ``opts.damping``); `on_iter(it)` and `should_stop()`
    are asked once per iteration, and on True the fit stops with its current values and
    damping (completed, "interrupted"), which a later call can continue from."""
    with _threads(theta0.device):
        return _fit_global(
            model, layout, data, theta0, shared0, opts, on_iter, damping, should_stop
        )


def _fit_global(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta0: torch.Tensor,
    shared0: torch.Tensor,
    opts: LMOptions,
    on_iter: Callable[[int], bool] | None = None,
    damping: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GroupFit:
    g, q = theta0.shape
    f64 = torch.float64
    status = [GroupStatus.CONVERGED.value] * g
    reason = [""] * g
    few = too_few(data.counts, q)
    for j in np.flatnonzero(few):
        status[j], reason[j] = GroupStatus.FAILED.value, _few_reason(int(data.counts[j]), q)
    keep = torch.as_tensor(np.flatnonzero(~few), device=theta0.device)
    sub = data.take(keep)
    theta_all = theta0.detach().clone()
    theta = theta0[keep].detach().clone()
    shared = shared0.detach().clone()
    lam, nu = opts.damping if damping is None else float(damping), 2.0
    scale_g = torch.zeros_like(theta, dtype=f64)
    scale_s = torch.zeros_like(shared, dtype=f64)
    polish_norm: float | None = None
    strikes = 0
    why: str = f"iteration limit: not converged in {opts.max_iter} iterations"
    failed: bool | None = None  # as `stop`'s: None is stopped unconverged
    stale, n_iter = True, 0
    history: list[float] = []
    u = w = v = a = b = None
    cost = math.nan
    for it in range(opts.max_iter):
        if stale:
            ja, jb, r = jacobian(model, layout, sub, theta, shared)
            jat = ja.transpose(-1, -2)
            u, w = jat @ ja, jat @ jb
            v = (jb.transpose(-1, -2) @ jb).sum(0)
            a = (jat @ r[..., None])[..., 0]
            b = (jb.transpose(-1, -2) @ r[..., None])[..., 0].sum(0)
            rss = float((r * r).sum())
            cost = 0.5 * rss
            stale = False
            if not (
                math.isfinite(rss) and bool(torch.isfinite(u).all() and torch.isfinite(v).all())
            ):
                why = "non-finite residuals or Jacobian " + (
                    "at start" if it == 0 else "at the current parameters"
                )
                break
            dg = torch.diagonal(u, dim1=-2, dim2=-1)
            ds_ = torch.diagonal(v)
            scale_g = torch.maximum(scale_g, torch.where(dg > 0, dg, 1.0))
            scale_s = torch.maximum(scale_s, torch.where(ds_ > 0, ds_, 1.0))
            if rss == 0.0:
                why, failed = "exact fit: residuals are zero", False
                break
            diag_all = torch.cat([dg.reshape(-1), ds_]).clamp_min(1e-300)
            grad = torch.cat([a.reshape(-1), b]).abs()
            if float((grad / torch.sqrt(diag_all * rss)).max()) <= opts.gtol:
                why, failed = f"gtol: gradient cosine < {opts.gtol:g}", False
                break
        assert u is not None and w is not None and v is not None and a is not None and b is not None
        history.append(cost)
        if (on_iter is not None and on_iter(it)) or (should_stop is not None and should_stop()):
            why, failed = f"interrupted after {it} iterations", None
            break
        n_iter += 1
        sg, ss = 1.0 / torch.sqrt(scale_g), 1.0 / torch.sqrt(scale_s)
        eye_q = torch.eye(q, dtype=f64, device=u.device)
        eye_s = torch.eye(shared.numel(), dtype=f64, device=u.device)
        us = u * sg[:, :, None] * sg[:, None, :] + lam * eye_q
        ws = w * sg[:, :, None] * ss[None, None, :]
        vs = v * ss[:, None] * ss[None, :] + lam * eye_s
        zg, zs = schur_solve(us, ws, vs, a * sg, b * ss)
        dg_, ds_ = zg * sg, zs * ss
        delta = torch.cat([dg_.reshape(-1), ds_])
        dvec = torch.cat([torch.sqrt(scale_g).reshape(-1), torch.sqrt(scale_s)])
        th64 = torch.cat([theta.to(f64).reshape(-1), shared.to(f64)])
        step_norm = float(torch.linalg.vector_norm(dvec * delta))
        theta_norm = float(torch.linalg.vector_norm(dvec * th64))
        # Predicted reduction g.d - 0.5 d.A.d with A block-arrow.
        ad_g = (u @ dg_[..., None])[..., 0] + (w @ ds_[..., None])[..., 0]
        ad_s = v @ ds_ + (w.transpose(-1, -2) @ dg_[..., None])[..., 0].sum(0)
        predicted = float((a * dg_).sum() + (b * ds_).sum()) - 0.5 * float(
            (dg_ * ad_g).sum() + (ds_ * ad_s).sum()
        )
        polishing = predicted <= POLISH_RTOL * cost and lam <= POLISH_DAMPING
        xsmall = step_norm <= opts.xtol * (opts.xtol + theta_norm)
        if polish_norm is not None and (step_norm > POLISH_CONTRACTION * polish_norm or xsmall):
            strikes += 1
            if xsmall or strikes >= POLISH_STRIKES:
                why, failed = "Gauss-Newton steps have reached rounding level", False
                break
        elif polish_norm is not None:
            strikes = 0
        t_trial = (theta.to(f64) + dg_).to(theta.dtype)
        s_trial = (shared.to(f64) + ds_).to(shared.dtype)
        new = 0.5 * float(residual_ss(model, layout, sub, t_trial, s_trial).sum())
        actual = cost - new if math.isfinite(new) else -math.inf
        rho = actual / predicted if predicted > 0 else -math.inf
        if polishing and actual >= -POLISH_RTOL * cost:
            polish_norm = step_norm
            rho = max(rho, 0.0)
        elif not (rho > 0 and math.isfinite(new)):
            lam *= nu
            nu *= 2.0
            if xsmall:
                why, failed = f"xtol: relative step < {opts.xtol:g}", False
                break
            if lam > MAX_DAMPING:
                why, failed = "damping too large: no decrease possible", False
                break
            continue
        old = cost
        theta, shared, cost, stale = t_trial, s_trial, new, True
        lam = max(lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), MIN_DAMPING)
        nu = 2.0
        if polish_norm is not None:
            continue
        if actual <= opts.ftol * old and predicted <= opts.ftol * old:
            why, failed = f"ftol: relative cost reduction < {opts.ftol:g}", False
            break
        if xsmall:
            why, failed = f"xtol: relative step < {opts.xtol:g}", False
            break
    theta_all[keep] = theta
    for j in keep.tolist():
        status[j] = _outcome(failed)
        reason[j] = why
    rss_all = residual_ss(model, layout, data, theta_all, shared).cpu().numpy()
    rss_all[few] = math.nan
    iters = np.where(few, 0, n_iter)
    return GroupFit(
        theta_all, shared, status, reason, iters, rss_all, history, damping=np.full(g, lam)
    )


# -- error bars --------------------------------------------------------------------------------


def _singular(jtj: torch.Tensor) -> torch.Tensor:
    """Whether each column-scaled J^T J has an eigenvalue below SINGULAR_RCOND of its largest."""
    d = torch.sqrt(torch.diagonal(jtj, dim1=-2, dim2=-1).clamp_min(1e-300))
    a = jtj / d[..., :, None] / d[..., None, :]
    ev = torch.linalg.eigvalsh(torch.nan_to_num(a))
    return ev[..., 0] <= SINGULAR_RCOND * ev[..., -1].clamp_min(1e-300)


def external_values(model: FitModel, layout: Layout, theta: torch.Tensor, shared: torch.Tensor):
    """The free parameters' values (bounded space) per group [G, n_free], in float64."""
    with torch.no_grad():
        return model.external(layout.merge(theta, shared)).to(torch.float64)


def split_external(layout: Layout, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return free[:, layout.per_group], free[0, layout.shared] if free.shape[0] else free[:0, 0]


def stderr_independent(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    scale: bool,
    program: lm_jit.Program | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's standard errors [G, q] as fitting that group alone gives (curve_fit):
    sqrt(diag((J^T J)^-1) * s^2), s^2 = rss / (n_g - q) (or 1 with `scale` False: absolute
    sigma), J with respect to the parameters' values. Also whether J^T J is singular [G].

    The compiled fit's own J^T J at the final values is not reused: numba inlines the model's
    linearization into each driver, and LLVM's vectorized sums there need not add in the same
    order (a group's last J^T J from a stretch's start differed in the last bits), so error
    bars from it would depend on where a resumed run's stretches began."""
    with _threads(theta.device):
        return _stderr_independent(model, layout, data, theta, scale, program)


def _stderr_independent(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    scale: bool,
    program: lm_jit.Program | None,
) -> tuple[np.ndarray, np.ndarray]:
    shared = torch.zeros(0, dtype=theta.dtype, device=theta.device)
    free = external_values(model, layout, theta, shared).to(theta.dtype)
    q = theta.shape[1]
    g = theta.shape[0]
    out = np.full((g, q), math.nan)
    sing = np.zeros(g, dtype=bool)
    length = data.w.shape[1]
    jit = compiled(program, model, layout, data, free)
    if jit is not None:
        # All groups at once (no Jacobian is stored), the covariance compiled too.
        cost, jtj_np, _ = jit.linearize(*_arrays(data), _numpy(free), external=True)
        diag, flags = jit.covariance(jtj_np, SINGULAR_RCOND)
        scale2 = 2.0 * cost / np.maximum(data.counts - q, 1) if scale else np.ones(g)
        with np.errstate(invalid="ignore"):
            return np.sqrt(diag * scale2[:, None]), flags
    chunk = max(1, CHUNK_BYTES // max(1, 8 * length * max(q, 1)))
    for lo in range(0, g, chunk):
        idx = torch.arange(lo, min(g, lo + chunk), device=theta.device)
        part = data.take(idx)
        a, _, r = jacobian(model, layout, part, free[idx], shared, external=True)
        jtj, rss = a.transpose(-1, -2) @ a, (r * r).sum(-1)
        s = _singular(jtj)
        cov = torch.linalg.pinv(torch.nan_to_num(jtj), hermitian=True)
        n = torch.as_tensor(data.counts[idx.cpu().numpy()], dtype=torch.float64)
        dof = (n - q).clamp_min(1).to(cov.device)
        s2 = rss / dof if scale else torch.ones_like(dof)
        var = torch.diagonal(cov, dim1=-2, dim2=-1) * s2[:, None]
        out[lo : lo + idx.numel()] = torch.sqrt(var).cpu().numpy()
        sing[lo : lo + idx.numel()] = s.cpu().numpy()
    return out, sing


def stderr_global(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    shared: torch.Tensor,
    ok: np.ndarray,
    scale: bool,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Standard errors of a global fit from the covariance of the whole stacked problem over
    the groups `ok` (n - p degrees of freedom, p = q * groups + s): the per-group ones [G, q]
    (NaN outside `ok`) and the shared ones [s]; and whether J^T J is singular. Diagonal
    blocks of the inverse by the Schur complement:
    ``Cov_ss = S^-1``, ``Cov_gg = U_g^-1 + (U_g^-1 W_g) S^-1 (U_g^-1 W_g)^T``."""
    with _threads(theta.device):
        return _stderr_global(model, layout, data, theta, shared, ok, scale)


def _stderr_global(
    model: FitModel,
    layout: Layout,
    data: Packed,
    theta: torch.Tensor,
    shared: torch.Tensor,
    ok: np.ndarray,
    scale: bool,
) -> tuple[np.ndarray, np.ndarray, bool]:
    keep = torch.as_tensor(np.flatnonzero(ok), device=theta.device)
    sub = data.take(keep)
    free = external_values(model, layout, theta[keep], shared).to(theta.dtype)
    tg, ts = split_external(layout, free)
    ja, jb, r = jacobian(model, layout, sub, tg, ts, external=True)
    jat = ja.transpose(-1, -2)
    u, w = jat @ ja, jat @ jb
    v = (jb.transpose(-1, -2) @ jb).sum(0)
    uinv = torch.linalg.pinv(u, hermitian=True)
    uw = uinv @ w
    schur = v - (w.transpose(-1, -2) @ uw).sum(0)
    sinv = torch.linalg.pinv(schur, hermitian=True)
    cov_g = torch.diagonal(uinv + uw @ sinv @ uw.transpose(-1, -2), dim1=-2, dim2=-1)
    cov_s = torch.diagonal(sinv)
    q, s = theta.shape[1], shared.numel()
    n = int(sub.counts.sum())
    p = q * keep.numel() + s
    s2 = float((r * r).sum()) / max(n - p, 1) if scale else 1.0
    singular = bool(_singular(u).any()) or (s > 0 and bool(_singular(schur[None])[0]))
    out = np.full((theta.shape[0], q), math.nan)
    out[keep.cpu().numpy()] = torch.sqrt(cov_g * s2).cpu().numpy()
    return out, torch.sqrt(cov_s * s2).cpu().numpy(), singular
