"""Safe math expression -> torch function: an AST allowlist, never ``eval``.

Config files are shared, so their expressions are untrusted input. ``parse_expression`` parses
with ``ast.parse(mode="eval")`` and walks the tree itself, accepting only numbers, ``x``,
parameter names, ``pi``/``e``, ``+ - * / **``, unary ``-``/``+`` and one-argument calls of the
functions in ``FUNCTION_NAMES``; everything else is an ``ExpressionError`` pointing at its column.
Size, node count, nesting depth and literal magnitude are bounded before anything is evaluated.

Parsing and validation never import torch. The first call of an ``Expression`` compiles the
checked tree once into nested Python closures over torch functions, so evaluating it in a
training loop costs about what the hand-written torch code costs.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import keyword as _keyword
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fitcli import shapes as _shapes
from fitcli.errors import ExpressionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONSTANTS",
    "CONSTANT_MEANINGS",
    "FUNCTIONS",
    "FUNCTION_NAMES",
    "FUNCTION_TABLE",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_NODES",
    "Expression",
    "Function",
    "ONE_VARIABLE",
    "name_taken",
    "parse_expression",
    "rename_hint",
    "variable_problem",
]

MAX_LENGTH = 2000
"""Longest accepted source, in characters."""
MAX_NODES = 500
"""Most expression nodes in the parsed tree."""
MAX_DEPTH = 40
"""Deepest nesting; a chain like ``a + b - c + ...`` (or ``a * b / c``) counts as one level."""
MAX_INT_DIGITS = 30
"""Longest accepted integer literal, in decimal digits."""
MAX_LITERAL = 1e300
"""Largest accepted absolute value of a numeric literal."""
MAX_EXPANDED = 50_000
"""Most nodes of the checked tree once lineshape calls are expanded into their formulas."""
MAX_EXPANDED_DEPTH = 400
"""Deepest nesting of the checked tree once lineshape calls are expanded."""


@dataclass(frozen=True)
class Function:
    """One function callable in expressions: its name, arguments, meaning and torch code.

    ``torch`` is where its torch implementation lives, as ``"module.attribute"`` (``"torch.sin"``,
    ``"fitcli.special.erfcx"``); it is imported on first evaluation, so parsing never imports
    torch. The implementation takes tensors, one per argument (a variadic function any number
    of them, at least ``len(args)``), and returns a tensor of their broadcast shape; it must be
    differentiable by autograd (a custom ``torch.autograd.Function`` where torch has no exact
    backward). `fitcli.symdiff` holds the numpy value and the partial derivatives under the
    same name.
    """

    name: str
    args: tuple[str, ...]
    torch: str
    meaning: str
    group: str
    variadic: bool = False
    """The last argument may repeat: ``max(a, b, ...)``."""
    notes: str = ""

    @property
    def min_args(self) -> int:
        return len(self.args)

    @property
    def max_args(self) -> int | None:
        return None if self.variadic else len(self.args)

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.args)}{', ...' if self.variadic else ''})"


def _functions(*entries: Function) -> dict[str, Function]:
    return {f.name: f for f in entries}


def _unary(names: str, torch: str, meaning: str, group: str, notes: str = "") -> list[Function]:
    """One entry per name in ``names`` (aliases separated by spaces), all with one argument u."""
    return [Function(n, ("u",), torch, meaning, group, notes=notes) for n in names.split()]


_ELEMENTARY = "elementary"
_SPECIAL = "error and gamma"
_BESSEL = "Bessel"
_LOGISTIC = "logistic and exponential"
_SEVERAL = "several arguments"
_PIECEWISE = "piecewise"
_S = "fitcli.special."

FUNCTION_TABLE: dict[str, Function] = _functions(
    *_unary("sin", "torch.sin", "sine", _ELEMENTARY),
    *_unary("cos", "torch.cos", "cosine", _ELEMENTARY),
    *_unary("tan", "torch.tan", "tangent", _ELEMENTARY),
    *_unary("asin arcsin", "torch.asin", "inverse sine", _ELEMENTARY),
    *_unary("acos arccos", "torch.acos", "inverse cosine", _ELEMENTARY),
    *_unary("atan arctan", "torch.atan", "inverse tangent", _ELEMENTARY),
    *_unary("sinh", "torch.sinh", "hyperbolic sine", _ELEMENTARY),
    *_unary("cosh", "torch.cosh", "hyperbolic cosine", _ELEMENTARY),
    *_unary("tanh", "torch.tanh", "hyperbolic tangent", _ELEMENTARY),
    *_unary("exp", "torch.exp", "exponential", _ELEMENTARY),
    *_unary("log", "torch.log", "natural logarithm", _ELEMENTARY),
    *_unary("log10", "torch.log10", "base-10 logarithm", _ELEMENTARY),
    *_unary("log2", "torch.log2", "base-2 logarithm", _ELEMENTARY),
    *_unary("sqrt", "torch.sqrt", "square root", _ELEMENTARY),
    *_unary("cbrt", _S + "cbrt", "cube root (real, negative below 0)", _ELEMENTARY),
    *_unary("abs", "torch.abs", "absolute value", _ELEMENTARY, "derivative sign(u), 0 at 0"),
    *_unary("sign", "torch.sign", "-1, 0 or 1", _ELEMENTARY, "derivative 0"),
    *_unary("erf", "torch.special.erf", "error function", _SPECIAL),
    *_unary("erfc", "torch.special.erfc", "complementary error function 1 - erf(u)", _SPECIAL),
    *_unary(
        "erfcx", _S + "erfcx", "scaled complementary error function exp(u^2) erfc(u)", _SPECIAL
    ),
    *_unary("erfinv", "torch.special.erfinv", "inverse error function", _SPECIAL),
    *_unary("gamma", _S + "gamma", "gamma function", _SPECIAL, "inf at 0, -1, -2, ..."),
    *_unary("lgamma", "torch.lgamma", "log |gamma(u)|", _SPECIAL),
    *_unary("digamma", _S + "digamma", "psi(u) = gamma'(u) / gamma(u)", _SPECIAL),
    Function(
        "beta", ("a", "b"), _S + "beta", "beta function gamma(a) gamma(b) / gamma(a+b)", _SPECIAL
    ),
    *_unary("j0", _S + "j0", "Bessel function of the first kind, order 0", _BESSEL),
    *_unary("j1", _S + "j1", "Bessel function of the first kind, order 1", _BESSEL),
    *_unary("y0", _S + "y0", "Bessel function of the second kind, order 0", _BESSEL, "NaN below 0"),
    *_unary("y1", _S + "y1", "Bessel function of the second kind, order 1", _BESSEL, "NaN below 0"),
    *_unary(
        "i0", "torch.special.i0", "modified Bessel function of the first kind, order 0", _BESSEL
    ),
    *_unary(
        "i1", "torch.special.i1", "modified Bessel function of the first kind, order 1", _BESSEL
    ),
    *_unary("i0e", "torch.special.i0e", "exp(-|u|) i0(u)", _BESSEL),
    *_unary("i1e", "torch.special.i1e", "exp(-|u|) i1(u)", _BESSEL),
    *_unary(
        "k0",
        _S + "k0",
        "modified Bessel function of the second kind, order 0",
        _BESSEL,
        "NaN below 0",
    ),
    *_unary(
        "k1",
        _S + "k1",
        "modified Bessel function of the second kind, order 1",
        _BESSEL,
        "NaN below 0",
    ),
    *_unary("sigmoid expit", _S + "sigmoid", "logistic function 1 / (1 + exp(-u))", _LOGISTIC),
    *_unary("logit", "torch.logit", "log(u / (1 - u)), the inverse of sigmoid", _LOGISTIC),
    *_unary("softplus", _S + "softplus", "log(1 + exp(u))", _LOGISTIC),
    *_unary("log1p", "torch.log1p", "log(1 + u), accurate for small u", _LOGISTIC),
    *_unary("expm1", _S + "expm1", "exp(u) - 1, accurate for small u", _LOGISTIC),
    *_unary("sinc", _S + "sinc", "sin(pi u) / (pi u), 1 at 0 (normalised, as numpy's)", _LOGISTIC),
    Function(
        "atan2",
        ("y", "x"),
        "torch.atan2",
        "angle of the point (x, y), in (-pi, pi]",
        _SEVERAL,
        notes="atan2(y, x): y first",
    ),
    Function("hypot", ("a", "b"), "torch.hypot", "sqrt(a^2 + b^2) without overflow", _SEVERAL),
    Function(
        "min",
        ("a", "b"),
        _S + "minimum",
        "smallest argument",
        _SEVERAL,
        variadic=True,
        notes="derivative: the selected argument's (the first of equals)",
    ),
    Function(
        "max",
        ("a", "b"),
        _S + "maximum",
        "largest argument",
        _SEVERAL,
        variadic=True,
        notes="derivative: the selected argument's (the first of equals)",
    ),
    Function(
        "clip",
        ("v", "lo", "hi"),
        _S + "clip",
        "v limited to [lo, hi]",
        _SEVERAL,
        notes="derivative: v's inside, the bound's outside",
    ),
    Function(
        "where",
        ("cond", "a", "b"),
        "torch.where",
        "a where cond holds, else b",
        _PIECEWISE,
        notes="cond: a comparison (< <= > >=, chains allowed: lo < x < hi); "
        "derivative: the chosen branch's; NaN or inf in the other branch never reaches it",
    ),
    *_unary(
        "heaviside",
        _S + "heaviside",
        "step: 0 below 0, 1 above, 1/2 at 0",
        _PIECEWISE,
        "derivative 0",
    ),
)
"""Every function callable in an expression, by name (aliases are entries of their own).

