"""The model-independent machine code of `fitcli.lm_jit`: one group's LM step, its tests and its
damped solve, compiled by numba once per machine (numba's cache, next to this file or in numba's
user-wide cache directory) and linked into every model's generated module.

One LM iteration of a group is `propose` (the damped Gauss-Newton step and its tests before the
model is evaluated), the model's generated ``linearize`` at the trial point, then `update` (accept
or reject, Nielsen's damping update, MINPACK's tests): the steps of `fitcli.lm_batch._iterate`
and `_check` for one lane. A group's state is its parameters theta [p], the normal equations
jtj [p, p] and jtr [p] at theta, Moré's scaling scale2 [p] (the running maximum of diag(J^T J)),
``state = [damping, nu, polish, cost, iterations]`` and its stop code (0 while running).

Imported only where a model is compiled: importing it imports numba.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.extending import intrinsic

from fitcli.lm import MAX_DAMPING, MIN_DAMPING, POLISH_CONTRACTION, POLISH_DAMPING, POLISH_RTOL
from fitcli.lm_batch import Stop

# Never nnan or ninf (the stopping tests read NaN and inf), nor nsz with reassoc: together they
# make numba's math.isfinite true of NaN.
FAST = {"arcp", "contract", "reassoc"}
# Every kernel and every generated driver is compiled without numba's reference counting
# (`_nrt=False`): none of them allocates, and each view of a group's row (theta[g], mats[4], ...)
# would otherwise cost a call and an atomic operation each way. They made up two thirds of an
# iteration's steps: `propose` took 240 ns per call for 3 parameters with them, 90 ns without.
JIT: dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy", fastmath=FAST, _nrt=False)
# The steps of an iteration (`check`, `damped_solve`, `propose`, `update`) are inlined into each
# model's generated drivers, which pass the number of free parameters p as a constant of their
# module: LLVM then unrolls their p-long loops and keeps the values in registers (`propose` for
# 3 parameters: 134 ns a call as a called function of a run-time p, 48 ns so).
STEP: dict[str, Any] = dict(JIT, inline="always")

_NONFINITE_START = int(Stop.NONFINITE_START)
_NONFINITE = int(Stop.NONFINITE)
_EXACT = int(Stop.EXACT)
_GTOL = int(Stop.GTOL)
_FTOL = int(Stop.FTOL)
_XTOL = int(Stop.XTOL)
_ROUNDING = int(Stop.ROUNDING)
_DAMPING = int(Stop.DAMPING)


@intrinsic
def _bits_double(typingctx, x):  # pragma: no cover - typing of machine code
    """The float64 of an int64's bits."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# exp(x) = 2^k exp(r), r = x - k ln 2 in [-ln2 / 2, ln2 / 2] (Cody and Waite's two-part ln 2),
# exp(r) by its Taylor polynomial to r^13 (remainder under 1e-17 relative), 2^k built in the
# exponent bits in two halves so that results down to the subnormals come out right.
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))


# Its own flags (no reassoc: that could merge the two parts of ln 2) stay on its instructions
# where LLVM inlines it into a model's loop.
@njit(**{**JIT, "fastmath": {"contract"}})
def exp(x):  # pragma: no cover - machine code
    """exp(x) to within about one ulp (libm's is within half of one), in arithmetic and bit
    operations only, so that a model's loop over its points vectorizes; libm's exp is a call
    that stops it. NaN, inf, overflow and underflow as libm gives them."""
    xc = min(max(x, -745.2), 709.8)
    k = np.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    c = _EXP_TAYLOR
    q = c[0]
    for i in range(1, 14):
        q = q * r + c[i]
    n = np.int64(k)
    half = n >> 1
    # q 2^h first, then 2^(n - h): 2^n itself overflows for n = 1024.
    q = q * _bits_double((half + 1023) << 52)  # type: ignore[call-arg]
    q = q * _bits_double((n - half + 1023) << 52)
    return q if x == x else x


@njit(**STEP)
def check(a, g, cost, scale2, code, first, gtol, p):  # pragma: no cover - machine code
    """`lm_batch._check` for one group at a fresh linearization (a = J^T J, g = J^T r; p
    parameters)."""
    rss = 2.0 * cost
    finite = math.isfinite(rss)
    for i in range(p):
        for j in range(p):
            if not math.isfinite(a[i, j]):
                finite = False
    if not finite:
        code[0] = _NONFINITE_START if first else _NONFINITE
    cosine = 0.0
    for k in range(p):
        d = a[k, k]
        scale2[k] = max(scale2[k], d if d > 0 else 1.0)
        c = abs(g[k]) / math.sqrt(max(d, 1e-300) * rss)
        if c > cosine or c != c:
            cosine = c
    if finite:
        if rss == 0:
            code[0] = _EXACT
        elif cosine <= gtol and code[0] == 0:
            code[0] = _GTOL


