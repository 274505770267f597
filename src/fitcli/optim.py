"""torch.optim optimizers and lr schedulers by name, with their keyword arguments checked."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from fitcli.errors import ConfigError

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


def _lookup(name: Any, classes: dict[str, type], key: str) -> tuple[str, type]:
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: must be a class name (got {name!r})")
    if name in classes:
        return name, classes[name]
    folded = {k.lower(): k for k in classes}
    if name.lower() in folded:
        real = folded[name.lower()]
        return real, classes[real]
    valid = sorted(classes)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}.name: unknown {key} {name!r}{hint} (valid: {', '.join(valid)})")


def _check_kwargs(cls: type, kwargs: dict, key: str, supplied: set[str]) -> list[str]:
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
    return problems


def split_spec(spec: Any) -> tuple[str, dict]:
    """(name, kwargs) from an optimizer/scheduler config section."""
    data = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
    name = data.pop("name")
    return name, data


def is_lm(name: str) -> bool:
    return isinstance(name, str) and name.lower() in {n.lower() for n in LM_NAMES}


def validate(cfg) -> list[str]:
    """Problems with the optimizer, scheduler and loss choice (imports torch)."""
    problems: list[str] = []
    name, kwargs = split_spec(cfg.optimizer)
    if is_lm(name):
        from fitcli import lm_optim

        problems += lm_optim.validate(cfg, kwargs)
    else:
        try:
            _, cls = _lookup(name, optimizer_classes(), "optimizer")
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
    return problems


def build_optimizer(spec, params) -> Any:
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


def build_scheduler(spec, optimizer) -> Any:
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