To add one: an entry here, its torch code where ``torch`` points, and its numpy value and
partial derivatives in `fitcli.symdiff`'s table under the same name.
"""
FUNCTION_TABLE["voigt_profile"] = Function(
    "voigt_profile",
    ("x", "sigma", "gamma"),
    "fitcli.faddeeva.voigt_profile",
    "Voigt profile, as scipy.special.voigt_profile: Re w((x + i gamma) / (sigma sqrt 2)) / "
    "(sigma sqrt(2 pi)), w the Faddeeva function",
    "Voigt",
    notes="a Gaussian of standard deviation sigma convolved with a Lorentzian of half width "
    "gamma, area 1; sigma = 0 is the Lorentzian, gamma = 0 the Gaussian",
)

# Pearson IV's normalisation (the lineshape pearson4) needs log|Gamma| of a complex argument.
FUNCTION_TABLE["loggamma_re"] = Function(
    "loggamma_re",
    ("a", "b"),
    "fitcli.loggamma.loggamma_re",
    "log|Gamma(a + i b)|, the real part of the complex log-gamma function",
    "gamma",
)

FUNCTION_NAMES: frozenset[str] = frozenset(FUNCTION_TABLE)
"""Names callable in an expression; known without importing torch."""

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
CONSTANT_MEANINGS: dict[str, str] = {
    "pi": "the constant pi (3.14159...)",
    "e": "Euler's number (2.71828...)",
}


def _function_list() -> str:
    """Every function by group, aliases in brackets: for "unknown function" messages."""
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}  # torch target -> first name (aliases share one)
    for f in FUNCTION_TABLE.values():
        first = seen.get(f.torch)
        if first is not None and FUNCTION_TABLE[first].args == f.args:
            names = groups[FUNCTION_TABLE[first].group]
            names[names.index(first)] += (
                f" ({f.name})" if "(" not in names[names.index(first)] else ""
            )
            continue
        seen[f.torch] = f.name
        groups.setdefault(f.group, []).append(f.name)
    return "; ".join(f"{group}: {', '.join(names)}" for group, names in groups.items())


_ALLOWED_FUNCTIONS = _function_list()
_ALLOWED_OPERATORS = "+ - * / **"

_COMPARISONS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_COMPARISON_SYMBOLS: dict[type, str] = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
    ast.NotIn: "not in",
}  # fmt: skip


def name_taken(name: str) -> str | None:
    """Why `name` cannot be a parameter ("'e' is Euler's number ..."), or None if it can."""
    if name in CONSTANT_MEANINGS:
        return f"'{name}' is {CONSTANT_MEANINGS[name]} in expressions"
    function = FUNCTION_TABLE.get(name)
    if function is not None:
        return f"'{name}' is a function in expressions ({function.signature}: {function.meaning})"
    return None


def rename_hint(name: str) -> str:
    """A suggestion for a parameter whose name is taken."""
    return f"name the parameter otherwise, e.g. {name}_ or {name}1"


# AST node classes that are never allowed, with how a message names them.
_FORBIDDEN: dict[type, str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Slice: "slicing",
    ast.Lambda: "lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.BoolOp: "a boolean operator (and, or)",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.IfExp: "a conditional expression (if/else)",
    ast.Tuple: "a tuple",
    ast.List: "a list",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.Starred: "a starred expression",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}

_OPERATOR_SYMBOLS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Not: "not",
    ast.Invert: "~",
}

_ADDITIVE = (ast.Add, ast.Sub)
_MULTIPLICATIVE = (ast.Mult, ast.Div)
_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}

# The checked tree ("IR") is made of plain tuples, flattened so that + - and * / chains are one
# level each (a long sum must not become a deep recursion):
#   ("num", value) | ("x",) | ("var", name) | ("param", name) | ("neg", node)
#   ("x",) is the one independent variable x; ("var", name) one of several named ones
#   ("call", name, (node, ...))   name: a key of FUNCTION_TABLE, one node per argument
#   ("cmp", first, ((op, node), ...))   only as where's first argument; op in _COMPARISONS values
#   ("pow", base, exponent) | ("chain", first, ((op, node), ...))   with op in _OPS values
_Node = tuple

ONE_VARIABLE: tuple[str, ...] = ("x",)
"""The independent variables of an expression of one variable."""


@dataclass(frozen=True)
class Expression:
    """A checked expression; call it with ``x`` and parameter values to evaluate it in torch.

    ``variables`` are its independent variables: ``("x",)``, or several names, in which case
    ``x`` is a tensor of shape ``(..., n, len(variables))``, one column per variable.
    """

    source: str
    params: tuple[str, ...]
    uses_x: bool  # whether it depends on an independent variable
    _tree: _Node = field(repr=False, compare=False)
    _what: str = field(default="expression", repr=False, compare=False)
    _compiled: list = field(default_factory=list, init=False, repr=False, compare=False)
    variables: tuple[str, ...] = ONE_VARIABLE

    def __call__(
        self,
        x: torch.Tensor,
        params: Mapping[str, torch.Tensor | float] | None = None,
    ) -> torch.Tensor:
        """Evaluate with torch ops; the result has ``x``'s shape, dtype and device (with
        several variables, ``x``'s shape without its last, variables' dimension).

        Parameter values may be tensors (kept as they are, so autograd flows into them) or
        plain numbers. A missing parameter is an ``ExpressionError`` naming it.
        """
        compiled = self._compiled
        if not compiled:
            compiled.append(_compile(self._tree))
        fn = compiled[0]
        tensor_type = _torch.Tensor
        values: Mapping[str, torch.Tensor | float]
        if self.params:
            if params is None:
                params = {}
            converted: dict[str, torch.Tensor | float] | None = None  # a copy, once needed
            for name in self.params:
                try:
                    value = params[name]
                except KeyError:
                    raise ExpressionError(
                        f"missing value for parameter '{name}' of this {self._what}",
                        self.source,
                    ) from None
                if not isinstance(value, tensor_type):
                    if converted is None:
                        converted = dict(params)
                    converted[name] = _torch.as_tensor(value, dtype=x.dtype, device=x.device)
            values = params if converted is None else converted
        else:
            values = _NO_PARAMS
        if self.variables is not ONE_VARIABLE:
            # Several variables: each is read, as a parameter is, from the mapping.
            columns = dict(values)
            for j, name in enumerate(self.variables):
                columns[name] = x[..., j]
            x, values = x[..., 0], columns
        result = fn(x, values)
        if result.shape != x.shape:
            result = result.expand(x.shape).contiguous()
        if result.dtype is not x.dtype and x.is_floating_point():
            result = result.to(x.dtype)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # Closures do not pickle (Dask ships configs to workers): re-parse on the other side.
        return (_rebuild, (self.source, self._what, self.variables))


def _rebuild(source: str, what: str, variables: tuple[str, ...] = ("x",)) -> Expression:
    return parse_expression(source, what=what, variables=variables)


_NO_PARAMS: dict[str, Any] = {}


def parse_expression(
    source: str,
    *,
    allow_params: bool = True,
    what: str = "expression",
    variables: tuple[str, ...] = ("x",),
) -> Expression:
    """Validate ``source`` against the allowlist and return the checked ``Expression``.

    Free names other than the independent `variables` (``x``), ``pi`` and ``e`` become
    parameters, in order of first appearance; with ``allow_params=False`` they are errors.
    ``what`` names the expression in messages ("target", "basis function"). Never imports
    torch, never evaluates anything. The names in `variables` must be valid
    (`variable_problem`); with several, ``x`` is not one unless it is among them.
    """
    variables = tuple(variables)
    if variables == ONE_VARIABLE:
        variables = ONE_VARIABLE
    if not isinstance(source, str):
        raise ExpressionError(
            f"{what} must be a string, not {type(source).__name__}", f"<{type(source).__name__}>"
        )
    return _parse_checked(source, allow_params, what, variables)


# A config's expression is parsed by its validation and again by the model it builds, and a
# program fitting many data sets parses the same few sources over and over: each source is
# checked once. An `Expression` is immutable (its compiled closures are a cache of a pure
# function), so every caller may share it; errors are not cached, each call raises afresh.
@functools.lru_cache(maxsize=256)
def _parse_checked(
    source: str, allow_params: bool, what: str, variables: tuple[str, ...] = ONE_VARIABLE
) -> Expression:
    if len(source) > MAX_LENGTH:
        raise ExpressionError(
            f"{what} is too long ({len(source)} characters; at most {MAX_LENGTH})",
            source[:60] + "...",
        )
    depth = 0
    for col, ch in enumerate(source):
        if ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:  # before ast.parse, which recurses on brackets
                raise ExpressionError(
                    f"{what} is nested too deeply (more than {MAX_DEPTH} open brackets)",
                    source,
                    col,
                )
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif not (" " <= ch <= "~" or ch in "\t\n\r"):
            if ch > "\x7f":
                message = f"non-ASCII character {ch!r} (U+{ord(ch):04X}) is not allowed"
            else:
                message = f"control character {ch!r} is not allowed"
            raise ExpressionError(message, source, col)
    stripped = source.lstrip()
    if not stripped.strip():
        raise ExpressionError(f"empty {what}", source)
    checker = _Checker(source, len(source) - len(stripped), allow_params, what)
    if variables is not ONE_VARIABLE:
        checker.variables = variables
    tree = checker.parse(stripped)
    return Expression(
        source=source,
        params=tuple(checker.params),
        uses_x=checker.uses_x,
        _tree=tree,
        _what=what,
        variables=variables,
    )


def variable_problem(name: Any) -> str | None:
    """Why `name` cannot be an independent variable's name, or None when it can: it must be an
    identifier (not starting with ``_``) that is not a function, lineshape or constant."""
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        return f"{name!r} is not a valid variable name (letters, digits and _, not first a digit)"
    if name.startswith("_"):
        return f"{name!r} is not a valid variable name (names may not start with '_')"
    if _keyword.iskeyword(name):
        return f"{name!r} is a Python keyword, not a valid variable name"
    taken = name_taken(name)
    if taken is None and name in _shapes.SHAPES:
        taken = f"'{name}' is a lineshape in expressions"
    if taken is not None:
        return f"{taken}, not a variable; name the column otherwise, e.g. {name}_ or {name}1"
    return None


class _Checker:
    """One validation pass: bounds first (iteratively), then the allowlist (recursively)."""

    def __init__(
        self,
        source: str,
        base: int,
        allow_params: bool,
        what: str,
        local: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self.local = frozenset(local)  # a lineshape formula's argument names (x among them)
        self.sizes: dict[int, tuple[_Node, int, int]] = {}  # id -> (node, size, depth) memo
        self.base = base  # leading whitespace stripped before parsing
        self.allow_params = allow_params
        self.what = what
        self.params: dict[str, None] = {}  # ordered set
        self.variables: tuple[str, ...] = ()  # several named variables, else x alone
        self.uses_x = False
        self.line_starts = [0]

    def error(self, message: str, node: ast.expr | ast.keyword | None = None) -> ExpressionError:
        col = None if node is None else self.column(node.lineno, node.col_offset)
        return ExpressionError(message, self.source, col)

    def column(self, lineno: int | None, col_offset: int | None) -> int:
        line = max((lineno or 1) - 1, 0)
        start = self.line_starts[min(line, len(self.line_starts) - 1)]
        return min(self.base + start + max(col_offset or 0, 0), len(self.source))

    def parse(self, text: str) -> _Node:
        for i, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(i + 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "\d" in a string
                tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            msg = exc.msg or "invalid syntax"
            col = self.column(exc.lineno, (exc.offset or 1) - 1)
            raise ExpressionError(f"syntax error: {msg}", self.source, col) from None
        except (RecursionError, MemoryError, ValueError, OverflowError):
            raise ExpressionError(f"{self.what} is too complex to parse", self.source) from None
        body = tree.body
        self.check_bounds(body)
        root = self.visit(body)
        if self.sizes and self.measure(root)[0] > MAX_EXPANDED:  # lineshapes were expanded
            raise self.error(
                f"{self.what} is too large once its lineshapes are expanded (more than "
                f"{MAX_EXPANDED} nodes)"
            )
        return root

    def check_bounds(self, root: ast.expr) -> None:
        """Count nodes and measure depth without recursion (the tree may be arbitrarily deep)."""
        count = 0
        stack: list[tuple[ast.AST, int]] = [(root, 1)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node, ast.expr):
                count += 1
                if count > MAX_NODES:
                    raise self.error(f"{self.what} is too large (more than {MAX_NODES} nodes)")
                if depth > MAX_DEPTH:
                    raise self.error(
                        f"{self.what} is nested too deeply (at most {MAX_DEPTH})", node
                    )
            for child in ast.iter_child_nodes(node):
                # The left operand of a + - (or * /) chain stays on the chain's level.
                same_chain = (
                    isinstance(node, ast.BinOp)
                    and child is node.left
                    and isinstance(child, ast.BinOp)
                    and _chain_kind(node.op) is not None
                    and _chain_kind(node.op) == _chain_kind(child.op)
                )
                stack.append((child, depth if same_chain else depth + 1))

    def visit(self, node: ast.expr) -> _Node:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            what = _FORBIDDEN.get(type(node), type(node).__name__)
            raise self.error(f"{what} is not allowed", node)
        return method(node)

    def visit_Constant(self, node: ast.Constant) -> _Node:
        value = node.value
        if isinstance(value, bool) or value is None:
            raise self.error(f"{value!r} is not allowed; only numbers, x and names are", node)
        if isinstance(value, int):
            if abs(value) >= 10**MAX_INT_DIGITS:
                raise self.error(
                    f"integer literal with more than {MAX_INT_DIGITS} digits is not allowed", node
                )
            return ("num", float(value))
        if isinstance(value, float):
            if math.isinf(value) or abs(value) > MAX_LITERAL:
                raise self.error(
                    f"numeric literal too large (absolute value above {MAX_LITERAL:g})", node
                )
            return ("num", value)
        kind = {complex: "a complex literal", str: "a string literal", bytes: "a bytes literal"}
        name = kind.get(type(value), "a literal of type " + type(value).__name__)
        if value is Ellipsis:
            name = "Ellipsis (...)"
        raise self.error(f"{name} is not allowed", node)

    def visit_Name(self, node: ast.Name) -> _Node:
        name = node.id
        if name in self.local:
            self.params.setdefault(name, None)
            return ("param", name)
        if self.variables:
            if name in self.variables:
                self.uses_x = True
                return ("var", name)
            if name == "x":
                raise self.error(
                    f"x is not a variable of this {self.what}: its independent variables are "
                    f"{', '.join(self.variables)} (data.columns.x)",
                    node,
                )
        elif name == "x":
            self.uses_x = True
            return ("x",)
        if name in CONSTANTS:
            return ("num", CONSTANTS[name])
        if name in FUNCTION_NAMES:
            signature = FUNCTION_TABLE[name].signature
            raise self.error(
                f"function '{name}' must be called, as {signature}; for a parameter, "
                f"'{name}' is taken: {rename_hint(name)}",
                node,
            )
        if name in _shapes.SHAPES:
            signature = _shapes.signature(_shapes.SHAPES[name])
            raise self.error(
                f"lineshape '{name}' must be called, as {signature}; for a parameter, "
                f"'{name}' is taken: {rename_hint(name)}",
                node,
            )
        if name.startswith("_"):
            raise self.error(f"name '{name}' is not allowed (names may not start with '_')", node)
        if not self.allow_params:
            known = ", ".join(self.variables) if self.variables else "x"
            raise self.error(
                f"unknown name '{name}'; only {known}, pi and e may appear in "
                f"{_article(self.what)}",
                node,
            )
        self.params.setdefault(name, None)
        return ("param", name)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> _Node:
        if isinstance(node.op, ast.UAdd):
            return self.visit(node.operand)
        if not isinstance(node.op, ast.USub):
            raise self.operator_error(node.op, node)
        operand = self.visit(node.operand)
        if operand[0] == "num":  # negating a float cannot hang or fail
            return ("num", -operand[1])
        return ("neg", operand)

    def visit_BinOp(self, node: ast.BinOp) -> _Node:
        kind = _chain_kind(node.op)
        if kind is None:
            if not isinstance(node.op, ast.Pow):
                raise self.operator_error(node.op, node)
            return ("pow", self.visit(node.left), self.visit(node.right))
        # Walk the left spine of a same-kind chain iteratively: a - b + c -> (a, (-b, +c)).
        rights: list[tuple[type, ast.expr]] = []
        left: ast.expr = node
        while isinstance(left, ast.BinOp) and _chain_kind(left.op) == kind:
            rights.append((type(left.op), left.right))
            left = left.left
        first = self.visit(left)
        rest = tuple((_OPS[op], self.visit(right)) for op, right in reversed(rights))
        return ("chain", first, rest)

    def operator_error(self, op: ast.AST, node: ast.expr) -> ExpressionError:
        symbol = _OPERATOR_SYMBOLS.get(type(op), type(op).__name__)
        return self.error(
            f"operator '{symbol}' is not allowed; allowed: {_ALLOWED_OPERATORS}", node
        )

    def visit_Call(self, node: ast.Call) -> _Node:
        func = node.func
        if not isinstance(func, ast.Name):
            if type(func) in _FORBIDDEN:
                self.visit(func)  # attribute, subscript, lambda ...: reported as such
            raise self.error(
                f"only named functions can be called; allowed: {_ALLOWED_FUNCTIONS}", func
            )
        name = func.id
        if name in _shapes.SHAPES:
            return self.visit_shape(_shapes.SHAPES[name], node)
        function = FUNCTION_TABLE.get(name)
        if function is None:
            close = difflib.get_close_matches(name, FUNCTION_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise self.error(
                f"unknown function '{name}'{hint}; functions: {_ALLOWED_FUNCTIONS}", func
            )
        for keyword in node.keywords:
            raise self.error(f"keyword arguments are not allowed in {name}()", keyword)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.error("starred arguments are not allowed", arg)
        given, least, most = len(node.args), function.min_args, function.max_args
        if given < least or (most is not None and given > most):
            if most is None:
                count = f"at least {least} arguments"
            else:
                count = f"{least} argument{'s' if least != 1 else ''}"
            raise self.error(f"{function.signature} takes {count} ({given} given)", node)
        if name == "where":
            cond = node.args[0]
            if not isinstance(cond, ast.Compare):
                raise self.error(
                    "where's first argument must be a comparison, e.g. where(x > c, a, b)", cond
                )
            rest = tuple(self.visit(arg) for arg in node.args[1:])
            return ("call", name, (self.condition(cond), *rest))
        return ("call", name, tuple(self.visit(arg) for arg in node.args))

    def visit_shape(self, shape: _shapes.Shape, node: ast.Call) -> _Node:
        """A lineshape call: its formula's tree with the argument trees in place of its names."""
        for keyword in node.keywords:
            raise self.error(f"keyword arguments are not allowed in {shape.name}()", keyword)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.error("starred arguments are not allowed", arg)
        given, total = len(node.args), len(shape.args)
        if not shape.required <= given <= total:
            count = f"{total}" if shape.required == total else f"{shape.required} to {total}"
            raise self.error(
                f"{_shapes.signature(shape)} takes {count} arguments ({given} given)", node
            )
        tree, defaults = _shape_trees(shape.name)
        bound: dict[str, _Node] = {}
        for name, arg in zip(shape.args, node.args, strict=False):
            bound[name] = self.visit(arg)
        for name in shape.args[given:]:
            bound[name] = _substitute(defaults[name], bound)
        expanded = _substitute(tree, bound)
        size, depth = self.measure(expanded)
        if size > MAX_EXPANDED:
            raise self.error(
                f"{self.what} is too large once its lineshapes are expanded (more than "
                f"{MAX_EXPANDED} nodes); nest fewer shapes inside shapes' arguments",
                node,
            )
        if depth > MAX_EXPANDED_DEPTH:
            raise self.error(
                f"{self.what} is nested too deeply once its lineshapes are expanded (more than "
                f"{MAX_EXPANDED_DEPTH} levels); nest fewer shapes inside shapes' arguments",
                node,
            )
        return expanded

    def measure(self, root: _Node) -> tuple[int, int]:
        """Nodes and depth of a checked tree, counting a shared subtree at every use (as the
        compilers evaluate it); memoised, so measuring a tree made of measured ones is cheap."""
        memo = self.sizes
        hit = memo.get(id(root))
        if hit is not None and hit[0] is root:
            return hit[1], hit[2]
        size, depth = 1, 0
        for child in _children(root):
            s, d = self.measure(child)
            size += s
            depth = max(depth, d)
        memo[id(root)] = (root, size, depth + 1)
        return size, depth + 1

    def visit_Compare(self, node: ast.Compare) -> _Node:
        raise self.error(
            "a comparison is allowed only as the first argument of where(cond, a, b)", node
        )

    def condition(self, node: ast.Compare) -> _Node:
        """``lo < x <= hi`` -> ("cmp", first, ((op, node), ...)): every link must hold."""
        for op in node.ops:
            if type(op) not in _COMPARISONS:
                symbol = _COMPARISON_SYMBOLS.get(type(op), type(op).__name__)
                raise self.error(
                    f"operator '{symbol}' is not allowed in a condition; use < <= > >=", node
                )
        first = self.visit(node.left)
        links = tuple(
            (_COMPARISONS[type(op)], self.visit(right))
            for op, right in zip(node.ops, node.comparators, strict=True)
        )
        return ("cmp", first, links)


