"""An expression and its exact derivatives in one numpy pass: forward mode on the checked tree.

Levenberg-Marquardt needs the model and its Jacobian at every iteration. At NIST's sizes (tens to
hundreds of points, 2 to 9 parameters) torch's autograd spends most of an iteration in dispatch
and the reverse pass, where the same arithmetic in numpy takes a fraction of that.
`compile_jacobian` walks the checked expression tree of `fitcli.expr` (never Python source, so
no ``eval`` here either) and builds closures that carry, next to each node's value, its
derivative with respect to every parameter the node depends on (a sparse dual number):

    (u v)'  = u' v + u v'          (u / v)' = (u' - (u / v) v') / v
    (u ** c)' = c u ** (c - 1) u'  (u ** v)' = v u ** (v - 1) u' + u ** v log(u) v'
    f(u, w)' = f_u u' + f_w w'     for every function in `fitcli.expr.FUNCTION_TABLE`

The formulas are the ones torch's autograd uses (for ``u ** v`` with ``u == 0`` and ``v >= 0``
the exponent's derivative is 0, as in torch), so the two agree to rounding; the LM core still
compares them on the first rows before it relies on this path (`fitcli.lm.host_ok`).

A parameter's own derivative is the Python float 1.0, and multiplying by it is skipped, so
``b1 * exp(-b2 * x)`` costs the three operations of the value plus two for its derivatives.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fitcli.expr import Expression

# A node's derivatives: parameter index -> d node / d parameter (an array, a numpy scalar or the
# float 1.0 / -1.0); parameters the node does not depend on are absent.
Tangents = dict[int, Any]
# A compiled node: (x, parameter values by name) -> (value, tangents).
Node = Callable[[np.ndarray, Mapping[str, Any]], tuple[Any, Tangents]]

_EMPTY: Tangents = {}  # shared by every constant node; never mutated


class NumpyFunction(NamedTuple):
    """A function's numpy float64 value and its partial derivative in each argument.

    ``partials[i](*args, value)`` is d f / d args[i] from the arguments and the value (torch's
    formula, so that the two paths agree to rounding). A variadic function (``max(a, b, ...)``)
    is folded pairwise left to right, so it lists the partials of its two-argument form.
    """

    value: Callable[..., Any]
    partials: tuple[Callable[..., Any], ...]


def _one(value: Callable[[Any], Any], partial: Callable[[Any, Any], Any]) -> NumpyFunction:
    return NumpyFunction(value, (partial,))


_LN10 = math.log(10.0)
_LN2 = math.log(2.0)

# Keyed by `fitcli.expr.FUNCTION_TABLE`'s names; f'(u) from u and v = f(u), as torch computes it.
FUNCTIONS: dict[str, NumpyFunction] = {
    "sin": _one(np.sin, lambda u, v: np.cos(u)),
    "cos": _one(np.cos, lambda u, v: -np.sin(u)),
    "tan": _one(np.tan, lambda u, v: 1.0 + v * v),
    "asin": _one(np.arcsin, lambda u, v: 1.0 / np.sqrt(1.0 - u * u)),
    "acos": _one(np.arccos, lambda u, v: -1.0 / np.sqrt(1.0 - u * u)),
    "atan": _one(np.arctan, lambda u, v: 1.0 / (u * u + 1.0)),
    "sinh": _one(np.sinh, lambda u, v: np.cosh(u)),
    "cosh": _one(np.cosh, lambda u, v: np.sinh(u)),
    "tanh": _one(np.tanh, lambda u, v: 1.0 - v * v),
    "exp": _one(np.exp, lambda u, v: v),
    "log": _one(np.log, lambda u, v: 1.0 / u),
    "log10": _one(np.log10, lambda u, v: 1.0 / (u * _LN10)),
    "log2": _one(np.log2, lambda u, v: 1.0 / (u * _LN2)),
    "sqrt": _one(np.sqrt, lambda u, v: 0.5 / v),
    "abs": _one(np.abs, lambda u, v: np.sign(u)),
}
"""The numpy side of every function in `fitcli.expr.FUNCTION_TABLE`, by the same name."""


def _loggamma_re(a: Any, b: Any) -> Any:
    from scipy import special

    return special.loggamma(a + 1j * b).real


def _digamma_complex(a: Any, b: Any) -> Any:
    from scipy import special

    return special.psi(a + 1j * b)


# log|Gamma(a + ib)| = Re log Gamma(z): d/da = Re psi(z), d/db = Re(i psi(z)) = -Im psi(z)
FUNCTIONS["loggamma_re"] = NumpyFunction(
    _loggamma_re,
    (
        lambda a, b, v: _digamma_complex(a, b).real,
        lambda a, b, v: -_digamma_complex(a, b).imag,
    ),
)
FUNCTIONS["arcsin"] = FUNCTIONS["asin"]
FUNCTIONS["arccos"] = FUNCTIONS["acos"]
FUNCTIONS["arctan"] = FUNCTIONS["atan"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_loaded = False


def _load_special() -> None:
    """Add the functions that need scipy.special, imported here on first use (never at start-up)."""
    global _loaded
    if _loaded:
        return
    import scipy.special as sc

    def ratio_near_zero(u: Any, f: Callable[[Any], Any], c2: float, c4: float) -> Any:
        # f(u) / u, with its series 1/2 + c2 u^2 + c4 u^4 near 0 (j1, i1: the limit 1/2 at 0)
        tiny = np.abs(u) < 1e-4
        safe = np.where(tiny, 1.0, u)
        return np.where(tiny, 0.5 + u * u * (c2 + c4 * u * u), f(safe) / safe)

    def erfcx_derivative(u: Any, v: Any) -> Any:
        # 2u erfcx(u) - 2/sqrt(pi) cancels for large u: there its asymptotic series
        large = u > 50.0
        w = np.where(large, u, 50.0)
        q = 1.0 / (2.0 * w * w)
        series = term = np.ones_like(w)
        for n in range(1, 9):
            term = term * (-(2 * n + 1)) * q
            series = series + term
        return np.where(
            large, -series / (math.sqrt(math.pi) * w * w), 2.0 * u * v - _TWO_OVER_SQRT_PI
        )

    def gamma_derivative(u: Any, v: Any) -> Any:
        return v * sc.psi(u)

    FUNCTIONS.update(
        {
            "cbrt": _one(np.cbrt, lambda u, v: 1.0 / (3.0 * v * v)),
            "sign": _one(np.sign, lambda u, v: np.zeros_like(u)),
            "erf": _one(sc.erf, lambda u, v: _TWO_OVER_SQRT_PI * np.exp(-u * u)),
            "erfc": _one(sc.erfc, lambda u, v: -_TWO_OVER_SQRT_PI * np.exp(-u * u)),
            "erfcx": _one(sc.erfcx, erfcx_derivative),
            "erfinv": _one(sc.erfinv, lambda u, v: (0.5 * math.sqrt(math.pi)) * np.exp(v * v)),
            "gamma": _one(sc.gamma, gamma_derivative),
            "lgamma": _one(sc.gammaln, lambda u, v: sc.psi(u)),
            "digamma": _one(sc.psi, lambda u, v: sc.polygamma(1, u)),
            "beta": NumpyFunction(
                sc.beta,
                (
                    lambda a, b, v: v * (sc.psi(a) - sc.psi(a + b)),
                    lambda a, b, v: v * (sc.psi(b) - sc.psi(a + b)),
                ),
            ),
            "j0": _one(sc.j0, lambda u, v: -sc.j1(u)),
            "j1": _one(sc.j1, lambda u, v: sc.j0(u) - ratio_near_zero(u, sc.j1, -1 / 16, 1 / 384)),
            "y0": _one(sc.y0, lambda u, v: -sc.y1(u)),
            "y1": _one(sc.y1, lambda u, v: sc.y0(u) - v / u),
            "i0": _one(sc.i0, lambda u, v: sc.i1(u)),
            "i1": _one(sc.i1, lambda u, v: sc.i0(u) - ratio_near_zero(u, sc.i1, 1 / 16, 1 / 384)),
            "i0e": _one(sc.i0e, lambda u, v: sc.i1e(u) - np.sign(u) * v),
            "i1e": _one(
                sc.i1e,
                lambda u, v: (
                    sc.i0e(u)
                    - np.sign(u) * v
                    - np.exp(-np.abs(u)) * ratio_near_zero(u, sc.i1, 1 / 16, 1 / 384)
                ),
            ),
            "k0": _one(sc.k0, lambda u, v: -sc.k1(u)),
            "k1": _one(sc.k1, lambda u, v: -sc.k0(u) - v / u),
            "sigmoid": _one(sc.expit, lambda u, v: v * sc.expit(-u)),
            "logit": _one(sc.logit, lambda u, v: 1.0 / (u * (1.0 - u))),
            "softplus": _one(
                lambda u: np.maximum(u, 0.0) + np.log1p(np.exp(-np.abs(u))),
                lambda u, v: sc.expit(u),
            ),
            "log1p": _one(np.log1p, lambda u, v: 1.0 / (1.0 + u)),
            "expm1": _one(np.expm1, lambda u, v: np.exp(u)),
            "sinc": _one(_sinc, _sinc_derivative),
            "atan2": NumpyFunction(np.arctan2, (_atan2_dy, _atan2_dx)),
            "hypot": NumpyFunction(
                np.hypot, (_hypot_partial, lambda a, b, v: _hypot_partial(b, a, v))
            ),
            "heaviside": _one(lambda u: 0.5 * (np.sign(u) + 1.0), lambda u, v: np.zeros_like(u)),
        }
    )
    FUNCTIONS["expit"] = FUNCTIONS["sigmoid"]
    _loaded = True


def _hypot_partial(a: Any, b: Any, v: Any) -> Any:
    # a / hypot(a, b), and 0 at the origin (a subgradient of the norm there): 0 / 0 would make
    # a derivative NaN even where the argument does not depend on the parameter (the tangent
    # 0 of a `where` branch not taken, which autograd's reverse pass masks to 0).
    return np.where(v == 0, 0.0, a / np.where(v == 0, 1.0, v))


def _atan2_dy(y: Any, x: Any, v: Any) -> Any:
    # x / (x^2 + y^2), and 0 at the origin, as torch's autograd
    r2 = x * x + y * y
    return np.where(r2 == 0, 0.0, x / np.where(r2 == 0, 1.0, r2))


def _atan2_dx(y: Any, x: Any, v: Any) -> Any:
    r2 = x * x + y * y
    return np.where(r2 == 0, 0.0, -y / np.where(r2 == 0, 1.0, r2))


def _sin_pi(u: Any) -> Any:
    n = np.round(u)
    s = np.sin(math.pi * (u - n))
    return np.where(np.remainder(n, 2.0) == 1.0, -s, s)


def _cos_pi(u: Any) -> Any:
    n = np.round(u)
    c = np.sin(math.pi * (0.5 - np.abs(u - n)))  # cos(pi r), exactly 0 at r = 1/2
    return np.where(np.remainder(n, 2.0) == 1.0, -c, c)


def _sinc(u: Any) -> Any:
    """sin(pi u) / (pi u), reduced exactly (as `fitcli.special.sinc`)."""
    zero = u == 0
    safe = np.where(zero, 1.0, u)
    return np.where(zero, 1.0, _sin_pi(safe) / (math.pi * safe))


def _sinc_derivative(u: Any, v: Any) -> Any:
    small = np.abs(u) < 0.25
    safe = np.where(small, 1.0, u)
    formula = (_cos_pi(safe) - _sinc(safe)) / safe
    z = math.pi * np.where(small, u, 0.0)
    z2 = z * z
    series = np.zeros_like(z)
    for k in range(10, 0, -1):
        series = series * z2 + (-1) ** k * 2 * k / math.factorial(2 * k + 1)
    return np.where(small, math.pi * z * series, formula)


# Selections (min, max, clip): the value of the selected argument, and its tangent times 1 (the
# others' times 0, as torch's autograd does: a non-finite derivative of an unselected argument
# still makes the result NaN there). where() selects tangents outright (see _where).
_SELECTIONS = ("min", "max", "clip")


def _voigt_value(x: Any, sigma: Any, gamma: Any) -> Any:
    from fitcli.faddeeva import voigt_value_numpy

    return voigt_value_numpy(x, sigma, gamma)


def _voigt_partial(i: int) -> Callable[..., Any]:
    def partial(x: Any, sigma: Any, gamma: Any, v: Any) -> Any:
        from fitcli.faddeeva import voigt_partials_numpy

        return voigt_partials_numpy(x, sigma, gamma, v)[i]

    return partial


FUNCTIONS["voigt_profile"] = NumpyFunction(
    _voigt_value, (_voigt_partial(0), _voigt_partial(1), _voigt_partial(2))
)


def compile_jacobian(
    expression: Expression, wrt: Sequence[str]
) -> Callable[[np.ndarray, Mapping[str, Any]], tuple[np.ndarray, np.ndarray]]:
    """``f(x, values) -> (y, J)``: the expression at float64 ``x`` and its n x len(wrt)
    Jacobian with respect to the parameters `wrt` (the others are constants read from
    `values`). Evaluate under ``np.errstate`` of your choice: non-finite values propagate.

    Compiled once per (expression, wrt) and shared (`_compiled_jacobian`): the closures are a
    pure function of the checked tree, so a program fitting the same model to many data sets
    builds them once.
    """
    return _compiled_jacobian(expression, tuple(wrt))


# Bounded: a long session fitting many different expressions keeps only the recent programs.
@functools.lru_cache(maxsize=256)
def _compiled_jacobian(
    expression: Expression, wrt: tuple[str, ...]
) -> Callable[[np.ndarray, Mapping[str, Any]], tuple[np.ndarray, np.ndarray]]:
    index = {name: k for k, name in enumerate(wrt)}
    root = _compile(expression._tree, index)
    names = expression.params
    p = len(wrt)
    # Several variables: x is n x k, and each column is read by name, as a parameter is.
    variables = () if expression.variables == ("x",) else expression.variables

    def jacobian(x: np.ndarray, values: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        vals: dict[str, Any] = {name: np.float64(values[name]) for name in names}
        for j, name in enumerate(variables):
            vals[name] = x[:, j]
        value, tangents = root(x, vals)
        n = x.shape[0]
        jac = np.empty((n, p), dtype=np.float64)
        for k in range(p):
            jac[:, k] = tangents.get(k, 0.0)
        if value.__class__ is np.ndarray and value.shape == (n,) and value is not x:
            return value, jac  # already the values at every x (float64: x and constants are)
        y = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
        return y, jac

    return jacobian


def compile_lanes(
    expression: Expression, wrt: Sequence[str]
) -> Callable[[np.ndarray, Mapping[str, Any], int], tuple[np.ndarray, np.ndarray]]:
    """``f(x, values, b) -> (y [b, n], J [b, n, len(wrt)])``: `compile_jacobian` for b
    parameter vectors at once, each value in `values` a [b, 1] float64 array (or a float that
    every vector shares); the tree's operations broadcast over the leading dimension."""
    index = {name: k for k, name in enumerate(wrt)}
    root = _compile(expression._tree, index)
    names = expression.params
    p = len(wrt)
    variables = () if expression.variables == ("x",) else expression.variables

    def jacobian(x: np.ndarray, values: Mapping[str, Any], b: int) -> tuple[np.ndarray, np.ndarray]:
        vals: dict[str, Any] = {name: values[name] for name in names}
        for j, name in enumerate(variables):
            vals[name] = x[:, j]
        value, tangents = root(x, vals)
        n = x.shape[0]
        jac = np.empty((b, n, p), dtype=np.float64)
        for k in range(p):
            jac[:, :, k] = tangents.get(k, 0.0)
        return np.broadcast_to(np.asarray(value, dtype=np.float64), (b, n)), jac

    return jacobian


