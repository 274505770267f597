"""The experiment config: pydantic schema, strict YAML loading, `key.path=value` overrides.

Every problem in a config is collected and reported at once in one `ConfigError`, each naming its
key path, the bad value, what would be valid and, when known, its line in the file. This module
imports neither torch nor rich: `fitcli check` must answer instantly.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fitcli.errors import ConfigError, ExpressionError
from fitcli.expr import CONSTANT_MEANINGS

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 50
MAX_NODES = 100_000

Loc = tuple[str | int, ...]

# --------------------------------------------------------------------------------------------
# YAML: a SafeLoader that reads YAML 1.2 floats, rejects duplicate keys, bombs and deep nesting
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Problems(ValueError):
    """Several problems found by one validator: (key path below the validated model, message)."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(m for _, m in problems))


def _show(value: Any, limit: int = 60) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, int, float, str)):
        text = repr(value)
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _integral(value: Any) -> Any:
    # `epochs: 1e4` means 10000; 2.5 stays a float and is refused as not an integer.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _number_to_text(value: Any) -> Any:
    # `basis: [1, x]`: a YAML number where an expression or a name is expected is its text.
    # Not inf or nan, whose text would read as a parameter name: those stay numbers and fail.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return value
        return repr(value) if isinstance(value, float) else str(value)
    return value


def _column(value: Any) -> str | int | None:
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"must be a column name (text) or a 0-based column index (got {_show(value)})")


Int = Annotated[int, BeforeValidator(_integral)]
Text = Annotated[str, BeforeValidator(_number_to_text)]
Column = Annotated[
    str | int | None, PlainValidator(_column, json_schema_input_type=str | int | None)
]