def _children(node: _Node) -> list[_Node]:
    """The subtrees of a checked-tree node (any tuple inside it that starts with a tag)."""
    found: list[_Node] = []
    stack = list(node[1:])
    while stack:
        item = stack.pop()
        if isinstance(item, tuple) and item:
            if isinstance(item[0], str):
                found.append(item)
            else:
                stack.extend(item)  # an argument list, a chain's (op, node) pairs
    return found


def _substitute(node: _Node, bound: Mapping[str, _Node]) -> _Node:
    """`node` with each ``("param", name)`` of `bound` replaced by its tree (shared, not copied)."""
    if node[0] == "param":
        return bound.get(node[1], node)
    return tuple(_substitute_item(item, bound) for item in node)


def _substitute_item(item: Any, bound: Mapping[str, _Node]) -> Any:
    if isinstance(item, tuple) and item:
        if isinstance(item[0], str):
            return _substitute(item, bound)
        return tuple(_substitute_item(i, bound) for i in item)
    return item


_SHAPE_TREES: dict[str, tuple[_Node, dict[str, _Node]]] = {}


def _shape_trees(name: str) -> tuple[_Node, dict[str, _Node]]:
    """Lineshape `name`'s formula and defaults as checked trees over its argument names, parsed
    once. A formula may call other lineshapes (pvoigt calls gaussian and lorentzian)."""
    cached = _SHAPE_TREES.get(name)
    if cached is not None:
        return cached
    shape = _shapes.SHAPES[name]
    what = f"lineshape {name}"
    tree = _Checker(shape.formula, 0, True, what, shape.args).parse(shape.formula)
    defaults: dict[str, _Node] = {}
    for k, arg in enumerate(shape.args):
        if arg in shape.defaults:
            default = shape.defaults[arg]
            if isinstance(default, str):
                checker = _Checker(default, 0, True, what, shape.args[:k])
                defaults[arg] = checker.parse(default)
            else:
                defaults[arg] = ("num", float(default))
    _SHAPE_TREES[name] = (tree, defaults)
    return tree, defaults


