"""Plain-English config problems: each pydantic error as one line naming key path, value and fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from fitcli.config.schema import UNION_TAGS, Config, _Problems, _section, _show
from fitcli.config.yaml_safe import Loc, _dotted
from fitcli.errors import ConfigError


def _suggest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    if match:
        return f"did you mean {match[0]!r}?"
    return "valid keys are " + ", ".join(choices) if choices else "no keys are valid here"


def _describe(err: ErrorDetails) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err["input"]
    got = f" (got {_show(value)})"
    loc = err["loc"]
    if kind == "missing":
        return "required key is missing"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer" + got
    if kind in ("float_type", "float_parsing"):
        return "must be a number" + got
    if kind == "finite_number":
        return "must be a finite number" + got
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false" + got
    if kind == "string_type":
        return "must be text" + got
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters long (got {len(value)})"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}" + got
    if kind == "greater_than":
        return f"must be > {ctx['gt']}" + got
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}" + got
    if kind == "less_than":
        return f"must be < {ctx['lt']}" + got
    if kind == "list_type":
        return "must be a list" + got
    if kind == "too_short":
        n = ctx["min_length"]
        have = ctx["actual_length"] or "none"
        return f"must have at least {n} {'entry' if n == 1 else 'entries'} (got {have})"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} entries (got {len(value)})"
    if kind == "model_type" and len(loc) == 3 and loc[:2] == ("model", "params"):
        return "must be a number (the start value) or a mapping of value, min, max, vary" + got
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys" + got
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        text = f"must be one of {', '.join(choices)}" + got
        if isinstance(value, str):
            close = difflib.get_close_matches(value, choices, n=1)
            if close:
                text += f"; did you mean {close[0]!r}?"
        return text
    if kind == "string_pattern_mismatch":
        if loc == ("device",):
            return "must be auto, cpu, cuda or cuda:N (N a GPU index)" + got
        return "must be a Python class name such as Adam or StepLR" + got
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return err["msg"] + got


def _problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(k for k in err["loc"] if k not in UNION_TAGS)
        error = (err.get("ctx") or {}).get("error")
        if err["type"] == "value_error" and isinstance(error, _Problems):
            found += [((*loc, *sub), msg) for sub, msg in error.problems]
        elif err["type"] == "fitcli":
            found.append((loc, err["msg"]))
        elif err["type"] == "extra_forbidden":
            key = str(loc[-1])
            _, keys, _ = _section(loc[:-1])
            found.append((loc, f"unknown key {key!r}; {_suggest(key, keys)}"))
        else:
            found.append((loc, _describe(err)))
    return found


class _Where:
    """Where a key path came from: its line in the file, or the override that set it."""

    def __init__(
        self, lines: dict[Loc, int] | None = None, overridden: dict[Loc, str] | None = None
    ) -> None:
        self.lines = lines or {}
        self.overridden = overridden or {}

    def _override(self, loc: Loc) -> str | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.overridden:
                return self.overridden[loc[:n]]
        return None

    def line(self, loc: Loc) -> int | None:
        if self._override(loc) is not None:
            return None
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None

    def suffix(self, loc: Loc) -> str:
        override = self._override(loc)
        if override is not None:
            return f" (set by override {override!r})"
        line = self.line(loc)
        return "" if line is None else f" (line {line})"


def _format(loc: Loc, message: str, where: _Where) -> str:
    first, _, rest = message.partition("\n")
    unknown = first.startswith("unknown key ")
    path = _dotted(loc[:-1] if unknown else loc)
    text = f"{path}: {first}" if path else first
    text += where.suffix(loc)
    return text + ("\n" + rest if rest else "")


def _validate(
    raw: Any,
    source: str | None,
    base_dir: Path | None,
    where: _Where | None = None,
) -> Config:
    where = where or _Where()
    if raw is None:
        raise ConfigError(
            "the file is empty; a config is a mapping of keys such as name, data and model",
            source=source,
        )
    if not isinstance(raw, dict):
        kind = "a list" if isinstance(raw, list) else f"a single value ({_show(raw)})"
        raise ConfigError(
            f"the top level must be a mapping of keys such as name, data and model, not {kind}",
            source=source,
        )
    context = {"base_dir": base_dir}
    try:
        return Config.model_validate(raw, context=context)
    except ValidationError as exc:
        found = [(_format(loc, msg, where), where.line(loc)) for loc, msg in _problems(exc)]
        # In file order where lines are known, so the list reads top to bottom.
        found.sort(key=lambda p: (p[1] is None, p[1] or 0))
        raise ConfigError([text for text, _ in found], source=source) from None
