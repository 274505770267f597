"""Levenberg-Marquardt on many independent groups as one compiled program (numba).

`fitcli.lm_batch` runs thousands of small fits as one tensor program: every operation is a pass
over a [groups, points] array, and on the CPU most of an iteration is torch's reverse pass
through the expression and the traffic of those arrays through memory. Here the same fits run as
compiled code, one group at a time on each CPU thread (Cpufit's design, for any expression): the
checked expression tree of `fitcli.expr` is translated into straight-line forward-mode code (the
value and its derivative in every parameter, one scalar each, per point), and one loop over a
group's points accumulates J^T J, J^T r and the residual sum of squares without ever storing J.
The steps, tests and stop codes are those of `fitcli.lm_batch` (Moré's scaling, Nielsen's
damping update, MINPACK's tests, the polishing of nearly Gauss-Newton steps), so a group ends
where a lane of `lm_batch.solve` ends, to rounding.

`compile_groups(model, dtype)` returns the compiled program of a model, or None where this path
does not apply, and `lm_batch` does the work: no numba, a function outside `_UNARY` and the
constructs `_Gen` translates, ties, more than `MAX_PARAMS` free parameters. Bounds are torch's
transforms of the internal values (`_transform`), fixed values constants. A run compiles only
where it is worth it (`worth_it`: from `MIN_CELLS` data cells on, or as ``FITCLI_JIT`` says),
and `fitcli.groups.compiled` checks the translation against torch's autograd on the first
groups of every data set before using it.

The generated module holds the model's ``linearize`` and the drivers that call it; the steps
themselves are `fitcli.lm_kernels`, compiled once per machine and linked into every model's
module. It is written to a cache directory (``FITCLI_CACHE_DIR``, else
``$XDG_CACHE_HOME/fitcli`` or ``~/.cache/fitcli``) under the hash of its source, so that numba's
own cache keeps its machine code between processes: the first run of a model compiles it (about
two seconds), later ones load it (a third of a second, numba's start-up). Where that directory
cannot be written, it compiles in memory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import math
import operator
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fitcli.lm_batch import LMOptions, Stop

# Beyond this many parameters per group the unrolled normal equations (p (p + 1) / 2 scalar
# sums) make compiling slow and the batched tensor program is the better tool.
MAX_PARAMS = 12
# A block of groups holds about this many bytes of data per thread: the groups a stop can
# leave at different iterations (a stopped block's running groups all stop at the same one;
# later blocks do not start).
BLOCK_BYTES = 16_000_000


class _Unsupported(Exception):
    """The expression uses something the translation does not cover."""


# name -> (value, derivative in u and the value v): numba's math, torch's formulas.
_UNARY: dict[str, tuple[str, str]] = {
    "sin": ("math.sin({u})", "math.cos({u})"),
    "cos": ("math.cos({u})", "-math.sin({u})"),
    "tan": ("math.tan({u})", "1.0 + {v} * {v}"),
    "asin": ("math.asin({u})", "1.0 / math.sqrt(1.0 - {u} * {u})"),
    "acos": ("math.acos({u})", "-1.0 / math.sqrt(1.0 - {u} * {u})"),
    "atan": ("math.atan({u})", "1.0 / ({u} * {u} + 1.0)"),
    "sinh": ("math.sinh({u})", "math.cosh({u})"),
    "cosh": ("math.cosh({u})", "math.sinh({u})"),
    "tanh": ("math.tanh({u})", "1.0 - {v} * {v}"),
    "exp": ("_exp({u})", "{v}"),
    "log": ("_log({u})", "1.0 / {u}"),
    "log10": ("_log({u}) * 0.4342944819032518", "1.0 / ({u} * 2.302585092994046)"),
    "log2": ("_log({u}) * 1.4426950408889634", "1.0 / ({u} * 0.6931471805599453)"),
    "sqrt": ("_sqrt({u})", "0.5 / {v}"),
    "abs": ("abs({u})", "_sign({u})"),
    "erf": ("math.erf({u})", "1.1283791670955126 * _exp(-{u} * {u})"),
    "erfc": ("math.erfc({u})", "-1.1283791670955126 * _exp(-{u} * {u})"),
    "log1p": ("_log1p({u})", "1.0 / ({u} + 1.0)"),
}
_ALIASES = {"arcsin": "asin", "arccos": "acos", "arctan": "atan"}
_COMPARE = {operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">="}

_PRELUDE = """\
import math

import numpy as np
from numba import njit