def _article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _chain_kind(op: ast.AST) -> int | None:
    if isinstance(op, _ADDITIVE):
        return 1
    if isinstance(op, _MULTIPLICATIVE):
        return 2
    return None


# ---------------------------------------------------------------------------------------------
# Compilation: checked tree -> closures f(x, params) over torch functions. Each compiled node is
# (kind, value): ("x", None), ("param", name), ("num", float) or ("fn", f). Leaves are inlined into
# their parent's closure so that the common shapes (a*x, x**2, b*sin(...)) cost one Python frame.

_torch: Any = None
_LONG_CHAIN = 8  # chains longer than this evaluate in a loop rather than as nested closures


def _load_torch() -> Any:
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch


def __getattr__(name: str) -> Any:
    # FUNCTIONS maps names to torch functions; building it imports torch, so do it on first use.
    if name == "FUNCTIONS":
        functions = {name: _torch_function(name) for name in FUNCTION_TABLE}
        globals()["FUNCTIONS"] = functions
        return functions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    FUNCTIONS: dict[str, Callable[..., Any]]

_RESOLVED: dict[str, Callable[..., Any]] = {}


def _torch_function(name: str) -> Callable[..., Any]:
    """The torch implementation of function `name`, imported where its table entry says."""
    fn = _RESOLVED.get(name)
    if fn is None:
        _load_torch()
        module, _, attr = FUNCTION_TABLE[name].torch.rpartition(".")
        fn = getattr(importlib.import_module(module), attr)
        _RESOLVED[name] = fn
    return fn


