"""The experiment config's pydantic schema: every section, its keys, defaults and checks."""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fitcli import bands as _bands
from fitcli.config.yaml_safe import Loc
from fitcli.errors import ExpressionError
from fitcli.expr import ONE_VARIABLE, name_taken, rename_hint, variable_problem
from fitcli.losses import NAMES as _LOSS_NAMES
from fitcli.losses import problems as _loss_problems


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


def _x_columns(value: Any) -> Any:
    # One column (today's x), or several variables: a list of columns, or names -> columns.
    if isinstance(value, list | dict):
        if len(value) < 2:
            raise ValueError(
                "several variables need at least two columns; for one, give its column "
                "(x: T reads column T as the variable x)"
            )
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            if item is None:
                raise ValueError("every variable needs its column (a name or a 0-based index)")
            _column(item)
        return dict(value) if isinstance(value, dict) else list(value)
    return _column(value)


Int = Annotated[int, BeforeValidator(_integral)]
Text = Annotated[str, BeforeValidator(_number_to_text)]
Column = Annotated[
    str | int | None, PlainValidator(_column, json_schema_input_type=str | int | None)
]
XColumns = Annotated[
    str | int | list[str | int] | dict[str, str | int] | None,
    PlainValidator(
        _x_columns,
        json_schema_input_type=str | int | list[str | int] | dict[str, str | int] | None,
    ),
]

# Union tags of `data.x` (one grid, or one per variable): never a key, so messages drop them.
UNION_TAGS = frozenset({"<grid>", "<grids>"})


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

    x: XColumns = Field(
        None,
        description="Column name or 0-based index of x; default: first. Several variables: a "
        "list of columns (each named by its column name, or x0, x1, ... for an index) or a "
        "mapping of variable names to columns, e.g. {T: 0, P: 1}.",
    )
    y: Column = Field(None, description="Column name or 0-based index of y; default: second.")
    sigma: Column = Field(
        None, description="Column name or 0-based index of the standard error of y; optional."
    )
    group: Column = Field(
        None,
        description="Column name or 0-based index of a group label (text or integers): the "
        "data split into groups, fitted together (`per_group` parameters, one value per group).",
    )


def _parse(source: str, **kwargs: Any) -> Any:
    from fitcli.expr import parse_expression

    return parse_expression(source, **kwargs)


def _grid_kind(value: Any) -> str:
    """`data.x`'s form: one grid, or a mapping of variable names to grids (the full grid)."""
    if (
        isinstance(value, dict)
        and value
        and not set(value) & set(GridSpec.model_fields)
        and all(isinstance(v, dict | GridSpec) for v in value.values())
    ):
        return "<grids>"
    return "<grid>"


Grids = Annotated[
    Annotated[GridSpec, Tag("<grid>")] | Annotated[dict[str, GridSpec], Tag("<grids>")],
    Discriminator(_grid_kind),
]


def variable_names(columns_x: Any, grid: Any) -> tuple[str, ...]:
    """The independent variables that `data.columns.x` (or the synthetic grid `data.x`) names:
    ``("x",)`` for one column; a list's names (``x<k>`` for the k-th given by index); a
    mapping's keys. Works on raw config values as well as validated ones."""
    if isinstance(columns_x, list) and len(columns_x) > 1:
        return tuple(c if isinstance(c, str) else f"x{k}" for k, c in enumerate(columns_x))
    if isinstance(columns_x, dict) and len(columns_x) > 1:
        return tuple(str(k) for k in columns_x)
    if isinstance(grid, dict) and len(grid) > 1 and not set(grid) & set(GridSpec.model_fields):
        return tuple(str(k) for k in grid)
    return ONE_VARIABLE