def compile_value(expression: Expression) -> Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]:
    """``f(x, values) -> y``: the expression alone in numpy float64 (no derivatives)."""
    evaluate = compile_jacobian(expression, ())

    def value(x: np.ndarray, values: Mapping[str, Any]) -> np.ndarray:
        return evaluate(x, values)[0]

    return value


# ---------------------------------------------------------------------------------------------
# The compiler: checked tree -> closures (x, vals) -> (value, tangents)


def _times(d: Any, w: Any) -> Any:
    """A derivative times a factor, skipping the multiplication by a parameter's own 1.0."""
    if d.__class__ is float:
        if d == 1.0:
            return w
        if d == -1.0:
            return -w
    return d * w


def _compile(node: tuple, index: Mapping[str, int]) -> Node:
    tag = node[0]
    if tag == "num":
        value = np.float64(node[1])
        return lambda x, vals: (value, _EMPTY)
    if tag == "x":
        return lambda x, vals: (x, _EMPTY)
    if tag == "var":
        variable = node[1]
        return lambda x, vals: (vals[variable], _EMPTY)
    if tag == "param":
        name = node[1]
        if name in index:
            seed = {index[name]: 1.0}
            return lambda x, vals: (vals[name], seed)
        return lambda x, vals: (vals[name], _EMPTY)
    if tag == "neg":
        inner = _compile(node[1], index)

        def neg(x, vals):
            u, tu = inner(x, vals)
            return -u, {k: -d for k, d in tu.items()}

        return neg
    if tag == "call":
        name = node[1]
        if name == "where":
            cond, a, b = node[2]
            return _where(_condition(cond, index), _compile(a, index), _compile(b, index))
        args = tuple(_compile(arg, index) for arg in node[2])
        if name in _SELECTIONS:
            return _selection(name, args)
        if name not in FUNCTIONS:
            _load_special()
        if len(args) == 1:
            return _call(FUNCTIONS[node[1]], args[0])
        return _call_n(FUNCTIONS[node[1]], args)
    if tag == "pow":
        base = _compile(node[1], index)
        if node[2][0] == "num":
            return _power_const(base, node[2][1])
        return _power(base, _compile(node[2], index))
    if tag == "chain":
        first = _compile(node[1], index)
        rest = tuple((op, _compile(child, index)) for op, child in node[2])
        return _chain(first, rest)
    raise AssertionError(f"unknown node {tag!r}")  # pragma: no cover