def _compile(tree: _Node) -> Callable[[Any, Mapping[str, Any]], Any]:
    _load_torch()
    kind, value = _compile_node(tree)
    return _as_fn(kind, value)


def _as_fn(kind: str, value: Any) -> Callable[[Any, Mapping[str, Any]], Any]:
    if kind == "fn":
        return value
    if kind == "x":
        return lambda x, p: x
    if kind == "param":
        return lambda x, p: p[value]
    as_tensor = _torch.as_tensor
    return lambda x, p: as_tensor(value, dtype=x.dtype, device=x.device)


def _compile_node(node: _Node) -> tuple[str, Any]:
    tag = node[0]
    if tag == "num":
        return ("num", node[1])
    if tag == "x":
        return ("x", None)
    if tag == "param" or tag == "var":  # several variables arrive in the mapping (`__call__`)
        return ("param", node[1])
    if tag == "neg":
        f = _as_fn(*_compile_node(node[1]))
        return ("fn", lambda x, p: -f(x, p))
    if tag == "call":
        if node[1] == "where":
            return ("fn", _where(*node[2]))
        fn = _torch_function(node[1])
        args = node[2]
        if len(args) != 1:
            fns = tuple(_as_fn(*_compile_node(arg)) for arg in args)
            if len(fns) == 2:
                f0, f1 = fns
                return ("fn", lambda x, p: fn(f0(x, p), f1(x, p)))
            if len(fns) == 3:
                f0, f1, f2 = fns
                return ("fn", lambda x, p: fn(f0(x, p), f1(x, p), f2(x, p)))
            return ("fn", lambda x, p: fn(*[f(x, p) for f in fns]))
        kind, value = _compile_node(args[0])
        if kind == "x":
            return ("fn", lambda x, p: fn(x))
        if kind == "param":
            return ("fn", lambda x, p: fn(p[value]))
        g = _as_fn(kind, value)
        return ("fn", lambda x, p: fn(g(x, p)))
    if tag == "pow":
        return _binary(operator.pow, _compile_node(node[1]), _compile_node(node[2]))
    if tag == "chain":
        left = _compile_node(node[1])
        rest = [(op, _compile_node(child)) for op, child in node[2]]
        if len(rest) > _LONG_CHAIN:
            return ("fn", _loop_chain(left, rest))
        for op, right in rest:
            left = _binary(op, left, right)
        return left
    raise AssertionError(f"unknown node {tag!r}")  # pragma: no cover


