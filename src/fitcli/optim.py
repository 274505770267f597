"""torch.optim optimizers and lr schedulers by name, with their keyword arguments checked."""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fitcli.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fitcli.config import Config, OptimizerSpec, SchedulerSpec

LM_NAMES = ("LevenbergMarquardt", "LM")
# Scheduler arguments fitcli supplies itself; a config must not set them.
_SUPPLIED = {"optimizer", "self", "params"}


def _classes(module, base) -> dict[str, type]:
    out = {}
    for name in dir(module):
        obj = getattr(module, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, base)
            and obj is not base
            and not name.startswith("_")
        ):
            out[name] = obj
    return out


def optimizer_classes() -> dict[str, type]:
    """Every torch.optim optimizer by class name."""
    import torch

    return _classes(torch.optim, torch.optim.Optimizer)


def scheduler_classes() -> dict[str, type]:
    """Every torch.optim.lr_scheduler scheduler by class name (chaining schedulers excluded)."""
    import torch

    sched = torch.optim.lr_scheduler
    base = getattr(sched, "LRScheduler", None) or sched._LRScheduler
    classes = _classes(sched, base)
    classes["ReduceLROnPlateau"] = sched.ReduceLROnPlateau
    # These take other schedulers as arguments, which a YAML config cannot express.
    for name in ("SequentialLR", "ChainedScheduler", "LambdaLR", "MultiplicativeLR", "LRScheduler"):
        classes.pop(name, None)
    return classes


def _lookup(
    name: Any, classes: dict[str, type], key: str, also: tuple[str, ...] = ()
) -> tuple[str, type]:
    """The class named `name` (any case); else a ConfigError suggesting the nearest of `classes`
    and `also` (names handled before the lookup, such as LM_NAMES)."""
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: must be a class name (got {name!r})")
    if name in classes:
        return name, classes[name]
    folded = {k.lower(): k for k in classes}
    if name.lower() in folded:
        real = folded[name.lower()]
        return real, classes[real]
    valid = sorted([*classes, *also])
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}.name: unknown {key} {name!r}{hint} (valid: {', '.join(valid)})")