def _call(function: NumpyFunction, inner: Node) -> Node:
    fn = function.value
    (derivative,) = function.partials

    def call(x, vals):
        u, tu = inner(x, vals)
        v = fn(u)
        if not tu:
            return v, _EMPTY
        g = derivative(u, v)
        return v, {k: _times(d, g) for k, d in tu.items()}

    return call


def _call_n(function: NumpyFunction, args: tuple[Node, ...]) -> Node:
    """A function of several arguments: f' = sum_i df/du_i u_i' (a variadic one pairwise)."""
    fn, partials = function.value, function.partials
    if len(partials) != len(args):  # variadic: f(a, b, c) = f(f(a, b), c)
        node = _call_n(function, args[:2])
        for arg in args[2:]:
            node = _call_n(function, (node, arg))
        return node

    def call(x, vals):
        us, ts = zip(*(arg(x, vals) for arg in args), strict=True)
        v = fn(*us)
        t: Tangents = {}
        for partial, tu in zip(partials, ts, strict=True):
            if not tu:
                continue
            g = partial(*us, v)
            for k, d in tu.items():
                e = _times(d, g)
                t[k] = t[k] + e if k in t else e
        return v, t or _EMPTY

    return call


def _condition(node: tuple, index: Mapping[str, int]) -> Callable[..., Any]:
    _, first, links = node
    left = _compile(first, index)
    steps = tuple((op, _compile(right, index)) for op, right in links)

    def condition(x, vals):
        a = left(x, vals)[0]
        result = None
        for op, f in steps:
            b = f(x, vals)[0]
            holds = op(a, b)
            result = holds if result is None else result & holds
            a = b
        return result

    return condition