@njit(**JIT)
def _jacobi_solve(m, rhs, z, work):  # pragma: no cover - machine code
    """z = pinv(m) rhs for a symmetric m, its null space dropped (`lm_batch._damped_solve`'s
    eigendecomposition); m is overwritten (non-finite entries as 0)."""
    p = m.shape[0]
    a = work[0]
    v = work[1]
    for i in range(p):
        for j in range(p):
            if not math.isfinite(m[i, j]):
                m[i, j] = 0.0
    _eigen(m, a, v)
    top = 0.0
    for i in range(p):
        top = max(top, abs(a[i, i]))
    cutoff = max(top, 1e-300) * p * 2.2e-16
    for i in range(p):
        z[i] = 0.0
    for k in range(p):
        ev = a[k, k]
        if ev > cutoff:
            proj = 0.0
            for i in range(p):
                proj += v[i, k] * rhs[i]
            proj /= ev
            for i in range(p):
                z[i] += v[i, k] * proj


@njit(**STEP)
def damped_solve(m, rhs, lam, z, work, p):  # pragma: no cover - machine code
    """(m + lam I) z = rhs for p x p m: Cholesky, or the pseudo-inverse where it fails
    (lm_batch's rule)."""
    c = work[0]
    ok = True
    for i in range(p):
        for j in range(i + 1):
            s = m[i, j] + (lam if i == j else 0.0)
            for k in range(j):
                s -= c[i, k] * c[j, k]
            if i == j:
                if not (s > 0.0):
                    ok = False
                    break
                c[i, i] = math.sqrt(s)
            else:
                c[i, j] = s / c[j, j]
        if not ok:
            break
    if ok:
        for i in range(p):
            s = rhs[i]
            for k in range(i):
                s -= c[i, k] * z[k]
            z[i] = s / c[i, i]
        for i in range(p - 1, -1, -1):
            s = z[i]
            for k in range(i + 1, p):
                s -= c[k, i] * z[k]
            z[i] = s / c[i, i]
        for i in range(p):
            if not math.isfinite(z[i]):
                ok = False
    if not ok:
        d = work[2]
        for i in range(p):
            for j in range(p):
                d[i, j] = m[i, j] + (lam if i == j else 0.0)
        _jacobi_solve(d, rhs, z, work)


@njit(**STEP)
def propose(theta, jtj, jtr, scale2, state, code, xtol, trial, mats, vecs, p):  # pragma: no cover
    """The next iteration's step from the group's state (p parameters): writes the trial point
    into `trial` (in theta's dtype) and returns (go on, predicted decrease, scaled step norm,
    whether the step is small by xtol, whether it is a polishing step); go on is False where the
    polishing has reached rounding level (code ROUNDING, no trial to evaluate)."""
    m = mats[4]
    d = vecs[1]  # Moré's scales sqrt(scale2), each root taken once
    delta = vecs[2]
    rhs = vecs[3]
    z = vecs[4]
    lam = state[0]
    polish = state[2]
    cost = state[3]
    state[4] += 1.0
    for i in range(p):
        d[i] = math.sqrt(scale2[i])
    for i in range(p):
        di = d[i]
        rhs[i] = jtr[i] / di
        for j in range(p):
            v = jtj[i, j] / (di * d[j])
            m[i, j] = v if math.isfinite(v) else 0.0
    damped_solve(m, rhs, lam, z, mats[:3], p)
    step2 = 0.0
    theta2 = 0.0
    for i in range(p):
        di = d[i]
        dl = z[i] / di
        delta[i] = dl if math.isfinite(dl) else 0.0
        step2 += (di * delta[i]) ** 2
        theta2 += (di * theta[i]) ** 2
    step_norm = math.sqrt(step2)
    theta_norm = math.sqrt(theta2)
    lin = 0.0
    quad = 0.0
    for i in range(p):
        lin += jtr[i] * delta[i]
        s = 0.0
        for j in range(p):
            s += jtj[i, j] * delta[j]
        quad += delta[i] * s
    predicted = lin - 0.5 * quad
    polishing = predicted <= POLISH_RTOL * cost and lam <= POLISH_DAMPING
    xsmall = step_norm <= xtol * (xtol + theta_norm)
    if math.isfinite(polish) and (step_norm > POLISH_CONTRACTION * polish or xsmall):
        code[0] = _ROUNDING
        return False, predicted, step_norm, xsmall, polishing
    for i in range(p):
        trial[i] = theta[i] + delta[i]
    return True, predicted, step_norm, xsmall, polishing


