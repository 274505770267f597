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
import functools
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fitcli.errors import ExpressionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONSTANTS",
    "CONSTANT_MEANINGS",
    "FUNCTIONS",
    "FUNCTION_NAMES",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_NODES",
    "Expression",
    "parse_expression",
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

# Function name in expressions -> attribute of the torch module.
_TORCH_NAMES: dict[str, str] = {
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "arcsin": "asin",
    "arccos": "acos",
    "arctan": "atan",
    "asin": "asin",
    "acos": "acos",
    "atan": "atan",
    "sinh": "sinh",
    "cosh": "cosh",
    "tanh": "tanh",
    "exp": "exp",
    "log": "log",
    "log10": "log10",
    "log2": "log2",
    "sqrt": "sqrt",
    "abs": "abs",
}

FUNCTION_NAMES: frozenset[str] = frozenset(_TORCH_NAMES)
"""Names callable in an expression; known without importing torch."""

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
CONSTANT_MEANINGS: dict[str, str] = {
    "pi": "the constant pi (3.14159...)",
    "e": "Euler's number (2.71828...)",
}

_ALLOWED_FUNCTIONS = ", ".join(sorted(FUNCTION_NAMES))
_ALLOWED_OPERATORS = "+ - * / **"

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
    ast.Compare: "a comparison",
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
#   ("num", value) | ("x",) | ("param", name) | ("neg", node) | ("call", torch_name, node)
#   ("pow", base, exponent) | ("chain", first, ((op, node), ...))   with op in _OPS values
_Node = tuple


@dataclass(frozen=True)
class Expression:
    """A checked expression; call it with ``x`` and parameter values to evaluate it in torch."""

    source: str
    params: tuple[str, ...]
    uses_x: bool
    _tree: _Node = field(repr=False, compare=False)
    _what: str = field(default="expression", repr=False, compare=False)
    _compiled: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __call__(
        self,
        x: torch.Tensor,
        params: Mapping[str, torch.Tensor | float] | None = None,
    ) -> torch.Tensor:
        """Evaluate with torch ops; the result has ``x``'s shape, dtype and device.

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
        result = fn(x, values)
        if result.shape != x.shape:
            result = result.expand(x.shape).contiguous()
        if result.dtype is not x.dtype and x.is_floating_point():
            result = result.to(x.dtype)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # Closures do not pickle (Dask ships configs to workers): re-parse on the other side.
        return (_rebuild, (self.source, self._what))


def _rebuild(source: str, what: str) -> Expression:
    return parse_expression(source, what=what)


_NO_PARAMS: dict[str, Any] = {}


def parse_expression(
    source: str, *, allow_params: bool = True, what: str = "expression"
) -> Expression:
    """Validate ``source`` against the allowlist and return the checked ``Expression``.

    Free names other than ``x``, ``pi`` and ``e`` become parameters, in order of first
    appearance; with ``allow_params=False`` they are errors. ``what`` names the expression in
    messages ("target", "basis function"). Never imports torch, never evaluates anything.
    """
    if not isinstance(source, str):
        raise ExpressionError(
            f"{what} must be a string, not {type(source).__name__}", f"<{type(source).__name__}>"
        )
    return _parse_checked(source, allow_params, what)


# A config's expression is parsed by its validation and again by the model it builds, and a
# program fitting many data sets parses the same few sources over and over: each source is
# checked once. An `Expression` is immutable (its compiled closures are a cache of a pure
# function), so every caller may share it; errors are not cached, each call raises afresh.
@functools.lru_cache(maxsize=256)
def _parse_checked(source: str, allow_params: bool, what: str) -> Expression:
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
    tree = checker.parse(stripped)
    return Expression(
        source=source,
        params=tuple(checker.params),
        uses_x=checker.uses_x,
        _tree=tree,
        _what=what,
    )


class _Checker:
    """One validation pass: bounds first (iteratively), then the allowlist (recursively)."""

    def __init__(self, source: str, base: int, allow_params: bool, what: str) -> None:
        self.source = source
        self.base = base  # leading whitespace stripped before parsing
        self.allow_params = allow_params
        self.what = what
        self.params: dict[str, None] = {}  # ordered set
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
        return self.visit(body)

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
        if name == "x":
            self.uses_x = True
            return ("x",)
        if name in CONSTANTS:
            return ("num", CONSTANTS[name])
        if name in FUNCTION_NAMES:
            raise self.error(f"function '{name}' must be called, e.g. {name}(x)", node)
        if name.startswith("_"):
            raise self.error(f"name '{name}' is not allowed (names may not start with '_')", node)
        if not self.allow_params:
            raise self.error(
                f"unknown name '{name}'; only x, pi and e may appear in {_article(self.what)}", node
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
        if name not in FUNCTION_NAMES:
            raise self.error(f"unknown function '{name}'; allowed: {_ALLOWED_FUNCTIONS}", func)
        for keyword in node.keywords:
            raise self.error(f"keyword arguments are not allowed in {name}()", keyword)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.error("starred arguments are not allowed", arg)
        if len(node.args) != 1:
            raise self.error(f"{name}() takes exactly one argument ({len(node.args)} given)", node)
        return ("call", _TORCH_NAMES[name], self.visit(node.args[0]))


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
        torch = _load_torch()
        functions = {key: getattr(torch, attr) for key, attr in _TORCH_NAMES.items()}
        globals()["FUNCTIONS"] = functions
        return functions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    FUNCTIONS: dict[str, Callable[..., Any]]


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
    if tag == "param":
        return ("param", node[1])
    if tag == "neg":
        f = _as_fn(*_compile_node(node[1]))
        return ("fn", lambda x, p: -f(x, p))
    if tag == "call":
        fn = getattr(_torch, node[1])
        kind, value = _compile_node(node[2])
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
