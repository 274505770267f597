"""data.csv's rows as bytes, compiled (numba): every number as ``"%.17g" % v`` writes it.

``"%.17g"`` is the correctly rounded 17-digit decimal of the float's exact binary value (ties to
even). For 1e-10 <= |v| < 2**53, ``v * 10**(16 - e)`` (e the decimal exponent) is exact in 128-bit
integer arithmetic, ``m * 5**k / 2**t`` with the 53-bit significand m and k <= 27, so those are
done here; the few values outside that range (and zero, infinities, NaN) are formatted by Python
beforehand and copied in (`rows`). Without numba, `rows` is None and the caller formats in Python.
"""

from __future__ import annotations

import numpy as np

try:  # numba is optional: lm_jit's compiled fits use it too
    from numba import njit
except ImportError:  # pragma: no cover - the caller formats in Python then
    njit = None  # type: ignore[assignment]

LO, HI = 1e-10, 2.0**53  # the range formatted by the compiled kernel (k <= 27 below)
CELL = 24  # the longest %.17g of a float64: -1.2345678901234567e-308

_P5 = np.array([5**k for k in range(28)], dtype=np.uint64)


u = np.uint64


def _jit(fn):
    """Compiled by numba (its machine code cached on disk), where numba imports."""
    return fn if njit is None else njit(cache=True, nogil=True)(fn)


@_jit
def _digits17(bits, p5, buf):  # pragma: no cover - compiled
    """The 17 digits of |v| (bits: its IEEE bits, LO <= |v| < HI) into buf; its exponent."""
    m = (bits & u(0xFFFFFFFFFFFFF)) | u(0x10000000000000)
    s = 1075 - np.int64((bits >> u(52)) & u(0x7FF))
    v = np.float64(m) / 2.0**s
    x0 = np.int64(np.floor(np.log10(v)))
    for _ in range(4):
        k = 16 - x0
        if k < 0 or k > 27:
            return -999
        p = p5[k]
        t = s - k
        mh, ml = m >> u(32), m & u(0xFFFFFFFF)
        ph, pl = p >> u(32), p & u(0xFFFFFFFF)
        ll = ml * pl
        mid = ml * ph + mh * pl
        lo = ll + (mid << u(32))
        hi = mh * ph + (mid >> u(32)) + (u(1) if lo < ll else u(0))
        if t <= 0:
            if hi != u(0) or -t > 8:
                return -999
            n = lo << u(-t)
            floor = n
        else:
            tu = u(t)
            if t > 63 or (hi >> tu) != u(0):
                return -999
            floor = (hi << (u(64) - tu)) | (lo >> tu)
            rem = lo & ((u(1) << tu) - u(1))
            half = u(1) << (tu - u(1))
            n = floor
            if rem > half or (rem == half and (floor & u(1)) == u(1)):
                n = floor + u(1)
        if floor < u(10**16):
            x0 -= 1
            continue
        if floor >= u(10**17):
            x0 += 1
            continue
        if n == u(10**17):
            n = u(10**16)
            x0 += 1
        for j in range(16, -1, -1):
            buf[j] = 48 + np.uint8(n % u(10))
            n //= u(10)
        return x0
    return -999


