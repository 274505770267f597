"""The one `key.path=value` override grammar: its key pattern, applying overrides, their keys."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fitcli.config.schema import _parse, _section, _show
from fitcli.config.yaml_safe import Loc, _dotted, load_yaml
from fitcli.errors import ConfigError, ExpressionError

KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _apply(raw: dict, overrides: Sequence[str], source: str | None) -> tuple[dict, dict[Loc, str]]:
    result = copy.deepcopy(raw)
    applied: dict[Loc, str] = {}
    problems: list[str] = []
    for text in overrides:
        key, eq, value_text = text.partition("=")
        key = key.strip()
        if not eq or not KEY.match(key):
            problems.append(
                f"override {text!r} is not key.path=value (for example optimizer.lr=1e-3)"
            )
            continue
        try:
            value = load_yaml(value_text, f"override {text!r}")
        except ConfigError as exc:
            problems += [f"override {text!r}: {p}" for p in exc.problems]
            continue
        path = tuple(key.split("."))
        problem = _set(result, path, value)
        if problem:
            problems.append(f"override {text!r}: {problem}")
        else:
            applied[path] = text
    if problems:
        raise ConfigError(problems, source=source)
    return result, applied


def _set(root: dict, path: tuple[str, ...], value: Any) -> str | None:
    node = root
    for i, part in enumerate(path):
        here = path[:i]
        _, keys, open_ = _section(here)
        # A key the config itself has where the schema allows named entries (`data.x.u`,
        # a grid variable beside the one grid's start/stop/num) is a key here too.
        named = isinstance(node, dict) and part in node and _section((*here, part))[0]
        if not open_ and part not in keys and not named:
            choices = [k for k in dict.fromkeys([*keys, *node]) if k != part]
            match = difflib.get_close_matches(part, choices, n=1)
            hint = (
                f"did you mean {_dotted((*here, match[0]))!r}?"
                if match
                else "valid keys here are " + ", ".join(choices)
            )
            return f"unknown key {_dotted(path[: i + 1])!r}; {hint}"
        if i == len(path) - 1:
            node[part] = value
            return None
        is_section, _, _ = _section(path[: i + 1])
        child = node.get(part)
        if not is_section:
            return f"{_dotted(path[: i + 1])!r} is a single value, not a section with keys"
        if child is None:
            child = node[part] = {}
        elif (
            here == ("model", "params")
            and isinstance(child, (int, float))
            and not isinstance(child, bool)
        ):
            child = node[part] = {"value": child}
        elif path[: i + 1] == ("loss",) and isinstance(child, str):
            child = node[part] = {"name": child}  # `loss: cauchy` with `loss.f_scale=0.5`
        elif not isinstance(child, dict):
            return (
                f"{_dotted(path[: i + 1])!r} is {_show(child)} in the config, "
                "not a section with keys"
            )
        node = child
    return None


def apply_values(raw: dict, values: Mapping[str, Any], source: str | None = None) -> dict:
    """A copy of `raw` with each dotted key of `values` set to its (Python) value: the override
    grammar's keys and checks (`apply_overrides`) without reading values as YAML, for the
    Python API's keyword overrides (`fitcli.fit(cfg, **{"optimizer.lr": 0.05})`)."""
    result = copy.deepcopy(raw)
    problems: list[str] = []
    for key, value in values.items():
        shown = f"{key}={_show(value)}"
        if not KEY.match(key):
            problems.append(f"override {shown!r}: {key!r} is not a dotted key (e.g. optimizer.lr)")
            continue
        problem = _set(result, tuple(key.split(".")), copy.deepcopy(value))
        if problem:
            problems.append(f"override {shown!r}: {problem}")
    if problems:
        raise ConfigError(problems, source=source)
    return result


def apply_overrides(raw: dict, overrides: Sequence[str], source: str | None = None) -> dict:
    """A copy of `raw` with each `key.path=value` applied; values are read as YAML.

    Unknown keys are errors with a did-you-mean suggestion, except below optimizer, scheduler and
    model.params, whose keys are keyword arguments and parameter names. Setting a key inside an
    absent or null section creates it.
    """
    return _apply(raw, overrides, source)[0]


def override_keys(raw: Any = None) -> list[str]:
    """Every `key.path` an override can set (for shell completion): the schema's keys and those
    of the config mapping `raw` (keyword arguments, parameters, also those only in model.expr),
    values only, not sections; in schema order, then the file's."""
    keys: dict[str, None] = {}
    root = raw if isinstance(raw, dict) else {}
    model = root.get("model")
    expr = model.get("expr") if isinstance(model, dict) else None
    try:
        expr_params = list(_parse(expr, allow_params=True).params) if isinstance(expr, str) else []
    except ExpressionError:
        expr_params = []

    def walk(path: tuple[str, ...], node: Any) -> None:
        _, fields, _ = _section(path)
        own = [k for k in node if isinstance(k, str)] if isinstance(node, dict) else []
        if path == ("model", "params"):
            own += expr_params
        for key in dict.fromkeys([*fields, *own]):
            child = (*path, key)
            # `model.params.a=2` and `loss=cauchy` too, sections that take a single value
            if not _section(child)[0] or path == ("model", "params") or child == ("loss",):
                keys[_dotted(child)] = None
            if _section(child)[0]:
                walk(child, node.get(key) if isinstance(node, dict) else None)

    walk((), root)
    return [k for k in keys if KEY.match(k)]