def _raw_variables(raw: Any) -> tuple[tuple[str, ...], Loc]:
    """(variables, key that names them) of a raw `data` mapping."""
    if not isinstance(raw, dict):
        return ONE_VARIABLE, ()
    columns = raw.get("columns")
    columns_x = columns.get("x") if isinstance(columns, dict) else None
    if isinstance(columns_x, list | dict) and len(columns_x) > 1:
        return variable_names(columns_x, None), ("columns", "x")
    return variable_names(None, raw.get("x")), ("x",)


# The variables of the config being validated, for model expressions (`Config._variables`).
_VARIABLES: ContextVar[tuple[str, ...]] = ContextVar("variables", default=ONE_VARIABLE)


class DataSpec(_Section):
    """Synthetic data (`target`, `x`, `noise`) or measured data (`file`, `columns`)."""

    target: Text | None = Field(
        None, description="Expression of x that generates synthetic data, e.g. 1.5*sin(x)."
    )
    x: Grids | None = Field(
        None,
        description="Grid of x values for synthetic data; several variables: one grid per "
        "name, e.g. {T: {start: 0, stop: 1, num: 10}, P: {...}} (the full grid of all points).",
    )
    noise: NoiseSpec | None = Field(
        None, description="Gaussian noise on synthetic data (default std 0)."
    )
    file: str | None = Field(
        None,
        min_length=1,
        description="CSV file with a header row, or a whitespace table; relative to the config.",
    )
    files: list[Annotated[str, Field(min_length=1)]] | str | None = Field(
        None,
        description="Several data files with the same columns, or a glob such as wells/*.csv "
        "(relative to the config); each file is one group, named by its file name.",
    )
    columns: ColumnsSpec | None = Field(
        None, description="Columns of the data file; default: x first, y second."
    )
    nan_policy: Literal["raise", "omit"] | None = Field(
        None,
        description="raise (default): a NaN or empty cell in a used column is an error; omit: "
        "such rows are left out, counted in summary.json.",
    )
    range: dict[str, list[float]] | None = Field(
        None,
        description="Per variable, [low, high] (inclusive): only the rows inside are fitted, "
        "e.g. {x: [2, 8]}.",
    )
    absolute_sigma: bool | None = Field(
        None,
        description="true (default): sigma are standard errors; false: relative weights, the "
        "covariance scaled by the reduced chi-square (curve_fit's absolute_sigma=False).",
    )

    @property
    def variables(self) -> tuple[str, ...]:
        """The independent variables' names: ``("x",)``, or several (`variable_names`)."""
        return variable_names(self.columns.x if self.columns is not None else None, self.x)

    @field_validator("file")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if value is None or base is None:
            return value
        return os.path.normpath(os.path.join(os.path.abspath(base), os.path.expanduser(value)))

    @field_validator("files")
    @classmethod
    def _resolve_files(
        cls, value: list[str] | str | None, info: ValidationInfo
    ) -> list[str] | str | None:
        base = (info.context or {}).get("base_dir")
        if value is None or base is None:
            return value
        root = os.path.abspath(base)
        if isinstance(value, str):
            return os.path.join(root, os.path.expanduser(value))
        return [os.path.normpath(os.path.join(root, os.path.expanduser(v))) for v in value]

    @property
    def grouped(self) -> bool:
        """Whether the data fall into groups (`columns.group`, or several `files`)."""
        return self.files is not None or (
            self.columns is not None and self.columns.group is not None
        )

    @model_validator(mode="after")
    def _default_noise(self) -> DataSpec:
        if self.target is not None and self.noise is None:
            self.noise = NoiseSpec()
        return self

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        target, file = raw.get("target"), raw.get("file")
        files = raw.get("files")
        if files is not None:
            if file is not None or target is not None:
                problems.append(((), "give files alone, not with file or target"))
            columns = raw.get("columns")
            if isinstance(columns, dict) and columns.get("group") is not None:
                problems.append(
                    (
                        ("columns", "group"),
                        "with several files each file is a group; remove columns.group",
                    )
                )
            if isinstance(files, list) and len(files) < 2:
                problems.append((("files",), "give at least two files (one file: use file)"))
            for key in ("x", "noise"):
                if raw.get(key) is not None:
                    problems.append(((key,), "only allowed with target, not with files"))
            return problems + _variable_problems(raw)
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
            variables = _raw_variables(raw)[0]
            problems += _expression_problems(
                ("target",), target, allow_params=False, what="target", variables=variables
            )
        else:
            for key in ("x", "noise"):
                if raw.get(key) is not None:
                    problems.append(((key,), "only allowed with target, not with file"))
        problems += _variable_problems(raw)
        return problems