@_jit
def _put17(bits, neg, p5, buf, out, pos):  # pragma: no cover - compiled
    """Write %.17g of the value at out[pos:]; the new position (-1: not in range)."""
    x = _digits17(bits, p5, buf)
    if x == -999:
        return -1
    last = 16
    while buf[last] == 48:
        last -= 1
    if neg:
        out[pos] = 45  # -
        pos += 1
    if -4 <= x < 17:
        if x >= 0:
            for j in range(x + 1):
                out[pos] = buf[j]
                pos += 1
            if last > x:
                out[pos] = 46  # .
                pos += 1
                for j in range(x + 1, last + 1):
                    out[pos] = buf[j]
                    pos += 1
        else:
            out[pos] = 48
            out[pos + 1] = 46
            pos += 2
            for _ in range(-x - 1):
                out[pos] = 48
                pos += 1
            for j in range(last + 1):
                out[pos] = buf[j]
                pos += 1
    else:
        out[pos] = buf[0]
        pos += 1
        if last > 0:
            out[pos] = 46
            pos += 1
            for j in range(1, last + 1):
                out[pos] = buf[j]
                pos += 1
        out[pos] = 101  # e
        out[pos + 1] = 45 if x < 0 else 43
        ax = -x if x < 0 else x
        pos += 2
        if ax >= 100:
            out[pos] = 48 + ax // 100
            pos += 1
        out[pos] = 48 + (ax // 10) % 10
        out[pos + 1] = 48 + ax % 10
        pos += 2
    return pos


@_jit
def _fill(bits, side, side_at, side_text, has_labels, codes, labels, label_at, p5, out):  # noqa: E501 # pragma: no cover
    """Rows of the (m, n) bit patterns `bits`: each cell by put17, or copied from
    side_text[side_at[c]:side_at[c+1]] where side[j, i] = c >= 0; then, with labels,
    label codes[i] (labels[label_at[c]:label_at[c+1]]); ',' between cells, '\\n' after."""
    m, n = bits.shape
    buf = np.empty(17, dtype=np.uint8)
    pos = 0
    for i in range(n):
        for j in range(m):
            c = side[j, i]
            if c >= 0:
                for b in range(side_at[c], side_at[c + 1]):
                    out[pos] = side_text[b]
                    pos += 1
            else:
                w = bits[j, i]
                pos = _put17(w & u(0x7FFFFFFFFFFFFFFF), (w >> u(63)) == u(1), p5, buf, out, pos)
                if pos < 0:
                    return -1
            if j < m - 1:
                out[pos] = 44
                pos += 1
        if has_labels:
            out[pos] = 44
            pos += 1
            c = codes[i]
            for b in range(label_at[c], label_at[c + 1]):
                out[pos] = labels[b]
                pos += 1
        out[pos] = 10
        pos += 1
    return pos


def labels_table(labels: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The label cells' bytes end to end, and where each starts (one past the last at the end):
    what `rows` takes, made once per file."""
    at = np.zeros(len(labels) + 1, dtype=np.int64)
    at[1:] = np.cumsum([len(t) for t in labels])
    return np.frombuffer(b"".join(labels) or b"\0", dtype=np.uint8).copy(), at  # writable


def rows(
    arrays: list[np.ndarray],
    codes: np.ndarray | None = None,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    known: list[tuple[list[bytes], np.ndarray] | None] | None = None,
) -> bytes | None:
    """The data.csv lines of these rows (each array a column, then each row's label cell by its
    code into `labels`, a `labels_table`), exactly as ``"%.17g"`` and the label cells write
    them; None without numba. `known[j]`, where given, is column j's text already made: its
    distinct values' texts and each row's index into them (a grid shared by the groups)."""
    if njit is None:
        return None
    block = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    n = block.shape[1]
    mag = np.abs(block)
    outside = ~((mag >= LO) & (mag < HI))  # zero, tiny, huge, inf, nan: Python formats them
    side = np.full(block.shape, -1, dtype=np.int64)
    for j, made in enumerate(known or []):
        if made is not None:
            outside[j] = False
    at = np.flatnonzero(outside.ravel())
    vals = block.ravel()[at].tolist()
    texts = (("%.17g\n" * len(vals)) % tuple(vals)).encode().split(b"\n")[:-1]
    side.ravel()[at] = np.arange(at.size)
    for j, made in enumerate(known or []):
        if made is not None:
            side[j] = made[1] + len(texts)
            texts += made[0]
    side_text, side_at = labels_table(texts)
    grouped = labels is not None and codes is not None
    if labels is not None and codes is not None:
        label_bytes, label_at = labels
        code_arr = np.ascontiguousarray(codes, dtype=np.int64)
        widest = int(np.diff(label_at).max()) if label_at.size > 1 else 0
    else:
        label_bytes, label_at = np.zeros(1, np.uint8), np.zeros(1, dtype=np.int64)
        code_arr = np.zeros(0, dtype=np.int64)
        widest = 0
    out = np.empty(n * (block.shape[0] * (CELL + 1) + widest + 2), dtype=np.uint8)
    end = _fill(
        block.view(np.uint64),
        side,
        side_at,
        side_text,
        grouped,
        code_arr,
        label_bytes,
        label_at,
        _P5,
        out,
    )
    if end < 0:
        return None
    return out[:end].tobytes()