@njit(**STEP)
def update(
    theta, jtj, jtr, scale2, state, code, trial, jtj_t, jtr_t, new, predicted, step_norm, xsmall,
    polishing, ftol, gtol, p,
):  # fmt: skip  # pragma: no cover - machine code
    """Accept or reject the trial point (its 0.5 RSS `new` and normal equations jtj_t, jtr_t),
    update the damping and run the tests (`lm_batch._iterate`); p parameters."""
    lam = state[0]
    nu = state[1]
    polish = state[2]
    c = state[3]
    fin = math.isfinite(new)
    actual = c - new if fin else -math.inf
    rho = actual / predicted if predicted > 0 else -math.inf
    pol_ok = polishing and actual >= -POLISH_RTOL * c
    if pol_ok:
        rho = max(rho, 0.0)
    if pol_ok or (rho > 0 and fin):
        for i in range(p):
            theta[i] = trial[i]
            jtr[i] = jtr_t[i]
            for j in range(p):
                jtj[i, j] = jtj_t[i, j]
        state[3] = new
        factor = max(1.0 - (2.0 * rho - 1.0) ** 3, 1.0 / 3.0)
        state[0] = max(lam * factor, MIN_DAMPING)
        state[1] = 2.0
        if pol_ok:
            state[2] = step_norm
            polish = step_norm
        plain = not math.isfinite(polish)
        if plain and actual <= ftol * c and predicted <= ftol * c:
            code[0] = _FTOL
        elif plain and xsmall:
            code[0] = _XTOL
        else:
            check(jtj, jtr, new, scale2, code, False, gtol, p)
    else:
        state[0] = lam * nu
        state[1] = nu * 2.0
        if xsmall:
            code[0] = _XTOL
        elif lam * nu > MAX_DAMPING:
            code[0] = _DAMPING


# The Cholesky path's bound on the scaled J^T J's condition number: below it the inverse is
# accurate to about 1e-8 relative at worst, and far from `fitcli.lm.SINGULAR_RCOND` (1e-13).
_CHOLESKY_CONDITION = 1e8


@njit(**JIT)
def _covariance_cholesky(m, rcond, out, work):  # pragma: no cover - machine code
    """diag(inv(m)) into `out` by a Cholesky factorization of the column-scaled m, where that
    provably equals `covariance_range`'s eigendecomposition answer: the scaled matrix S is
    positive definite with lambda_max / lambda_min <= trace(S) trace(S^-1) under
    `_CHOLESKY_CONDITION` and under 1 / (2 rcond) (so not singular at rcond), and m's own
    bound trace(m) trace(m^-1) keeps every eigenvalue far above the pseudo-inverse's cutoff
    (p eps of the largest).
    Returns False where it cannot say so (non-finite or non-positive pivots, or a worse
    condition; out may hold partial values): the eigendecomposition decides those groups and
    writes their out. work [5, p, p]."""
    p = m.shape[0]
    s = work[2]
    c = work[3]
    w = work[4]
    d = w[0]  # w's first row holds the scales until w is formed, from its second column on
    trace_m = 0.0
    for i in range(p):
        mi = m[i, i]
        if not (mi > 0.0 and math.isfinite(mi)):
            return False
        d[i] = math.sqrt(mi)
        trace_m += mi
    trace_s = 0.0
    for i in range(p):
        for j in range(p):
            x = m[i, j] / (d[i] * d[j])
            if not math.isfinite(x):
                return False
            s[i, j] = x
        trace_s += s[i, i]
    for i in range(p):
        for j in range(i + 1):
            acc = s[i, j]
            for k in range(j):
                acc -= c[i, k] * c[j, k]
            if i == j:
                if not (acc > 0.0):
                    return False
                c[i, i] = math.sqrt(acc)
            else:
                c[i, j] = acc / c[j, j]
    # The scales move to s's diagonal (no longer needed there) before w = inv(L) overwrites d.
    for i in range(p):
        s[i, i] = d[i]
    for j in range(p):
        w[j, j] = 1.0 / c[j, j]
        for i in range(j + 1, p):
            acc = 0.0
            for k in range(j, i):
                acc += c[i, k] * w[k, j]
            w[i, j] = -acc / c[i, i]
    trace_inv = 0.0
    trace_minv = 0.0
    for i in range(p):
        di = 0.0
        for k in range(i, p):
            di += w[k, i] * w[k, i]
        trace_inv += di
        out[i] = di / (s[i, i] * s[i, i])
        trace_minv += out[i]
    if not (trace_s * trace_inv < _CHOLESKY_CONDITION and trace_s * trace_inv * rcond < 0.5):
        return False
    return trace_m * trace_minv * p * 2.220446049250313e-16 < 1e-3