def _variable_problems(raw: dict) -> list[tuple[Loc, str]]:
    """The variables' names (valid, distinct) and `range`'s keys and intervals."""
    variables, loc = _raw_variables(raw)
    problems: list[tuple[Loc, str]] = []
    if variables is not ONE_VARIABLE:
        for name in variables:
            problem = variable_problem(name)
            if problem is not None:
                problems.append((loc, problem))
        doubled = sorted({n for n in variables if variables.count(n) > 1})
        if doubled:
            problems.append((loc, f"variable {doubled[0]!r} is given twice; name each once"))
    ranges = raw.get("range")
    if isinstance(ranges, dict):
        for name, bounds in ranges.items():
            if name not in variables:
                problems.append(
                    (
                        ("range", name),
                        f"{name!r} is not a variable; the variables are {', '.join(variables)}",
                    )
                )
            elif isinstance(bounds, list) and (
                len(bounds) != 2
                or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            ):
                problems.append((("range", name), "must be [low, high], two numbers"))
            elif isinstance(bounds, list) and not bounds[0] <= bounds[1]:
                problems.append(
                    (("range", name), f"low must not exceed high (got {_show(bounds)})")
                )
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


def _start_value(value: Any) -> float | str:
    # A number, or `guess` (the start comes from the data: `fitcli.guess`).
    if value == "guess":
        return "guess"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _Problems([((), f"must be a finite number (got {_show(value)})")])
        return float(value)
    raise _Problems([((), f"must be a number or guess (got {_show(value)})")])


StartValue = Annotated[
    float | Literal["guess"], PlainValidator(_start_value, json_schema_input_type=float | str)
]