def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("fitcli", "{message}", {"message": message})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        """Problems visible in the raw mapping (which keys go together, expressions)."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _collect(cls, data: Any, handler: Any) -> Any:
        # An after-validator only runs once every field is valid; checking the structure of the
        # raw mapping here as well reports those problems alongside the field errors.
        extra = cls._structure(data) if isinstance(data, dict) else []
        try:
            result = handler(data)
        except ValidationError as exc:
            errors: list[Any] = exc.errors()
        else:
            if not extra:
                return result
            errors = []
        for err in errors:  # a nested section's own problems, raised again from here
            if err["type"] == "fitcli":
                err["type"] = _problem(err["msg"])
        for loc, message in extra:
            errors.append({"type": _problem(message), "loc": loc, "input": data})
        raise ValidationError.from_exception_data(cls.__name__, errors)


class GridSpec(_Section):
    """Where synthetic data is sampled: `num` evenly spaced points from `start` to `stop`."""

    start: float = Field(description="First x value (finite).")
    stop: float = Field(description="Last x value (finite, greater than start).")
    num: Int = Field(ge=2, le=10**8, description="Number of points, 2 to 10**8.")

    @model_validator(mode="after")
    def _ordered(self) -> GridSpec:
        if not self.start < self.stop:
            raise _Problems(
                [(("stop",), f"must be greater than start ({self.start}) (got {self.stop})")]
            )
        return self


class NoiseSpec(_Section):
    """Gaussian noise added to synthetic data."""

    std: float = Field(0.0, ge=0, description="Standard deviation of the noise (>= 0).")


class ColumnsSpec(_Section):
    """Which columns of the data file hold x, y and (optionally) the uncertainty of y."""

    x: Column = Field(None, description="Column name or 0-based index of x; default: first.")
    y: Column = Field(None, description="Column name or 0-based index of y; default: second.")
    sigma: Column = Field(
        None, description="Column name or 0-based index of the standard error of y; optional."
    )


def _parse(source: str, **kwargs: Any) -> Any:
    from fitcli.expr import parse_expression

    return parse_expression(source, **kwargs)


class DataSpec(_Section):
    """Synthetic data (`target`, `x`, `noise`) or measured data (`file`, `columns`)."""

    target: Text | None = Field(
        None, description="Expression of x that generates synthetic data, e.g. 1.5*sin(x)."
    )
    x: GridSpec | None = Field(None, description="Grid of x values for synthetic data.")
    noise: NoiseSpec | None = Field(
        None, description="Gaussian noise on synthetic data (default std 0)."
    )
    file: str | None = Field(
        None,
        min_length=1,
        description="CSV file with a header row, or a whitespace table; relative to the config.",
    )
    columns: ColumnsSpec | None = Field(
        None, description="Columns of the data file; default: x first, y second."
    )

    @field_validator("file")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if value is None or base is None:
            return value
        return os.path.normpath(os.path.join(os.path.abspath(base), os.path.expanduser(value)))

    @model_validator(mode="after")
    def _default_noise(self) -> DataSpec:
        if self.target is not None and self.noise is None:
            self.noise = NoiseSpec()
        return self

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        target, file = raw.get("target"), raw.get("file")
        if target is None and file is None:
            problems.append(((), "give either target (synthetic data) or file (measured data)"))
        elif target is not None and file is not None:
            problems.append(((), "give either target or file, not both"))
        elif target is not None:
            if raw.get("x") is None:
                problems.append(
                    (("x",), "required with target, e.g. x: {start: -10, stop: 10, num: 1000}")
                )
            if raw.get("columns") is not None:
                problems.append((("columns",), "only allowed with file, not with target"))
            problems += _expression_problems(("target",), target, allow_params=False, what="target")
        else:
            for key in ("x", "noise"):
                if raw.get(key) is not None:
                    problems.append(((key,), "only allowed with target, not with file"))
        return problems


def _expression_problems(loc: Loc, source: Any, **kwargs: Any) -> list[tuple[Loc, str]]:
    source = _number_to_text(source)
    if not isinstance(source, str):
        return []  # the field's own type check reports it
    try:
        _parse(source, **kwargs)
    except ExpressionError as exc:
        return [(loc, str(exc))]
    return []


class ParamSpec(_Section):
    """A fit parameter of `model.expr`: start value, optional bounds, fixed or free."""

    value: float = Field(1.0, description="Initial value (strictly inside the bounds).")
    min: float | None = Field(None, description="Lower bound, or null for none.")
    max: float | None = Field(None, description="Upper bound, or null for none.")
    vary: bool = Field(True, description="false keeps the parameter fixed at value.")

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        lo, hi, v = self.min, self.max, self.value
        if lo is not None and hi is not None and not lo < hi:
            raise _Problems([(("max",), f"must be greater than min ({lo}) (got {hi})")])
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Problems([(("value",), f"{v} is outside the bounds {_interval(lo, hi)}")])
        if self.vary and v in (lo, hi):
            raise _Problems(
                [
                    (
                        ("value",),
                        f"{v} lies on a bound of {_interval(lo, hi)}; "
                        "start strictly inside the bounds",
                    )
                ]
            )
        return self


def _interval(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _params_before(value: Any) -> Any:
    # `a: 1.5` is shorthand for `a: {value: 1.5}`.
    if isinstance(value, dict):
        return {
            k: {"value": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for k, v in value.items()
        }
    return value


class ModelSpec(_Section):
    """A linear basis (`basis`, `init`) or a nonlinear expression (`expr`, `params`)."""

    basis: list[Text] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Basis functions of x; the model is theta0*b0(x) + theta1*b1(x) + ...",
    )
    init: list[float] | None = Field(
        None,
        description="Initial basis coefficients (one per basis function); default N(0, 1) draws.",
    )
    expr: Text | None = Field(
        None, description="Expression of x whose other free names are fit parameters."
    )
    params: Annotated[dict[str, ParamSpec], BeforeValidator(_params_before)] | None = Field(
        None,
        description="Parameters of expr: a start value, or {value, min, max, vary}; default 1.0.",
    )

    @model_validator(mode="after")
    def _fill_params(self) -> ModelSpec:
        if self.expr is not None:
            given = self.params or {}
            names = _parse(self.expr, allow_params=True).params
            self.params = {n: given.get(n, ParamSpec()) for n in names}
        return self

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        basis, expr = raw.get("basis"), raw.get("expr")
        init, params = raw.get("init"), raw.get("params")
        if basis is None and expr is None:
            problems.append(((), "give either basis (linear model) or expr (expression model)"))
        elif basis is not None and expr is not None:
            problems.append(((), "give either basis or expr, not both"))
        elif basis is not None:
            if params is not None:
                problems.append((("params",), "only allowed with expr, not with basis"))
            if isinstance(basis, list):
                if isinstance(init, list) and len(init) != len(basis):
                    problems.append(
                        (
                            ("init",),
                            f"has {len(init)} values but basis has {len(basis)} functions; "
                            "give one initial coefficient per basis function",
                        )
                    )
                for i, source in enumerate(basis):
                    problems += _expression_problems(
                        ("basis", i), source, allow_params=False, what="basis function"
                    )
        else:
            if init is not None:
                problems.append((("init",), "only allowed with basis; use params with expr"))
            source = _number_to_text(expr)
            if not isinstance(source, str):
                return problems
            try:
                names = tuple(_parse(source, allow_params=True).params)
            except ExpressionError as exc:
                return [*problems, (("expr",), str(exc))]
            if not names:
                problems.append(
                    (("expr",), "has no parameters to fit; use names other than x, pi and e")
                )
            for key in params if isinstance(params, dict) else ():
                if key in CONSTANT_MEANINGS:  # `e` and `pi` in an expression are the constants
                    problems.append(
                        (
                            ("params", key),
                            f"{key!r} is {CONSTANT_MEANINGS[key]} in expressions, not a "
                            f"parameter; name the parameter otherwise (e.g. {key}0) in "
                            "model.expr and model.params",
                        )
                    )
                elif key not in names:
                    problems.append(
                        (
                            ("params", key),
                            f"{key!r} does not appear in model.expr; " + _their_params(names),
                        )
                    )
        return problems


def _their_params(names: tuple[str, ...]) -> str:
    return f"its parameters are {', '.join(names)}" if names else "it has no parameters"


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list) and depth < 3:
        return all(_is_plain(v, depth + 1) for v in value)
    return False


_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Named(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _kwargs(self) -> _Named:
        problems: list[tuple[Loc, str]] = []
        for key, value in (self.model_extra or {}).items():
            if not key.isidentifier():
                problems.append(((key,), "is not a valid keyword argument name"))
            elif not _is_plain(value):
                problems.append(
                    (
                        (key,),
                        "must be a finite number, text, true/false, null or a list of those "
                        f"(got {_show(value)})",
                    )
                )
        if problems:
            raise _Problems(problems)
        return self


class OptimizerSpec(_Named):
    """A torch.optim optimizer by name; every other key is one of its keyword arguments."""

    name: str = Field(
        "SGD", pattern=_IDENT, description="Class name in torch.optim, e.g. SGD, Adam, LBFGS."
    )


class SchedulerSpec(_Named):
    """A torch.optim.lr_scheduler by name; every other key is one of its keyword arguments."""

    name: str = Field(
        pattern=_IDENT, description="Class name in torch.optim.lr_scheduler, e.g. StepLR."
    )


_BREAKS = ("Cc", "Zl", "Zp")  # control characters, line and paragraph separators


def _single_line(value: Any) -> Any:
    if isinstance(value, str) and any(unicodedata.category(c) in _BREAKS for c in value):
        raise ValueError(f"must be a single line of text without control characters ({value!r})")
    return value


class Config(_Section):
    """A fitcli experiment: data, model, loss, optimizer and how long to train."""

    name: Annotated[Text, BeforeValidator(_single_line)] = Field(
        "experiment",
        min_length=1,
        max_length=200,
        description="Free text naming the experiment (run directories, plot titles).",
    )
    seed: Int = Field(
        0, ge=0, le=2**63 - 1, description="Seed for every random draw (data noise, init)."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (CUDA when available), cpu, cuda or cuda:N.",
    )
    dtype: Literal["float32", "float64"] = Field("float64", description="Floating point type.")
    epochs: Int = Field(500, ge=1, le=10**9, description="Number of training epochs.")
    snapshots: Int = Field(
        10,
        ge=1,
        le=1000,
        description="HTML snapshots: at epoch 0 and after every 1/snapshots of the run.",
    )
    batch_size: Int | None = Field(
        None, ge=1, le=10**9, description="Mini-batch size, or null for the full batch."
    )
    data: DataSpec = Field(description="The data to fit: synthetic (target) or a file.")
    model: ModelSpec = Field(description="The model: a linear basis or an expression.")
    loss: Literal["mse", "l1", "huber", "smooth_l1"] = Field("mse", description="Loss function.")
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(name="SGD", lr=0.01),
        description="torch.optim optimizer: name plus keyword arguments (default SGD, lr 0.01).",
    )
    scheduler: SchedulerSpec | None = Field(
        None, description="Optional torch.optim.lr_scheduler: name plus keyword arguments."
    )


# Sections of the schema by key path ("*" matches any key): their model, or None where any key
# is allowed (optimizer and scheduler keyword arguments, parameter names).
_SECTIONS: dict[tuple[str, ...], type[BaseModel] | None] = {
    (): Config,
    ("data",): DataSpec,
    ("data", "x"): GridSpec,
    ("data", "noise"): NoiseSpec,
    ("data", "columns"): ColumnsSpec,
    ("model",): ModelSpec,
    ("model", "params"): None,
    ("model", "params", "*"): ParamSpec,
    ("optimizer",): OptimizerSpec,
    ("scheduler",): SchedulerSpec,
}


def _section(path: Sequence[str | int]) -> tuple[bool, list[str], bool]:
    """(is a section, its schema keys, whether it also takes any other key)."""
    for pattern, model in _SECTIONS.items():
        if len(pattern) == len(path) and all(
            p in ("*", k) for p, k in zip(pattern, path, strict=True)
        ):
            if model is None:
                return True, [], True
            return True, list(model.model_fields), model.model_config.get("extra") == "allow"
    return False, [], False


# --------------------------------------------------------------------------------------------
# Validation and plain-English problems
# --------------------------------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _suggest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    if match:
        return f"did you mean {match[0]!r}?"
    return "valid keys are " + ", ".join(choices) if choices else "no keys are valid here"


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
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
        loc: Loc = tuple(err["loc"])
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


def config_from_dict(raw: dict, source: str = "<dict>", base_dir: Path | None = None) -> Config:
    """Validate a config mapping; a relative data.file is resolved against `base_dir` if given."""
    return _validate(raw, source, base_dir)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config file; data.file becomes an absolute path."""
    source = str(path)
    raw, lines = _load(read_config_text(path), source)
    overridden: dict[Loc, str] = {}
    if overrides:
        if not isinstance(raw, dict):
            _validate(raw, source, None)  # raises the top-level problem
        raw, overridden = _apply(raw, overrides, source)

    base_dir = Path(os.path.abspath(path)).parent
    return _validate(raw, source, base_dir, _Where(lines, overridden))


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _apply(raw: dict, overrides: Sequence[str], source: str | None) -> tuple[dict, dict[Loc, str]]:
    result = copy.deepcopy(raw)
    applied: dict[Loc, str] = {}
    problems: list[str] = []
    for text in overrides:
        key, eq, value_text = text.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
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
        if not open_ and part not in keys:
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
        elif not isinstance(child, dict):
            return (
                f"{_dotted(path[: i + 1])!r} is {_show(child)} in the config, "
                "not a section with keys"
            )
        node = child
    return None


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
            if not _section(child)[0] or path == ("model", "params"):  # `model.params.a=2` too
                keys[_dotted(child)] = None
            if _section(child)[0]:
                walk(child, node.get(key) if isinstance(node, dict) else None)

    walk((), root)
    return [k for k in keys if _KEY.match(k)]


# --------------------------------------------------------------------------------------------
# Round trip and JSON Schema
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict:
    """Plain data (JSON- and YAML-able) in schema order; every top-level key is present."""
    out = cfg.model_dump(mode="json")
    out["data"] = cfg.data.model_dump(mode="json", exclude_none=True)
    out["model"] = cfg.model.model_dump(mode="json", exclude_none=True)
    return out


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


def json_schema() -> dict:
    """JSON Schema of the config file, for editor completion and validation."""
    schema = Config.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "fitcli experiment config",
    }