def _check_kwargs(cls: type[Any], kwargs: dict, key: str, supplied: set[str]) -> list[str]:
    sig = inspect.signature(cls.__init__)
    accepted = [
        p
        for p in sig.parameters
        if p not in supplied
        and sig.parameters[p].kind
        not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    problems = []
    for k in kwargs:
        if k not in accepted:
            close = difflib.get_close_matches(k, accepted, n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"{key}.{k}: {cls.__name__} takes no argument {k!r};{hint} it takes: "
                + ", ".join(accepted)
            )
    required = [
        p
        for p, v in sig.parameters.items()
        if p not in supplied
        and v.default is inspect.Parameter.empty
        and v.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    for r in required:
        if r not in kwargs:
            problems.append(f"{key}.{r}: {cls.__name__} needs {r!r}; add it under {key}")
    for k, value in kwargs.items():
        if k in accepted and not _accepts(sig.parameters[k].annotation, value):
            text = _annotation_text(sig.parameters[k].annotation)
            problems.append(f"{key}.{k}: {cls.__name__} expects {text} (got {value!r})")
    return problems


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether `value` fits a constructor's type annotation. torch checks many arguments only
    when it first uses them, mid-run (a scheduler's gamma); what this cannot read passes."""
    if annotation is inspect.Parameter.empty:
        return True
    text, parts, depth, start = _annotation_text(annotation), [], 0, 0
    for i, ch in enumerate(text):  # split a union at its top level
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    fits = [_fits(part.strip(), value) for part in parts]
    return None in fits or any(fits)


def _fits(part: str, value: Any) -> bool | None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if part in ("float", "torch.Tensor", "Tensor"):
        return number
    if part == "int":
        return number and float(value).is_integer()
    if part == "bool":
        return isinstance(value, bool)
    if part == "str":
        return isinstance(value, str)
    if part in ("None", "NoneType"):
        return value is None
    if part.startswith(("list[", "tuple[", "Iterable[", "Sequence[")):
        return isinstance(value, list)
    if part.startswith("Optional["):
        return value is None or _fits(part[9:-1], value)
    if part.startswith("Literal["):
        return value in re.findall(r"'([^']*)'", part)
    return None  # not understood: torch decides


def trial_step(cfg: Config) -> list[str]:
    """Build the optimizer and scheduler on a throwaway parameter and take one step of each, so
    that arguments torch checks only when stepping (LBFGS's line_search_fn, lr 0 in its line
    search, a scheduler's step_size) are invalid input now instead of a crash mid-run."""
    from fitcli.torchboot import import_torch

    # A step imports torch._dynamo; the deferred stand-in saves every caller that second.
    torch = import_torch()

    # Small gradients (sum below 1) take LBFGS down its Python-float step-size path.
    p = torch.full((2,), 0.1, dtype=torch.float64, requires_grad=True)
    opt = build_optimizer(cfg.optimizer, [p])
    sched = build_scheduler(cfg.scheduler, opt)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps: list[tuple[str, object, Callable[[], object]]] = [
            ("optimizer", opt, lambda: opt.step(closure))
        ]
        if sched is not None:
            steps.append(("scheduler", sched, functools.partial(_first_step, sched)))
        for key, obj, step in steps:
            try:
                step()
            except Exception as exc:  # whatever it is, these arguments cause it
                return [
                    f"{key}: {type(obj).__name__} fails on its first step with these "
                    f"arguments: {type(exc).__name__}: {exc}"
                ]
    return []


def _first_step(sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of `sched`; ReduceLROnPlateau steps on a metric."""
    import torch

    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(1.0)
    else:
        sched.step()


def split_spec(spec: OptimizerSpec | SchedulerSpec | Mapping[str, Any]) -> tuple[str, dict]:
    """(name, kwargs) from an optimizer/scheduler config section."""
    data = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
    name = data.pop("name")
    return name, data


def is_lm(name: str) -> bool:
    return isinstance(name, str) and name.lower() in {n.lower() for n in LM_NAMES}


def validate(cfg: Config) -> list[str]:
    """Problems with the optimizer, scheduler and loss choice (imports torch)."""
    problems: list[str] = []
    name, kwargs = split_spec(cfg.optimizer)
    if is_lm(name):
        from fitcli import lm_optim

        problems += lm_optim.validate(cfg, kwargs)
    else:
        try:
            _, cls = _lookup(name, optimizer_classes(), "optimizer", LM_NAMES)
            problems += _check_kwargs(cls, kwargs, "optimizer", {"self", "params"})
        except ConfigError as exc:
            problems += exc.problems
    if cfg.scheduler is not None:
        sname, skw = split_spec(cfg.scheduler)
        try:
            _, scls = _lookup(sname, scheduler_classes(), "scheduler")
            problems += _check_kwargs(scls, skw, "scheduler", _SUPPLIED)
        except ConfigError as exc:
            problems += exc.problems
    if not problems and not is_lm(name):
        try:
            problems += trial_step(cfg)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def build_optimizer(spec: OptimizerSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """A torch optimizer over `params` from an `optimizer` config section."""
    name, kwargs = split_spec(spec)
    _, cls = _lookup(name, optimizer_classes(), "optimizer")
    problems = _check_kwargs(cls, kwargs, "optimizer", {"self", "params"})
    if problems:
        raise ConfigError(problems)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer: {cls.__name__} rejected its arguments: {exc}") from None


def build_scheduler(
    spec: SchedulerSpec | None, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A torch lr scheduler from a `scheduler` config section, or None."""
    if spec is None:
        return None
    name, kwargs = split_spec(spec)
    _, cls = _lookup(name, scheduler_classes(), "scheduler")
    problems = _check_kwargs(cls, kwargs, "scheduler", _SUPPLIED)
    if problems:
        raise ConfigError(problems)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"scheduler: {cls.__name__} rejected its arguments: {exc}") from None