@njit(**JIT)
def covariance_range(jtj, lo, hi, rcond, var, singular, work):  # pragma: no cover
    """For the groups [lo, hi) of jtj [G, p, p]: the diagonal of pinv(J^T J) into var [G, p]
    (eigenvalues at most p eps of the largest dropped, as ``torch.linalg.pinv(hermitian=True)``)
    and into singular [G] whether the column-scaled J^T J has an eigenvalue at most `rcond` of
    its largest (`fitcli.groups._singular`). work [5, p, p]."""
    p = jtj.shape[1]
    a = work[0]
    v = work[1]
    eps = 2.220446049250313e-16
    for g in range(lo, hi):
        m = jtj[g]
        if _covariance_cholesky(m, rcond, var[g], work):
            singular[g] = False
            continue
        # Column-scaled: the singularity test.
        for i in range(p):
            di = math.sqrt(max(m[i, i], 1e-300))
            for j in range(p):
                dj = math.sqrt(max(m[j, j], 1e-300))
                x = m[i, j] / (di * dj)
                work[2][i, j] = x if math.isfinite(x) else 0.0
        _eigen(work[2], a, v)
        top = -math.inf
        bottom = math.inf
        for k in range(p):
            top = max(top, a[k, k])
            bottom = min(bottom, a[k, k])
        singular[g] = bottom <= rcond * max(top, 1e-300)
        # Unscaled: the pseudo-inverse's diagonal.
        for i in range(p):
            for j in range(p):
                x = m[i, j]
                work[3][i, j] = x if math.isfinite(x) else 0.0
        _eigen(work[3], a, v)
        top = 0.0
        for k in range(p):
            top = max(top, abs(a[k, k]))
        cutoff = p * eps * top
        for i in range(p):
            s = 0.0
            for k in range(p):
                ev = a[k, k]
                if abs(ev) > cutoff and ev != 0.0:
                    s += v[i, k] * v[i, k] / ev
            var[g, i] = s


@njit(**JIT)
def _eigen(m, a, v):  # pragma: no cover - machine code
    """The eigendecomposition of a symmetric m by cyclic Jacobi rotations: the eigenvalues on
    a's diagonal, the eigenvectors in v's columns."""
    p = m.shape[0]
    for i in range(p):
        for j in range(p):
            a[i, j] = m[i, j]
            v[i, j] = 1.0 if i == j else 0.0
    for _sweep in range(60):
        off = 0.0
        on = 0.0
        for i in range(p):
            on += a[i, i] * a[i, i]
            for j in range(i + 1, p):
                off += a[i, j] * a[i, j]
        # Converged when the off-diagonal is below rounding of the diagonal (quadratically:
        # some six sweeps); exactly zero is seldom reached.
        if off <= 1e-34 * on:
            break
        for i in range(p):
            for j in range(i + 1, p):
                if a[i, j] == 0.0:
                    continue
                theta = (a[j, j] - a[i, i]) / (2.0 * a[i, j])
                t = (1.0 if theta >= 0 else -1.0) / (abs(theta) + math.sqrt(theta * theta + 1.0))
                c = 1.0 / math.sqrt(t * t + 1.0)
                s = t * c
                for k in range(p):
                    aki = a[k, i]
                    akj = a[k, j]
                    a[k, i] = c * aki - s * akj
                    a[k, j] = s * aki + c * akj
                for k in range(p):
                    aik = a[i, k]
                    ajk = a[j, k]
                    a[i, k] = c * aik - s * ajk
                    a[j, k] = s * aik + c * ajk
                for k in range(p):
                    vki = v[k, i]
                    vkj = v[k, j]
                    v[k, i] = c * vki - s * vkj
                    v[k, j] = s * vki + c * vkj