class ParamSpec(_Section):
    """A fit parameter of `model.expr`: start value, optional bounds, fixed or free; or tied."""

    value: StartValue = Field(
        1.0,
        description="Initial value (strictly inside the bounds), or guess: from the data, by "
        "the parameter's role in a lineshape call.",
    )
    min: float | None = Field(None, description="Lower bound, or null for none.")
    max: float | None = Field(None, description="Upper bound, or null for none.")
    vary: bool = Field(True, description="false keeps the parameter fixed at value.")
    expr: Text | None = Field(
        None,
        description="A tie: the parameter is this expression of other parameters (not of x), "
        "e.g. c1 + 3.5; it then takes no value, min, max or vary.",
    )
    per_group: bool | None = Field(
        None,
        description="With grouped data: true gives the parameter one value per group; false "
        "(default) shares one value across all groups.",
    )

    @model_serializer(mode="wrap")
    def _tied_alone(self, handler: Any) -> Any:
        # A tied parameter is its expression alone: the resolved config must load again.
        data = handler(self)
        return {"expr": self.expr} if self.expr is not None else data

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        from fitcli.composition import TIE_EXCLUSIVE, parse_tie

        source = _number_to_text(raw.get("expr"))
        if not isinstance(source, str):
            return []  # absent, or the field's own type check reports it
        given = [k for k in TIE_EXCLUSIVE if k in raw]
        problems: list[tuple[Loc, str]] = []
        if given:
            problems.append(
                (
                    ("expr",),
                    f"a tied parameter takes its value from expr, so it cannot also have "
                    f"{', '.join(given)}; remove {'it' if len(given) == 1 else 'them'} (to keep "
                    "a tie within bounds, tie it to a bounded parameter: c2: {expr: c1 + d} "
                    "with d: {min: 0})",
                )
            )
        try:
            parse_tie(source)
        except ExpressionError as exc:
            problems.append((("expr",), str(exc)))
        return problems

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.expr is not None:
            return self
        lo, hi, v = self.min, self.max, self.value
        if lo is not None and hi is not None and not lo < hi:
            raise _Problems([(("max",), f"must be greater than min ({lo}) (got {hi})")])
        if isinstance(v, str):  # guessed from the data, then put inside the bounds
            return self
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
    # `a: 1.5` is shorthand for `a: {value: 1.5}`, `a: guess` for `a: {value: guess}`.
    if isinstance(value, dict):
        return {
            k: {"value": v}
            if (isinstance(v, (int, float)) and not isinstance(v, bool)) or v == "guess"
            else v
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
    guess: bool | None = Field(
        None,
        description="true: every lineshape argument of expr without a value in params starts "
        "at a guess from the data.",
    )

    @model_validator(mode="after")
    def _fill_params(self) -> ModelSpec:
        if self.expr is not None:
            given = self.params or {}
            names = _parse(self.expr, allow_params=True, variables=_VARIABLES.get()).params
            # The parameters of expr in its order, then those only in ties and the derived ones
            # (ties of names not in expr), as given: the order is the same when reloaded.
            filled = {n: given.get(n, ParamSpec()) for n in names}
            self.params = {**filled, **{k: v for k, v in given.items() if k not in filled}}
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
            if raw.get("guess") is not None:
                problems.append((("guess",), "only allowed with expr, not with basis"))
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
                        ("basis", i),
                        source,
                        allow_params=False,
                        what="basis function",
                        variables=_VARIABLES.get(),
                    )
        else:
            if init is not None:
                problems.append((("init",), "only allowed with basis; use params with expr"))
            source = _number_to_text(expr)
            if not isinstance(source, str):
                return problems
            try:
                names = tuple(_parse(source, allow_params=True, variables=_VARIABLES.get()).params)
            except ExpressionError as exc:
                return [*problems, (("expr",), str(exc))]
            if not names:
                problems.append(
                    (("expr",), "has no parameters to fit; use names other than x, pi and e")
                )
            referenced: set[str] = set()  # names the ties mention
            if isinstance(params, dict):
                from fitcli.composition import tie_problems

                problems += tie_problems(names, params)
                referenced = _tie_names(params)
            for key in params if isinstance(params, dict) else ():
                entry = params.get(key) if isinstance(params, dict) else None
                tied = isinstance(entry, dict) and entry.get("expr") is not None
                taken = name_taken(key)  # `e`, `pi`, `erf` ... in an expression are not names
                if key in _VARIABLES.get():
                    continue  # a variable's name: `Config._structure` says so at the variable
                if taken is not None:
                    problems.append(
                        (
                            ("params", key),
                            f"{taken}, not a parameter; {rename_hint(key)}, in model.expr "
                            "and model.params",
                        )
                    )
                elif key not in names and not tied and key not in referenced:
                    problems.append(
                        (
                            ("params", key),
                            f"{key!r} does not appear in model.expr"
                            + (" nor in any tie; " if referenced else "; ")
                            + _their_params(names),
                        )
                    )
        return problems


def _tie_names(params: dict) -> set[str]:
    """The names that the (parseable) ties of a raw model.params mapping mention."""
    out: set[str] = set()
    for spec in params.values():
        source = spec.get("expr") if isinstance(spec, dict) else None
        if isinstance(source, str):
            try:
                out.update(_parse(source, allow_params=True).params)
            except ExpressionError:
                continue  # reported at the entry itself
    return out


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


