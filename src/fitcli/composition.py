"""How a model is put together: its components and its tied parameters. Torch-free.

Components. Each top-level additive term of ``model.expr`` is a component, in the expression's
order: ``gaussian(x, a1, c1, s1) + gaussian(x, a2, c2, s2) - b*x`` has three, the last one
``-(b*x)`` with its sign. A basis model's components are its basis functions times their
coefficients, ``theta0*1``, ``theta1*x``, ... A model of one term has no components (the total
is the only curve). Each component is itself a checked expression, evaluated with the model's
parameters, and the components add up to the model.

Ties. ``params: {s2: {expr: "s1"}, c2: {expr: "c1 + d"}}`` makes s2 and c2 functions of other
parameters (lmfit's ``Parameter(expr=...)``): they are not fitted but computed from the free
ones, in dependency order (`tie_order`), and their standard errors are propagated from the free
parameters' covariance (`fitcli.stats`). A tie may mention free parameters and other tied ones
(never ``x`` or a fixed parameter); a name that appears only in ties must be declared in
``model.params`` (``d: {value: 0.5, min: 0}``), which makes it a free parameter of the fit.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence

from fitcli.errors import ExpressionError
from fitcli.expr import Expression, parse_expression

# Keys of a parameter entry that a tied parameter cannot have: its value is its expression's.
TIE_EXCLUSIVE = ("value", "min", "max", "vary")


def _segment(source: str, node: ast.expr) -> str:
    text = ast.get_source_segment(source, node)
    assert text is not None  # nodes of a tree parsed from `source` have positions
    return " ".join(text.split())


def additive_terms(source: str) -> list[str]:
    """The top-level additive terms of an expression's source, each with its sign, in order:
    ``"a*x + b - (c + d)"`` gives ``["a*x", "b", "-(c + d)"]``; an expression that is not a sum
    gives one term. `source` must be a valid expression (`parse_expression`)."""
    stripped = source.strip()
    root = ast.parse(stripped, mode="eval").body
    terms: list[tuple[bool, ast.expr]] = []
    node = root
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
        terms.append((isinstance(node.op, ast.Sub), node.right))
        node = node.left
    terms.append((False, node))
    out = []
    for negative, term in reversed(terms):
        text = _segment(stripped, term)
        if negative:
            # `a - (b + c)`: the term's own text is `b + c` (the brackets are not part of it).
            simple = isinstance(term, ast.Name | ast.Constant | ast.Call) or (
                isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult | ast.Div | ast.Pow)
            )
            text = f"-{text}" if simple else f"-({text})"
        elif isinstance(term, ast.BinOp) and isinstance(term.op, ast.Add | ast.Sub):
            text = f"({text})"
        out.append(text)
    return out


def expression_components(source: str) -> list[str]:
    """The components of an expression model (see the module doc): [] for a single term."""
    terms = additive_terms(source)
    return terms if len(terms) >= 2 else []


def basis_components(basis: Sequence[str]) -> list[str]:
    """The components of a basis model, ``theta{k}*b_k``: [] for a single basis function."""
    if len(basis) < 2:
        return []
    out = []
    for k, b in enumerate(basis):
        node = ast.parse(b.strip(), mode="eval").body
        text = " ".join(b.split())
        plain = isinstance(node, ast.Name | ast.Constant | ast.Call) or (
            isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
        )
        out.append(f"theta{k}*{text}" if plain else f"theta{k}*({text})")
    return out


def parse_components(texts: Sequence[str], variables: tuple[str, ...] = ("x",)) -> list[Expression]:
    """The components as checked expressions (their texts come from a checked expression of
    the independent `variables`)."""
    return [
        parse_expression(t, allow_params=True, what="component", variables=variables) for t in texts
    ]


# -- ties ---------------------------------------------------------------------------------------


def tie_key(name: str) -> str:
    """Where a tie is written in a config, for messages."""
    return f"model.params.{name}.expr"


def parse_tie(source: str) -> Expression:
    """A tie's expression, checked: an ExpressionError for bad syntax, for ``x`` (a tie is a
    number, not a curve) and for a tie that mentions no parameter (that is a fixed value)."""
    expr = parse_expression(source, allow_params=True, what="tie")
    if expr.uses_x:
        col = _x_column(source)
        raise ExpressionError(
            "a tie cannot use x: a tied parameter is a number computed from other parameters, "
            "not a function of x (move the x-dependence into model.expr)",
            source,
            col,
        )
    if not expr.params:
        raise ExpressionError(
            "this tie mentions no parameter; to hold a parameter at a value write "
            "{value: ..., vary: false} instead of a tie",
            source,
        )
    return expr


def _x_column(source: str) -> int | None:
    for node in ast.walk(ast.parse(source.lstrip(), mode="eval")):
        if isinstance(node, ast.Name) and node.id == "x" and node.lineno == 1:
            return len(source) - len(source.lstrip()) + node.col_offset
    return None


class TieCycle(ValueError):
    """Ties that depend on each other in a circle; `chain` is the circle, first name repeated."""

    def __init__(self, chain: list[str]) -> None:
        self.chain = chain
        super().__init__(
            "ties form a cycle: " + " -> ".join(chain) + "; one of them must be a free parameter"
        )


def tie_order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    """The tied names of `deps` (tied name -> the names its tie mentions) in an order where
    every tie comes after the ties it mentions; `TieCycle` naming the chain when there is none.
    Names in `deps`' values that are not tied are free parameters and need no order."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in deps:
        if state.get(start) == 2:
            continue
        # Iterative depth-first search: (name, iterator over its tied dependencies).
        path: list[str] = [start]
        state[start] = 1
        stack = [iter([d for d in deps[start] if d in deps])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
                continue
            if state.get(nxt) == 1:
                raise TieCycle([*path[path.index(nxt) :], nxt])
            if state.get(nxt) == 2:
                continue
            state[nxt] = 1
            path.append(nxt)
            stack.append(iter([d for d in deps[nxt] if d in deps]))
    return order


def tie_problems(
    expr_names: Sequence[str], params: Mapping[str, object]
) -> list[tuple[tuple[str, ...], str]]:
    """Every problem with the ties of a raw ``model.params`` mapping, as (key path below
    ``model``, message): unknown names, ties to fixed parameters and cycles. A tie that does
    not parse is its own entry's problem (`parse_tie`, reported by the schema)."""
    problems: list[tuple[tuple[str, ...], str]] = []
    entries = {k: v for k, v in params.items() if isinstance(k, str)}
    ties: dict[str, Expression] = {}
    for name, spec in entries.items():
        if isinstance(spec, dict) and isinstance(spec.get("expr"), str):
            try:
                ties[name] = parse_tie(spec["expr"])
            except ExpressionError:
                continue  # reported at the entry itself
    known = set(expr_names) | set(entries)
    deps: dict[str, list[str]] = {}
    for name, tie in ties.items():
        loc = ("params", name, "expr")
        good = True
        for dep in tie.params:
            if dep not in known:
                import difflib

                close = difflib.get_close_matches(dep, sorted(known - {name}), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(
                    (
                        loc,
                        f"{dep!r} in the tie of {name} is neither a parameter of model.expr nor "
                        f"in model.params; {hint}to fit a new parameter that appears only in "
                        f"ties, declare it: params: {{{dep}: {{value: 1.0}}}}",
                    )
                )
                good = False
                continue
            spec = entries.get(dep)
            if isinstance(spec, dict) and spec.get("vary") is False and "expr" not in spec:
                problems.append(
                    (
                        loc,
                        f"ties {name} to {dep}, which is fixed (vary: false): {name} -> {dep}; "
                        f"write the fixed value into the tie instead, or let {dep} vary",
                    )
                )
                good = False
        deps[name] = list(tie.params) if good else [d for d in tie.params if d in known]
    try:
        tie_order(deps)
    except TieCycle as exc:
        problems.append((("params", exc.chain[0], "expr"), str(exc)))
    return problems