def _condition(node: _Node) -> Callable[[Any, Mapping[str, Any]], Any]:
    """A ("cmp", ...) node as a closure returning a bool tensor."""
    _, first, links = node
    left = _as_fn(*_compile_node(first))
    steps = tuple((op, _as_fn(*_compile_node(right))) for op, right in links)

    def condition(x: Any, p: Mapping[str, Any]) -> Any:
        a = left(x, p)
        result = None
        for op, f in steps:
            b = f(x, p)
            holds = op(a, b)
            result = holds if result is None else result & holds
            a = b
        return result

    return condition


def _where(cond: _Node, a: _Node, b: _Node) -> Callable[[Any, Mapping[str, Any]], Any]:
    """where(cond, a, b) whose derivative is the chosen branch's, even where the other one's is
    NaN or inf (``where(x > c, sqrt(x - c), 0)`` in c).

    Plain ``torch.where`` passes a zero gradient into the unchosen branch, whose own backward
    then multiplies it by its local derivative: 0 * inf = NaN, summed into the parameter. So
    each branch is evaluated on guarded inputs, ``where(chosen, p, p.detach())`` for every
    parameter and for x: the same values, but the gradient reaches p only from the positions
    where the branch is chosen. Every node is elementwise, so nothing else can leak.
    """
    test = _condition(cond)
    fa = _as_fn(*_compile_node(a))
    fb = _as_fn(*_compile_node(b))
    where = _torch.where

    def guard(x: Any, p: Mapping[str, Any], keep: Any) -> tuple[Any, Mapping[str, Any]]:
        if x.requires_grad:
            x = where(keep, x, x.detach())
        if any(getattr(v, "requires_grad", False) for v in p.values()):
            p = {
                k: where(keep, v, v.detach()) if getattr(v, "requires_grad", False) else v
                for k, v in p.items()
            }
        return x, p

    def select(x: Any, p: Mapping[str, Any]) -> Any:
        keep = test(x, p)
        if keep.shape != x.shape:
            keep = keep.expand(x.shape)
        xa, pa = guard(x, p, keep)
        xb, pb = guard(x, p, ~keep)
        return where(keep, fa(xa, pa), fb(xb, pb))

    return select