class LossSpec(BaseModel):
    """`loss` in its mapping form: a loss name and its options (`fitcli.losses.OPTIONS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The loss: " + ", ".join(_LOSS_NAMES) + ".")
    f_scale: float | None = Field(
        None, description="cauchy, soft_l1, arctan, student_t: the residual scale C (> 0)."
    )
    nu: float | None = Field(None, description="student_t: degrees of freedom (> 0).")


def _loss_value(value: Any) -> str | LossSpec:
    found = _loss_problems(value)
    if found:
        raise _Problems(list(found))
    if isinstance(value, str):
        return value
    return LossSpec(**{k: float(v) if k != "name" else v for k, v in value.items()})


def _loss_dump(value: str | LossSpec) -> Any:
    return value if isinstance(value, str) else value.model_dump(exclude_none=True)


LossField = Annotated[
    str | LossSpec,
    PlainValidator(_loss_value, json_schema_input_type=Literal[_LOSS_NAMES] | LossSpec),
    PlainSerializer(_loss_dump),
]


_BREAKS = ("Cc", "Zl", "Zp")  # control characters, line and paragraph separators


def _single_line(value: Any) -> Any:
    if isinstance(value, str) and any(unicodedata.category(c) in _BREAKS for c in value):
        raise ValueError(f"must be a single line of text without control characters ({value!r})")
    return value


Label = Annotated[Text, BeforeValidator(_single_line)]


def _level(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"must be a level between 0 and 1, e.g. 0.95 for 95% (got {value!r})")
    return value


class ReportSpec(_Section):
    """What a run reports beyond its run directory's own files, and how the report and
    snapshots draw the fit: axis titles, figure title, log axes, the levels of the confidence
    and prediction bands."""

    x_label: Label | None = Field(
        None, min_length=1, max_length=200, description="x axis title; default: x's column name."
    )
    y_label: Label | None = Field(
        None, min_length=1, max_length=200, description="y axis title; default: y's column name."
    )
    title: Label | None = Field(
        None, min_length=1, max_length=200, description="Fit figure title; default: the name."
    )
    log_x: bool = Field(False, description="true draws x on a log scale.")
    log_y: bool = Field(False, description="true draws y on a log scale.")
    formats: list[Literal["png", "svg", "pdf"]] = Field(
        default_factory=list,
        description="Static figures `fitcli train` writes at the end of a completed run, "
        "figures/fit.<format> and figures/loss.<format>: any of png, svg, pdf (they need "
        "Chrome or Chromium).",
    )
    levels: list[Annotated[float, AfterValidator(_level)]] = Field(
        default_factory=lambda: list(_bands.DEFAULT_LEVELS),
        max_length=_bands.MAX_LEVELS,
        description="Levels of the confidence and prediction bands (bands.csv, the final "
        "snapshot and the report), each between 0 and 1, e.g. [0.68, 0.95]; [] for none.",
    )

    @field_validator("formats")
    @classmethod
    def _once(cls, value: list[str]) -> list[str]:
        twice = sorted({f for f in value if value.count(f) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return value

    @field_validator("levels")
    @classmethod
    def _distinct(cls, levels: list[float]) -> list[float]:
        seen: dict[float, int] = {}
        problems: list[tuple[Loc, str]] = []
        for i, level in enumerate(levels):
            if level in seen:
                problems.append(((i,), f"{level!r} is given twice (also levels[{seen[level]}])"))
            seen.setdefault(level, i)
        if problems:
            raise _Problems(problems)
        return levels


def _levels_value(value: Any) -> Any:
    # `level: 0.95` or `level: [0.68, 0.95]`: each strictly between 0 and 1.
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("must be a number between 0 and 1, or a list of them (got [])")
    for v in values:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1
        if not ok:
            raise ValueError(
                f"must be between 0 and 1 exclusive, e.g. 0.95, or a list of such levels "
                f"(got {_show(v)})"
            )
    return value


class UncertaintySpec(_Section):
    """Intervals beyond the covariance, computed at the end of a run (`fitcli.intervals`)."""

    method: Literal["covariance", "profile", "bootstrap", "mcmc"] = Field(
        "covariance",
        description="covariance (the error bars only), profile (profile likelihood, lmfit's "
        "F-test), bootstrap (percentile intervals of refitted resamples) or mcmc (credible "
        "intervals from emcee's posterior samples).",
    )
    level: Annotated[float | list[float], PlainValidator(_levels_value)] = Field(
        0.95, description="Confidence level(s) of the intervals, each in (0, 1)."
    )
    samples: Int = Field(
        1000, ge=10, le=1_000_000, description="Bootstrap resamples (10 to 10**6)."
    )
    resampling: Literal["residual", "case"] = Field(
        "residual",
        description="Bootstrap: residual (resampled residuals added to the fit) or case "
        "(resampled data rows).",
    )
    walkers: Int | None = Field(
        None,
        ge=2,
        le=100_000,
        description="MCMC: walkers of the ensemble, even and at least twice the free "
        "parameters (default: the larger of 32 and 4 per free parameter).",
    )
    steps: Int = Field(
        5000, ge=100, le=10_000_000, description="MCMC: steps of each walker (100 to 10**7)."
    )
    burn: Int | None = Field(
        None,
        ge=0,
        description="MCMC: first steps of each walker left out (default: a quarter of steps).",
    )

    @model_validator(mode="after")
    def _burn_inside(self) -> UncertaintySpec:
        if self.burn is not None and self.burn >= self.steps:
            raise ValueError(
                f"burn ({self.burn}) must be smaller than steps ({self.steps}): the chain "
                "kept is the steps after the burn"
            )
        if self.walkers is not None and self.walkers % 2:
            raise ValueError(
                f"walkers must be even (got {self.walkers}): the ensemble moves in two halves"
            )
        return self


# Upper bound of `starts`: each start is a whole fit.
MAX_STARTS = 1024


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
    starts: Int = Field(
        1,
        ge=1,
        le=MAX_STARTS,
        description="Starts of the fit: the given one first, the rest drawn inside the bounds "
        f"(Sobol, from seed); the best is kept. 1 to {MAX_STARTS}.",
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
    loss: LossField = Field(
        "mse",
        description="Loss function: a name, or a mapping of name and options "
        "(e.g. {name: soft_l1, f_scale: 0.5}).",
    )
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(name="SGD", lr=0.01),
        description="torch.optim optimizer: name plus keyword arguments (default SGD, lr 0.01).",
    )
    scheduler: SchedulerSpec | None = Field(
        None, description="Optional torch.optim.lr_scheduler: name plus keyword arguments."
    )
    report: ReportSpec = Field(
        default_factory=ReportSpec,
        description="What the run reports: axis titles, title, log axes, static figures, "
        "the bands' levels.",
    )
    uncertainty: UncertaintySpec = Field(
        default_factory=UncertaintySpec,
        description="Intervals beyond the covariance: profile likelihood, bootstrap or MCMC.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _variables(cls, data: Any, handler: Any) -> Any:
        # model.expr is parsed knowing data's variables (several named ones, or x alone).
        variables = _raw_variables(data.get("data"))[0] if isinstance(data, dict) else None
        token = _VARIABLES.set(variables or ONE_VARIABLE)
        try:
            return handler(data)
        finally:
            _VARIABLES.reset(token)

    @classmethod
    def _structure(cls, raw: dict) -> list[tuple[Loc, str]]:
        variables, loc = _raw_variables(raw.get("data"))
        model = raw.get("model")
        params = model.get("params") if isinstance(model, dict) else None
        problems = _group_problems(raw)
        if variables is ONE_VARIABLE or not isinstance(params, dict):
            return problems
        return problems + [
            (
                ("data", *loc),
                f"variable {name!r} is also a parameter in model.params; a name is either a "
                "variable or a parameter: rename one",
            )
            for name in dict.fromkeys(variables)
            if name in params
        ]


def _group_problems(raw: dict) -> list[tuple[Loc, str]]:
    """What grouped data (`data.columns.group`, `data.files`) and `per_group` need."""
    data, model = raw.get("data"), raw.get("model")
    data = data if isinstance(data, dict) else {}
    model = model if isinstance(model, dict) else {}
    columns = data.get("columns")
    grouped = data.get("files") is not None or (
        isinstance(columns, dict) and columns.get("group") is not None
    )
    params = model.get("params")
    per_group = [
        k
        for k, v in (params.items() if isinstance(params, dict) else ())
        if isinstance(v, dict) and v.get("per_group") is True
    ]
    problems: list[tuple[Loc, str]] = []
    if not grouped:
        problems += [
            (
                ("model", "params", k, "per_group"),
                "needs grouped data: give data.columns.group or data.files",
            )
            for k in per_group
        ]
        return problems
    if model.get("basis") is not None:
        problems.append((("model", "basis"), "grouped data need model.expr, not a basis"))
    if isinstance(raw.get("starts"), int) and raw["starts"] > 1:
        problems.append((("starts",), "grouped fits take one start (starts: 1)"))
    if raw.get("batch_size") is not None:
        problems.append((("batch_size",), "grouped fits use every point (batch_size: null)"))
    for k, v in params.items() if isinstance(params, dict) else ():
        if isinstance(v, dict) and v.get("per_group") is True and v.get("expr") is not None:
            problems.append(
                (("model", "params", k, "per_group"), "a tied parameter cannot be per group")
            )
    return problems


# Sections of the schema by key path ("*" matches any key): their model, or None where any key
# is allowed (optimizer and scheduler keyword arguments, parameter names).
_SECTIONS: dict[tuple[str, ...], type[BaseModel] | None] = {
    (): Config,
    ("data",): DataSpec,
    ("data", "x"): GridSpec,
    ("data", "x", "*"): GridSpec,
    ("data", "range"): None,
    ("data", "noise"): NoiseSpec,
    ("data", "columns"): ColumnsSpec,
    ("model",): ModelSpec,
    ("model", "params"): None,
    ("model", "params", "*"): ParamSpec,
    ("optimizer",): OptimizerSpec,
    ("scheduler",): SchedulerSpec,
    ("loss",): LossSpec,
    ("report",): ReportSpec,
    ("uncertainty",): UncertaintySpec,
}


def _section(path: Sequence[str | int]) -> tuple[bool, list[str], bool]:
    """(is a section, its schema keys, whether it also takes any other key)."""
    for pattern, model in _SECTIONS.items():
        if len(pattern) == len(path) and all(
            p in ("*", k) for p, k in zip(pattern, path, strict=True)
        ):
            if pattern and pattern[-1] == "*" and _is_field(tuple(path[:-1]), path[-1]):
                continue  # `data.x.start` is the one grid's key, not a variable named start
            if model is None:
                return True, [], True
            return True, list(model.model_fields), model.model_config.get("extra") == "allow"
    return False, [], False


def _is_field(parent: tuple[str | int, ...], key: str | int) -> bool:
    """Whether `key` is a declared field of the section at `parent` (not a wildcard's key)."""
    model = _SECTIONS.get(tuple(str(p) for p in parent))
    return model is not None and key in model.model_fields


def config_to_dict(cfg: Config) -> dict:
    """Plain data (JSON- and YAML-able) in schema order; every top-level key is present."""
    out = cfg.model_dump(mode="json")
    out["data"] = cfg.data.model_dump(mode="json", exclude_none=True)
    out["model"] = cfg.model.model_dump(mode="json", exclude_none=True)
    out["report"] = cfg.report.model_dump(mode="json", exclude_none=True)
    return out


def json_schema() -> dict:
    """JSON Schema of the config file, for editor completion and validation."""
    schema = Config.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "fitcli experiment config",
    }
