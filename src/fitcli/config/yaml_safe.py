"""Hardened YAML: read a config file's text, parse it safely with line numbers, dump it back."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fitcli.errors import ConfigError

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 50
MAX_NODES = 100_000

Loc = tuple[str | int, ...]


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot, or an
# exponent without a sign (`1e-3`, `1E5`, `2.5e10`). Dotted forms (`.5`, `1.5`) already resolve.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


def _resolvers(base: dict) -> dict:
    # Dates stay text (a name like 2024-05-01 is a name); YAML 1.2 floats are floats.
    table = {ch: [r for r in rs if r[0] != _TIMESTAMP_TAG] for ch, rs in base.items()}
    for ch in "-+0123456789.":
        table.setdefault(ch, []).append((_FLOAT_TAG, _FLOAT_12))
    return table


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and a nesting limit applied while composing."""

    yaml_implicit_resolvers = _resolvers(yaml.SafeLoader.yaml_implicit_resolvers)

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Composing recurses per level: stop before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"nesting deeper than {MAX_DEPTH} levels (line {mark.line + 1}); "
                    "a fitcli config is at most a few levels deep"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings the loader would read as something else (`'1e5'`)."""

    yaml_implicit_resolvers = _resolvers(yaml.SafeDumper.yaml_implicit_resolvers)


def _check_tree(root: yaml.Node) -> list[str]:
    """Problems in the composed node graph: recursion, size, depth, keys (duplicates, types).

    Sizes are counted as if every alias were expanded, memoised per node so that a billion-laughs
    file is measured in microseconds instead of expanded.
    """
    problems: list[str] = []
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    active: set[int] = set()

    def walk(node: yaml.Node, depth: int, path: Loc) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise ConfigError(f"an alias refers to itself (line {node.start_mark.line + 1})")
        if key in memo:
            size, height = memo[key]
        else:
            active.add(key)
            size, height = 1, 1
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for k, v in node.value:
                    line = k.start_mark.line + 1
                    if k.tag == _MERGE_TAG:
                        child: Loc = path
                    elif not isinstance(k, yaml.ScalarNode) or k.tag != _STR_TAG:
                        what = f"key {k.value!r}" if isinstance(k, yaml.ScalarNode) else "a key"
                        problems.append(
                            f"{what} (line {line}) is not text; keys must be text "
                            "(put it in quotes)"
                        )
                        child = path
                    else:
                        child = (*path, k.value)
                        if k.value in seen:
                            problems.append(
                                f"duplicate key {_dotted(child)!r} on lines {seen[k.value]} "
                                f"and {line}; give each key once"
                            )
                        else:
                            seen[k.value] = line
                    s, h = walk(v, depth + 1, child)
                    size, height = size + s + 1, max(height, h + 1)
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    s, h = walk(v, depth + 1, (*path, i))
                    size, height = size + s, max(height, h + 1)
            active.discard(key)
            memo[key] = (size, height)
        if size > MAX_NODES:
            raise ConfigError(
                f"the document expands to more than {MAX_NODES} values (line "
                f"{node.start_mark.line + 1}); are aliases (*name) repeated many times?"
            )
        if depth + height - 1 > MAX_DEPTH:
            raise ConfigError(
                f"nesting deeper than {MAX_DEPTH} levels through aliases "
                f"(line {node.start_mark.line + 1})"
            )
        return size, height

    walk(root, 1, ())
    return problems


def _line_map(root: yaml.Node) -> dict[Loc, int]:
    """Key path -> 1-based line of its key (or list item) in the file."""
    lines: dict[Loc, int] = {(): root.start_mark.line + 1}

    def walk(node: yaml.Node, path: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.tag == _MERGE_TAG:
                    walk(v, path)
                elif isinstance(k, yaml.ScalarNode):
                    lines[(*path, k.value)] = k.start_mark.line + 1
                    walk(v, (*path, k.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    walk(root, ())
    return lines


def _syntax_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"YAML error: {problem}"
    text = f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context = getattr(exc, "context", None)
    ctx_mark = getattr(exc, "context_mark", None)
    if context:
        where = f" at line {ctx_mark.line + 1}, column {ctx_mark.column + 1}" if ctx_mark else ""
        text += f" ({context}{where})"
    return text


def _reader_error(exc: yaml.reader.ReaderError, text: str) -> str:
    before = text[: exc.position]
    line, column = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or " ")
    return (
        f"character U+{char:04X} at line {line}, column {column} is not allowed in YAML "
        "(control characters cannot appear in a config)"
    )


def _load(text: str, source: str | None) -> tuple[Any, dict[Loc, int]]:
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(_reader_error(exc, text), source=source) from None
    try:
        try:
            root = loader.get_single_node()
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=source) from None
        if root is None:
            return None, {}
        try:
            problems = _check_tree(root)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=source) from None
        if problems:
            raise ConfigError(problems, source=source)
        data = loader.construct_document(root)
        return data, _line_map(root)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(_reader_error(exc, text), source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(_syntax_error(exc), source=source) from None
    finally:
        loader.dispose()


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely: YAML 1.2 floats, no duplicate keys, no alias bombs, depth <= 50.

    Returns None for an empty document. Raises ConfigError (naming `source`) on any problem.
    """
    return _load(text, source)[0]


def read_config_text(path: str | Path) -> str:
    """The text of a config file: a regular file of at most 1 MiB of UTF-8 without NUL bytes."""
    p = Path(path)
    source = str(path)
    try:
        if not p.exists():
            raise ConfigError("no such file", source=source)
        if p.is_dir():
            raise ConfigError("is a directory, not a config file", source=source)
        if not p.is_file():
            raise ConfigError("is not a regular file", source=source)
        with p.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            f"the file is larger than {MAX_FILE_BYTES} bytes (1 MiB); "
            "a config is a short text file",
            source=source,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
            "is not valid UTF-8)",
            source=source,
        ) from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"not a text file (NUL byte at byte offset {nul})",
            source=source,
        )
    return text.removeprefix("\ufeff")


def dump_yaml(d: dict) -> str:
    """Block-style YAML in the mapping's own key order, read back identically by load_yaml."""
    return yaml.dump(
        d,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=10**6,
    )