def _where(test: Callable[..., Any], a: Node, b: Node) -> Node:
    """The chosen branch's value and tangents: the other branch's never reach the result."""

    def where(x, vals):
        keep = test(x, vals)
        u, tu = a(x, vals)
        w, tw = b(x, vals)
        v = np.where(keep, u, w)
        t: Tangents = {}
        for k in tu.keys() | tw.keys():
            t[k] = np.where(keep, tu.get(k, 0.0), tw.get(k, 0.0))
        return v, t or _EMPTY

    return where


def _select_pair(pick_first: Callable[[Any, Any], Any], left, right):
    (u, tu), (w, tw) = left, right
    first = pick_first(u, w) | np.isnan(u)
    v = np.where(first, u, w)
    if not tu and not tw:
        return v, _EMPTY
    one = first.astype(np.float64)
    t: Tangents = {}
    for k in tu.keys() | tw.keys():
        t[k] = (tu[k] * one if k in tu else 0.0) + (tw[k] * (1.0 - one) if k in tw else 0.0)
    return v, t


def _selection(name: str, args: tuple[Node, ...]) -> Node:
    if name == "clip":
        v, lo, hi = args

        def clip(x, vals):
            low = _select_pair(operator.ge, v(x, vals), lo(x, vals))
            return _select_pair(operator.le, low, hi(x, vals))

        return clip
    pick = operator.ge if name == "max" else operator.le

    def select(x, vals):
        result = args[0](x, vals)
        for arg in args[1:]:
            result = _select_pair(pick, result, arg(x, vals))
        return result

    return select


