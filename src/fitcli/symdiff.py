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
FUNCTIONS["arcsin"] = FUNCTIONS["asin"]
FUNCTIONS["arccos"] = FUNCTIONS["acos"]
FUNCTIONS["arctan"] = FUNCTIONS["atan"]


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
    """
    index = {name: k for k, name in enumerate(wrt)}
    root = _compile(expression._tree, index)
    names = expression.params
    p = len(wrt)

    def jacobian(x: np.ndarray, values: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        vals = {name: np.float64(values[name]) for name in names}
        value, tangents = root(x, vals)
        n = x.shape[0]
        jac = np.empty((n, p), dtype=np.float64)
        for k in range(p):
            jac[:, k] = tangents.get(k, 0.0)
        y = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
        return y, jac

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
        args = tuple(_compile(arg, index) for arg in node[2])
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