from fitcli.lm_kernels import JIT, check, propose, update  # source {kernels}, vectors {lanes}
from fitcli.lm_kernels import exp as _exp

# Arithmetic in float64 whatever the run's dtype; S is how parameters are stored (a float32
# run's values stay float32, each trial point rounded to it): a float32 fit then stops where
# float32 parameters stop improving, rather than iterating in float32 arithmetic's noise.
T = np.float64
S = np.{dtype}
JIT = dict(JIT, cache={cache})


@njit(**JIT)
def _log(u):
    return math.log(u) if u > 0 else (-math.inf if u == 0 else math.nan)


@njit(**JIT)
def _log1p(u):
    return math.log1p(u) if u > -1 else (-math.inf if u == -1 else math.nan)


@njit(**JIT)
def _sqrt(u):
    return math.sqrt(u) if u >= 0 else math.nan


@njit(**JIT)
def _sign(u):
    return 1.0 if u > 0 else (-1.0 if u < 0 else 0.0)
"""

# The drivers: each group's start, then its iterations (`fitcli.lm_kernels`' propose, this
# model's linearize at the trial point, update).
_LM = """

# The model's free parameters: a constant, so the inlined steps' loops over them unroll.
P = {params}


@njit(**JIT)
def _span(n, length):
    # A group's points and its pads up to a multiple of the vector lanes, within the packing.
    return min(length, (n + {lanes_minus_1}) // {lanes} * {lanes})


@njit(**JIT)
def start_range(x, wy, w, counts, lo, hi, gtol, theta, jtj, jtr, scale2, state, code):
    length = w.shape[1]
    for g in range(lo, hi):
        n = _span(counts[g], length)
        cost = linearize(x[g], wy[g], w[g], n, theta[g], jtj[g], jtr[g], False)
        state[g, 3] = cost
        check(jtj[g], jtr[g], cost, scale2[g], code[g : g + 1], True, gtol, P)


@njit(**JIT)
def step_index(
    x, wy, w, counts, idx, steps, ftol, xtol, gtol, theta, jtj, jtr, scale2, state, code,
    mats, vecs, trial,
):  # fmt: skip
    jtj_t = mats[5]
    jtr_t = vecs[0]
    length = w.shape[1]
    for g in idx:
        n = _span(counts[g], length)
        cg = code[g : g + 1]
        for _ in range(steps):
            if cg[0] != 0:
                break
            go, predicted, step_norm, xsmall, polishing = propose(
                theta[g], jtj[g], jtr[g], scale2[g], state[g], cg, xtol, trial, mats, vecs, P
            )
            if not go:
                break
            new = linearize(x[g], wy[g], w[g], n, trial, jtj_t, jtr_t, False)
            update(
                theta[g], jtj[g], jtr[g], scale2[g], state[g], cg, trial, jtj_t, jtr_t, new,
                predicted, step_norm, xsmall, polishing, ftol, gtol, P,
            )


@njit(**JIT)
def linearize_range(x, wy, w, counts, theta, lo, hi, out_cost, out_jtj, out_jtr, external):
    length = w.shape[1]
    for g in range(lo, hi):
        out_cost[g] = linearize(
            x[g], wy[g], w[g], _span(counts[g], length), theta[g], out_jtj[g], out_jtr[g],
            external,
        )
"""


@dataclass
class _Gen:
    """The straight-line code of one point: each node's value and its derivatives as locals."""

    index: dict[str, int]
    variables: tuple[str, ...]
    lines: list[str]
    count: int = 0

    def new(self, expr: str) -> str:
        self.count += 1
        name = f"t{self.count}"
        self.lines.append(f"{name} = {expr}")
        return name

    def node(self, node: tuple) -> tuple[str, dict[int, str]]:
        tag = node[0]
        if tag == "num":
            value = float(node[1])
            if not math.isfinite(value):
                raise _Unsupported("a non-finite constant")
            return f"T({value!r})", {}
        if tag == "x":
            return "xi", {}
        if tag == "var":
            return f"x_{node[1]}", {}
        if tag == "param":
            name = node[1]
            return f"p_{name}", ({self.index[name]: "1.0"} if name in self.index else {})
        if tag == "neg":
            u, du = self.node(node[1])
            return self.new(f"-{u}"), {k: self.new(f"-{d}") for k, d in du.items()}
        if tag == "pow":
            return self.power(node)
        if tag == "chain":
            return self.chain(node)
        if tag == "call":
            return self.call(node)
        raise _Unsupported(tag)

    def times(self, d: str, w: str) -> str:
        if d == "1.0":
            return w
        return self.new(f"{d} * {w}")

    def chain(self, node: tuple) -> tuple[str, dict[int, str]]:
        v, t = self.node(node[1])
        for op, child in node[2]:
            w, tw = self.node(child)
            if op is operator.add or op is operator.sub:
                sym = "+" if op is operator.add else "-"
                v = self.new(f"{v} {sym} {w}")
                t = dict(t)
                for k, d in tw.items():
                    t[k] = self.new(f"{t[k]} {sym} {d}") if k in t else self.new(f"{sym}{d}")
            elif op is operator.mul:
                new = {k: self.times(d, w) for k, d in t.items()}
                for k, d in tw.items():
                    e = self.times(d, v)
                    new[k] = self.new(f"{new[k]} + {e}") if k in new else e
                v, t = self.new(f"{v} * {w}"), new
            elif op is operator.truediv:
                q = self.new(f"{v} / {w}")
                new = dict(t)
                for k, d in tw.items():
                    e = self.times(d, q)
                    new[k] = self.new(f"{new[k]} - {e}") if k in new else self.new(f"-{e}")
                t = {k: self.new(f"{d} / {w}") for k, d in new.items()}
                v = q
            else:
                raise _Unsupported("operator")
        return v, t

    def power(self, node: tuple) -> tuple[str, dict[int, str]]:
        u, tu = self.node(node[1])
        if node[2][0] == "num":
            c = float(node[2][1])
            if c == 2.0:
                v = self.new(f"{u} * {u}")
                g = self.new(f"T(2.0) * {u}") if tu else ""
            elif c == 1.0:
                return u, tu
            else:
                v = self.new(f"{u} ** T({c!r})")
                if c == 0.0:
                    return v, {k: "T(0.0)" for k in tu}
                g = self.new(f"T({c!r}) * {u} ** T({c - 1.0!r})") if tu else ""
            return v, {k: self.times(d, g) for k, d in tu.items()}
        w, tw = self.node(node[2])
        v = self.new(f"{u} ** {w}")
        t: dict[int, str] = {}
        if tu:
            g = self.new(f"{w} * {u} ** ({w} - T(1.0))")
            t = {k: self.times(d, g) for k, d in tu.items()}
        if tw:
            h = self.new(f"T(0.0) if ({u} == 0 and {w} >= 0) else {v} * _log({u})")
            for k, d in tw.items():
                e = self.times(d, h)
                t[k] = self.new(f"{t[k]} + {e}") if k in t else e
        return v, t

    def call(self, node: tuple) -> tuple[str, dict[int, str]]:
        name = _ALIASES.get(node[1], node[1])
        args = node[2]
        if name == "where":
            test = self.condition(args[0])
            (a, ta), (b, tb) = self.node(args[1]), self.node(args[2])
            zero = "T(0.0)"
            t = {
                k: self.new(f"{ta.get(k, zero)} if {test} else {tb.get(k, zero)}")
                for k in ta.keys() | tb.keys()
            }
            return self.new(f"{a} if {test} else {b}"), t
        if name in ("min", "max"):
            v, t = self.node(args[0])
            for arg in args[1:]:
                w, tw = self.node(arg)
                sym = ">=" if name == "max" else "<="
                first = self.new(f"({v} {sym} {w}) or ({v} != {v})")
                v, t = self.select(first, (v, t), (w, tw))
            return v, t
        if name == "atan2":
            (y, ty), (xx, tx) = self.node(args[0]), self.node(args[1])
            v = self.new(f"math.atan2({y}, {xx})")
            if not ty and not tx:
                return v, {}
            den = self.new(f"{xx} * {xx} + {y} * {y}")
            t = {k: self.new(f"{d} * ({xx} / {den})") for k, d in ty.items()}
            for k, d in tx.items():
                e = self.new(f"{d} * (-{y} / {den})")
                t[k] = self.new(f"{t[k]} + {e}") if k in t else e
            return v, t
        if name not in _UNARY or len(args) != 1:
            raise _Unsupported(name)
        value, derivative = _UNARY[name]
        u, tu = self.node(args[0])
        v = self.new(value.format(u=u))
        if not tu:
            return v, {}
        g = self.new(derivative.format(u=u, v=v))
        return v, {k: self.times(d, g) for k, d in tu.items()}

    def select(
        self, first: str, left: tuple[str, dict[int, str]], right: tuple[str, dict[int, str]]
    ) -> tuple[str, dict[int, str]]:
        (u, tu), (w, tw) = left, right
        zero = "T(0.0)"
        t = {
            k: self.new(f"{tu.get(k, zero)} if {first} else {tw.get(k, zero)}")
            for k in tu.keys() | tw.keys()
        }
        return self.new(f"{u} if {first} else {w}"), t

    def condition(self, node: tuple) -> str:
        if node[0] != "cmp":
            raise _Unsupported("condition")
        a, _ = self.node(node[1])
        parts = []
        for op, right in node[2]:
            b, _ = self.node(right)
            if op not in _COMPARE:
                raise _Unsupported("comparison")
            parts.append(f"({a} {_COMPARE[op]} {b})")
            a = b
        return self.new(" and ".join(parts))


# A parameter of the generated code: (name, bound kind, lower, upper, fixed value). The kinds
# are `fitcli.model.FitModel.external`'s: free and unbounded, both bounds (lo + (hi - lo)
# sigmoid(u)), a lower one (lo + softplus(u)), an upper one (hi - softplus(u)); or fixed.
FREE, BOTH, LOWER, UPPER, FIXED = range(5)
Spec = tuple[tuple[str, int, float, float, float], ...]


def _transform(k: int, kind: int, lo: float, hi: float) -> list[str]:
    """Lines giving p (the value) and c{k} (d value / d internal) of free parameter k from its
    internal value u = th[k]; torch's sigmoid and softplus (threshold 20) and their gradients.
    With `external`, th holds the values themselves (the error bars' Jacobian)."""
    if kind == FREE:
        return [f"    c{k} = 1.0", f"    v{k} = T(th[{k}])"]
    lines = [
        f"    u{k} = T(th[{k}])",
        "    if external:",
        f"        v{k} = u{k}",
        f"        c{k} = 1.0",
    ]
    lines.append("    else:")
    if kind == BOTH:
        lines += [
            f"        e{k} = 1.0 / (1.0 + math.exp(-u{k}))",
            f"        v{k} = {lo!r} + ({hi!r} - {lo!r}) * e{k}",
            f"        c{k} = ({hi!r} - {lo!r}) * e{k} * (1.0 - e{k})",
        ]
    else:
        sign, base = ("", lo) if kind == LOWER else ("-", hi)
        lines += [
            f"        sp{k} = u{k} if u{k} > 20.0 else math.log1p(math.exp(u{k}))",
            f"        v{k} = {base!r} {'+' if kind == LOWER else '-'} sp{k}",
            f"        c{k} = {sign}(1.0 if u{k} > 20.0 else 1.0 / (1.0 + math.exp(-u{k})))",
        ]
    return lines


def _linearize_source(tree: tuple, spec: Spec, variables: tuple[str, ...]) -> str:
    """The generated ``linearize(x, wy, w, n, th, jtj, jtr, external) -> 0.5 * RSS`` of one
    group, th its free parameters' internal values (`external`: their values)."""
    free = [s for s in spec if s[1] != FIXED]
    p = len(free)
    gen = _Gen({s[0]: k for k, s in enumerate(free)}, variables, [])
    value, tangents = gen.node(tree)
    body = ["    " + line for line in gen.lines]
    sums = [(i, j) for i in range(p) for j in range(i + 1)]
    out = ["", "", "@njit(**JIT)", "def linearize(x, wy, w, n, th, jtj, jtr, external):"]
    for k, (name, kind, lo, hi, _) in enumerate(free):
        out += _transform(k, kind, lo, hi)
        out.append(f"    p_{name} = v{k}")
    out += [f"    p_{name} = T({fixed!r})" for name, kind, _, _, fixed in spec if kind == FIXED]
    out += [f"    s{i}_{j} = 0.0" for i, j in sums]
    out += [f"    g{i} = 0.0" for i in range(p)]
    out += ["    rss = 0.0", "    for i in range(n):"]
    if variables == ("x",):
        out.append("        xi = x[i]")
    else:
        out += [f"        x_{v} = x[{j}, i]" for j, v in enumerate(variables)]
    out += ["    " + line for line in body]
    # The sums are float64 whatever T is: each term is converted once, not each product.
    out += ["        wi = w[i]", f"        r = np.float64(wy[i] - wi * {value})"]
    for k in range(p):
        d = tangents.get(k, "T(0.0)")
        out.append(f"        j{k} = np.float64(wi * {d}) * c{k}")
    out += [f"        s{i}_{j} += j{i} * j{j}" for i, j in sums]
    out += [f"        g{k} += j{k} * r" for k in range(p)]
    out.append("        rss += r * r")
    for i, j in sums:
        out.append(f"    jtj[{i}, {j}] = s{i}_{j}")
        if i != j:
            out.append(f"    jtj[{j}, {i}] = s{i}_{j}")
    out += [f"    jtr[{k}] = g{k}" for k in range(p)]
    out.append("    return 0.5 * rss")
    return "\n".join(out) + "\n"


def _source(tree: tuple, spec: Spec, variables: tuple[str, ...], dtype: str) -> str:
    return (
        _PRELUDE.format(dtype=dtype, cache="{cache}", kernels=_kernels_digest(), lanes=_lanes())
        + _linearize_source(tree, spec, variables)
        + _LM.replace("{lanes_minus_1}", str(LANES - 1))
        .replace("{lanes}", str(LANES))
        .replace("{params}", str(sum(1 for s in spec if s[1] != FIXED)))
    )


@functools.cache
def _lanes() -> int:
    """How many float64 lanes LLVM's loop vectorizer is told to use in a model's loop over
    points: 8 where the CPU has AVX-512 (LLVM's tuning for those CPUs keeps to 256-bit vectors,
    4 lanes: the 2-D Gaussian's compiled fit took 1.35x as long so, BENCHMARKS.md), else 0,
    LLVM's own choice. Also 0 where numba is told to compile for another CPU than this one."""
    import llvmlite.binding as llvm  # type: ignore[import-untyped]
    from numba.core import config

    if getattr(config, "CPU_NAME", None) or getattr(config, "CPU_FEATURES", None):
        return 0
    return 8 if llvm.get_host_cpu_features().get("avx512f") else 0


@contextlib.contextmanager
def _vectorizing(lanes: int) -> Any:
    """LLVM's ``-force-vector-width`` set to `lanes` while a model compiles, and reset after
    (the option is the process's: other numba code keeps LLVM's choice)."""
    if not lanes:
        yield
        return
    import llvmlite.binding as llvm

    llvm.set_option("fitcli", f"-force-vector-width={lanes}")
    try:
        with _without_remarks():
            yield
    finally:
        llvm.set_option("fitcli", "-force-vector-width=0")


# LLVM's line for a loop it was told to vectorize and could not (the steps' short loops).
_REMARK = re.compile(r"remark: .*loop not vectorized")


@contextlib.contextmanager
def _without_remarks() -> Any:
    """The process's stderr (file descriptor 2, where LLVM writes) captured inside the block
    and passed on after it without LLVM's "loop not vectorized" remarks: with the vector width
    forced, LLVM reports every loop it leaves scalar, some twenty lines per compiled model."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no stderr to capture
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            rest = [line for line in text.splitlines(keepends=True) if not _REMARK.search(line)]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


@functools.cache
def _kernels_digest() -> str:
    """The hash of `fitcli.lm_kernels`' source, in every generated module: numba's cache of a
    module holds the kernels it linked, so a changed kernel must make a new module."""
    path = Path(__file__).with_name("lm_kernels.py")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where the generated modules and numba's machine code are kept."""
    env = os.environ.get("FITCLI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fitcli"


_LOAD_LOCK = threading.Lock()


def _load(source: str) -> Any:
    """The module of `source`: from a file in `cache_dir()` (numba caches its machine code next
    to it), or compiled in memory where that directory cannot be written."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"fitcli_kernel_{digest}"
    with _LOAD_LOCK:
        if name in sys.modules:
            return sys.modules[name]
        path = cache_dir() / "kernels" / f"{name}.py"
        text = source.replace("{cache}", "True")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except OSError:
            module = type(sys)(name)
            exec(compile(source.replace("{cache}", "False"), name, "exec"), module.__dict__)  # noqa: S102
        sys.modules[name] = module
        return module


def threads() -> int:
    """CPU threads for the compiled fits: the cores this process may run on, at most
    OMP_NUM_THREADS where that is set (torch's own limit; torch itself runs a grouped fit on
    one thread, `fitcli.groups._threads`, so its current setting does not say)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


# The helper threads of the compiled calls (`_helpers`): one pool per process, kept between
# calls (starting threads for each call cost about 1 ms of a 30 ms fit), made again for another
# thread count and in a forked child (which inherits the pool but not its threads).
_HELPERS: dict[str, Any] = {}
_HELPERS_LOCK = threading.Lock()


def _helpers() -> concurrent.futures.ThreadPoolExecutor | None:
    """The pool of threads() - 1 helper threads (None for one thread). The calling thread
    takes a share of each call and waits for the helpers, which never wait for each other, so
    calls from several threads at once share the pool without deadlock."""
    n = threads() - 1
    if n < 1:
        return None
    with _HELPERS_LOCK:
        pool = _HELPERS.get("pool")
        if pool is None or pool._max_workers != n:
            # A pool of another size is dropped, not shut down: a call in another thread may
            # still be handing it work; its threads end once it is no longer referenced.
            pool = _HELPERS["pool"] = concurrent.futures.ThreadPoolExecutor(
                n, thread_name_prefix="fitcli-lm"
            )
        return pool


def stop_helpers() -> None:
    """End the helper threads (idle between calls; the next call starts them again): the CLI
    does this before its quick exit, which any other live thread would turn into the
    interpreter's full teardown (a second at 10^4 groups)."""
    with _HELPERS_LOCK:
        pool = _HELPERS.pop("pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPERS.clear)


@dataclass
class Program:
    """A model's compiled group fit: `fit` and `linearize` over packed groups (numpy arrays:
    x [G, L], or [G, k, L] for k variables, wy and w [G, L], counts [G]; theta [G, p] in the
    model's order)."""

    module: Any
    dtype: np.dtype
    params: int
    shape: tuple[int, ...]  # () for one variable, (k,) for k of them

    def _run(self, task: Callable[[int, int], None], lo: int, hi: int, pool: Any) -> None:
        """`task(a, b)` over [lo, hi) split evenly over the pool's threads and this one."""
        n = 1 if pool is None else pool._max_workers + 1
        if n == 1 or hi - lo < 2:
            task(lo, hi)
            return
        step = -(-(hi - lo) // n)
        jobs = [pool.submit(task, a, min(hi, a + step)) for a in range(lo + step, hi, step)]
        task(lo, min(hi, lo + step))
        for job in jobs:
            job.result()

    def _each(self, task: Callable[[np.ndarray], None], idx: np.ndarray, pool: Any) -> None:
        """`task(part)` on the groups `idx` dealt round-robin to the pool's threads and this one
        (groups stop at different iterations: dealing them keeps the shares even)."""
        n = 1 if pool is None else pool._max_workers + 1
        if n == 1 or idx.size < 2:
            task(np.ascontiguousarray(idx, dtype=np.int64))
            return
        parts = [np.ascontiguousarray(idx[t::n], dtype=np.int64) for t in range(n)]
        jobs = [pool.submit(task, part) for part in parts[1:]]
        task(parts[0])
        for job in jobs:
            job.result()

    def _pool(self) -> Any:
        return _helpers()

    def fit(
        self,
        x: np.ndarray,
        wy: np.ndarray,
        w: np.ndarray,
        counts: np.ndarray,
        theta: np.ndarray,
        damping: np.ndarray,
        opts: LMOptions,
        should_stop: Callable[[], bool] | None = None,
        carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """LM on every group from theta [G, p] (the model's dtype), damping [G] and `carry`
        (nu [G], scale2 [G, p], polish [G] of `lm_batch.Carry`; None: the start's): theta,
        damping, iterations, code (`lm_batch.Stop`), cost (0.5 RSS), jtj, jtr, nu, scale2 and
        polish per group.

        The groups run in blocks of about `BLOCK_BYTES` of data per thread, a block's running
        groups dealt to the threads. `should_stop` is asked before each iteration of each block,
        as `lm_batch.solve` asks it (in rounds, `_rounds`); on True the block's running groups
        stop there (INTERRUPTED, their current values and damping) and later blocks do not
        start."""
        g, p = theta.shape
        th = np.array(theta, dtype=self.dtype, order="C")
        jtj = np.full((g, p, p), math.nan)
        jtr = np.full((g, p), math.nan)
        state = np.zeros((g, 5))
        state[:, 0] = damping
        state[:, 3] = math.nan
        if carry is None:
            scale2 = np.zeros((g, p))
            state[:, 1], state[:, 2] = 2.0, math.nan
        else:
            scale2 = np.array(carry[1], dtype=np.float64, order="C")
            state[:, 1], state[:, 2] = carry[0], carry[2]
        code = np.zeros(g, dtype=np.int64)
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        ftol, xtol, gtol = float(opts.ftol), float(opts.xtol), float(opts.gtol)
        mod = self.module
        pool = self._pool()
        n_threads = 1 if pool is None else pool._max_workers + 1
        per_group = (x[:1].nbytes + wy[:1].nbytes + w[:1].nbytes) or 1
        block = max(16, n_threads * BLOCK_BYTES // per_group)

        def start(a: int, b: int) -> None:
            mod.start_range(x, wy, w, counts, a, b, gtol, th, jtj, jtr, scale2, state, code)

        def step(steps: int) -> Callable[[np.ndarray], None]:
            def run(idx: np.ndarray) -> None:
                # Each call's work arrays (`lm_kernels.propose`'s); the kernels do not allocate.
                mats, vecs, trial = np.empty((6, p, p)), np.empty((5, p)), np.empty(p, th.dtype)
                mod.step_index(
                    x, wy, w, counts, idx, steps, ftol, xtol, gtol, th, jtj, jtr, scale2, state,
                    code, mats, vecs, trial,
                )  # fmt: skip

            return run

        interrupted = False
        for lo in range(0, g, block):
            hi = min(g, lo + block)
            if interrupted:
                code[lo:hi] = int(Stop.INTERRUPTED)
                continue
            self._run(start, lo, hi, pool)
            if should_stop is None:
                self._each(step(int(opts.max_iter)), np.arange(lo, hi), pool)
            else:
                interrupted = self._rounds(
                    step, lo, hi, code, int(opts.max_iter), should_stop, pool
                )
            left = code[lo:hi]
            left[left == 0] = int(Stop.INTERRUPTED if interrupted else Stop.LIMIT)
        return {
            "theta": th,
            "damping": state[:, 0].copy(),
            "iterations": state[:, 4].astype(np.int64),
            "code": code,
            "cost": state[:, 3].copy(),
            "jtj": jtj,
            "jtr": jtr,
            "nu": state[:, 1].copy(),
            "scale2": scale2,
            "polish": state[:, 2].copy(),
        }

    def _rounds(
        self,
        step: Callable[[int], Callable[[np.ndarray], None]],
        lo: int,
        hi: int,
        code: np.ndarray,
        max_iter: int,
        should_stop: Callable[[], bool],
        pool: Any,
    ) -> bool:
        """The iterations of the block [lo, hi) in rounds of up to `ASK_AHEAD`: before a
        round, `should_stop` is asked once for each of its iterations, in order, and the round
        ends before the first True; each running group then runs the round's iterations back
        to back, its data staying in the core's cache (one pass over the block per iteration
        made the fit of 10^4 groups of 100 points 1.6x as slow). Every group still running has
        run the same iterations, so a stop leaves them all where `should_stop` said. Returns
        whether it said stop."""
        done = 0
        while done < max_iter:
            running = lo + np.flatnonzero(code[lo:hi] == 0)
            if not running.size:
                return False
            steps = 0
            stop = False
            while steps < min(ASK_AHEAD, max_iter - done):
                if should_stop():
                    stop = True
                    break
                steps += 1
            if steps:
                self._each(step(steps), running, pool)
            done += steps
            if stop:
                return True
        return False

    def covariance(self, jtj: np.ndarray, rcond: float) -> tuple[np.ndarray, np.ndarray]:
        """Per group of jtj [G, p, p] (float64): the diagonal of pinv(J^T J) [G, p] and whether
        the column-scaled J^T J is singular at `rcond` [G] (`fitcli.lm_kernels.covariance_range`:
        torch's pinv and `fitcli.groups._singular`, computed here)."""
        from fitcli.lm_kernels import covariance_range

        g, p = jtj.shape[0], jtj.shape[1]
        var = np.empty((g, p))
        singular = np.zeros(g, dtype=np.bool_)
        jtj = np.ascontiguousarray(jtj, dtype=np.float64)

        def task(lo: int, hi: int) -> None:
            covariance_range(jtj, lo, hi, rcond, var, singular, np.empty((5, p, p)))

        self._over_groups(task, g)
        return var, singular

    def warm(self) -> None:
        """Compile (or load from the cache) every entry point now, on one group of one point,
        so that the first real call is all fitting."""
        x1 = np.zeros((1, *self.shape, 1), dtype=self.dtype)
        w1 = np.ones((1, 1), dtype=self.dtype)
        th = np.zeros((1, self.params), dtype=self.dtype)
        one = np.ones(1, dtype=np.int64)
        self.fit(x1, w1, w1, one, th, np.full(1, 1e-3), LMOptions(max_iter=1))
        self.linearize(x1, w1, w1, one, th)
        self.linearize(x1, w1, w1, one, th, external=True)
        self.covariance(np.eye(self.params)[None], 1e-13)

    def linearize(
        self,
        x: np.ndarray,
        wy: np.ndarray,
        w: np.ndarray,
        counts: np.ndarray,
        theta: np.ndarray,
        external: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(0.5 RSS [G], J^T J [G, p, p], J^T r [G, p]) at theta (the internal values; with
        `external`, the values themselves and J with respect to them), in float64."""
        g, p = theta.shape
        cost, jtj, jtr = np.empty(g), np.empty((g, p, p)), np.empty((g, p))
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        theta = np.ascontiguousarray(theta)
        run = self.module.linearize_range

        def task(lo: int, hi: int) -> None:
            run(x, wy, w, counts, theta, lo, hi, cost, jtj, jtr, bool(external))

        self._over_groups(task, g)
        return cost, jtj, jtr

    def _over_groups(self, task: Callable[[int, int], None], g: int) -> None:
        """`task(lo, hi)` once over all g groups, split over the threads."""
        self._run(task, 0, g, self._pool())


# Iterations a block of groups runs per round when the fit can be stopped (`Program._rounds`):
# `should_stop` is asked for up to this many at once, so a stop arrives at most one round of
# a block (milliseconds) after it is asked for.
ASK_AHEAD = 8


# float64 lanes of the vector units the compiled loop over points is written for (AVX-512's;
# AVX2's 4 divide it): a group's loop runs over its pads (weight 0: they add exact zeros) up to
# a multiple of LANES where the packing has them, and so has no scalar remainder (10^4 groups of
# 100 points: 15% less time at 104).
LANES = 8


def padded_length(points: int) -> int:
    """The packed length for groups of at most `points` points: rounded up to a multiple of
    `LANES` where that adds at most an eighth."""
    up = -(-points // LANES) * LANES
    return up if (up - points) * 8 <= points else points


# A run compiles its independent groups' fit from this many data cells (groups x the longest
# group's points) on: below, the batched tensor program takes less time than numba's start-up
# (a third of a second, BENCHMARKS.md), let alone a first compile.
MIN_CELLS = 500_000


def worth_it(cells: int) -> bool:
    """Whether a run of this many cells compiles its fit: ``FITCLI_JIT=1`` always, ``0``
    never, unset from `MIN_CELLS` on."""
    env = os.environ.get("FITCLI_JIT", "")
    if env in ("0", "1"):
        return env == "1"
    return cells >= MIN_CELLS


def available() -> bool:
    """Whether numba can be imported (the compiled path's one requirement)."""
    return importlib.util.find_spec("numba") is not None


def compile_groups(model: Any, dtype: Any) -> Program | None:
    """The compiled group fit of `model` (a `FitModel` with an expression) in `dtype` (torch's
    float32 or float64), or None where this path does not apply (module doc)."""
    expression = getattr(model, "expression", None)
    if expression is None or getattr(model, "_ties", None) or not available():
        return None
    if len(model.free_names) > MAX_PARAMS:
        return None
    if os.environ.get("FITCLI_JIT", "1") == "0":
        return None
    import torch

    name = {torch.float64: "float64", torch.float32: "float32"}.get(dtype)
    if name is None:
        return None
    return _program(expression, _spec(model), name)


def _spec(model: Any) -> Spec:
    """Each parameter of the model in declaration order: name, bound kind, bounds, fixed value."""
    out = []
    for info in model.infos:
        lo, hi = info.min, info.max
        if not info.free:
            out.append((info.name, FIXED, 0.0, 0.0, float(info.value)))
        elif lo is not None and hi is not None:
            out.append((info.name, BOTH, float(lo), float(hi), 0.0))
        elif lo is not None:
            out.append((info.name, LOWER, float(lo), 0.0, 0.0))
        elif hi is not None:
            out.append((info.name, UPPER, 0.0, float(hi), 0.0))
        else:
            out.append((info.name, FREE, 0.0, 0.0, 0.0))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _program(expression: Any, spec: Spec, dtype: str) -> Program | None:
    try:
        text = _source(expression._tree, spec, expression.variables, dtype)
    except _Unsupported:
        return None
    variables = expression.variables
    shape = () if variables == ("x",) else (len(variables),)
    free = sum(1 for s in spec if s[1] != FIXED)
    with _vectorizing(_lanes()):  # compiled (or loaded from numba's cache) here
        program = Program(_load(text), np.dtype(dtype), free, shape)
        program.warm()
    return program