def _power_const(base: Node, c: float) -> Node:
    exponent = np.float64(c)

    def power(x, vals):
        u, tu = base(x, vals)
        v = u**exponent
        if not tu:
            return v, _EMPTY
        if c == 2.0:
            g = 2.0 * u
        elif c == 1.0:
            return v, tu
        elif c == 0.0:
            return v, {k: 0.0 for k in tu}
        else:
            g = exponent * u ** (exponent - 1.0)
        return v, {k: _times(d, g) for k, d in tu.items()}

    return power


def _power(base: Node, exponent: Node) -> Node:
    def power(x, vals):
        u, tu = base(x, vals)
        w, tw = exponent(x, vals)
        v = u**w
        if not tu and not tw:
            return v, _EMPTY
        t: Tangents = {}
        if tu:
            g = w * u ** (w - 1.0)
            for k, d in tu.items():
                t[k] = _times(d, g)
        if tw:
            # torch: the exponent's gradient is 0 where the base is 0 and the exponent >= 0
            h = np.where((u == 0) & (w >= 0), 0.0, v * np.log(u))
            for k, d in tw.items():
                e = _times(d, h)
                t[k] = t[k] + e if k in t else e
        return v, t

    return power


def _chain(first: Node, rest: tuple[tuple[Callable, Node], ...]) -> Node:
    add, sub, mul = operator.add, operator.sub, operator.mul

    def chain(x, vals):
        v, t = first(x, vals)
        owned = False  # whether t is this closure's own dict (safe to update)
        for op, node in rest:
            w, tw = node(x, vals)
            if op is add or op is sub:
                v = op(v, w)
                if tw:
                    if not owned:
                        t, owned = dict(t), True
                    for k, d in tw.items():
                        if k in t:
                            t[k] = op(t[k], d)
                        else:
                            t[k] = d if op is add else -d
                continue
            if op is mul:
                new: Tangents = {}
                for k, d in t.items():
                    new[k] = _times(d, w)
                for k, d in tw.items():
                    e = _times(d, v)
                    new[k] = new[k] + e if k in new else e
                v = v * w
            else:  # division: (u / w)' = (u' - q w') / w with q = u / w
                q = v / w
                new = dict(t)
                for k, d in tw.items():
                    e = _times(d, q)
                    new[k] = new[k] - e if k in new else -e
                new = {k: d / w for k, d in new.items()}
                v = q
            t, owned = new, True
        return v, t

    return chain