def _loop_chain(
    first: tuple[str, Any], rest: list[tuple[Callable[[Any, Any], Any], tuple[str, Any]]]
) -> Callable[[Any, Mapping[str, Any]], Any]:
    start = _as_fn(*first)
    steps = tuple((op, _as_fn(*right)) for op, right in rest)

    def chain(x: Any, p: Mapping[str, Any]) -> Any:
        result = start(x, p)
        for op, f in steps:
            result = op(result, f(x, p))
        return result

    return chain


def _binary(
    op: Callable[[Any, Any], Any], left: tuple[str, Any], right: tuple[str, Any]
) -> tuple[str, Any]:
    """One closure for ``left op right``, with leaf operands read inline rather than called."""
    lk, lv = left
    rk, rv = right
    if lk == "num" and rk == "num":
        # Two literals: compute in torch (9**9**9 overflows to inf there, never hangs).
        lk, lv = "fn", _as_fn(lk, lv)
    if lk == "fn":
        if rk == "fn":
            return ("fn", lambda x, p: op(lv(x, p), rv(x, p)))
        if rk == "x":
            return ("fn", lambda x, p: op(lv(x, p), x))
        if rk == "param":
            return ("fn", lambda x, p: op(lv(x, p), p[rv]))
        return ("fn", lambda x, p: op(lv(x, p), rv))
    if lk == "x":
        if rk == "fn":
            return ("fn", lambda x, p: op(x, rv(x, p)))
        if rk == "x":
            return ("fn", lambda x, p: op(x, x))
        if rk == "param":
            return ("fn", lambda x, p: op(x, p[rv]))
        return ("fn", lambda x, p: op(x, rv))
    if lk == "param":
        if rk == "fn":
            return ("fn", lambda x, p: op(p[lv], rv(x, p)))
        if rk == "x":
            return ("fn", lambda x, p: op(p[lv], x))
        if rk == "param":
            return ("fn", lambda x, p: op(p[lv], p[rv]))
        return ("fn", lambda x, p: op(p[lv], rv))
    # lk == "num": a Python float on the left of a tensor uses the tensor's reflected operator,
    # except for division: torch's `c / t` is `c * (1 / t)`, two roundings (cos(61.4 / x) in
    # float32 was off by 3e-4), where a 0-dim tensor numerator divides correctly rounded.
    if op is operator.truediv:
        op = _divide_number(lv)
    if rk == "fn":
        return ("fn", lambda x, p: op(lv, rv(x, p)))
    if rk == "x":
        return ("fn", lambda x, p: op(lv, x))
    return ("fn", lambda x, p: op(lv, p[rv]))


def _divide_number(c: float) -> Callable[[Any, Any], Any]:
    """``c / t`` for a number c, as one correctly rounded division in t's dtype."""
    div = _torch.div

    def divide(_: float, t: Any) -> Any:
        return div(t.new_full((), c), t)

    return divide
