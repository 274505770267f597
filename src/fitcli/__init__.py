"""fitcli: fit curves with PyTorch autograd from a YAML experiment, or from Python.

The Python API (`fitcli.api`): `fitcli.fit(...)` -> `FitResult`, `fitcli.load(run_dir)`,
`fitcli.sweep(config, axes={...})` -> `SweepResult`; errors are `fitcli.errors`' classes
(`fitcli.ConfigError`, `fitcli.DataError`, ...). Importing fitcli is cheap: torch is imported
on the first fit, not here (the names below are loaded when first used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fitcli.errors import (
    ConfigError,
    DataError,
    DeviceError,
    ExpressionError,
    FitcliError,
    InputError,
    NotRunDirError,
    ResumeError,
    RunDirError,
    RunFileError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fitcli.api import FitResult, SweepResult, fit, load

_API = ("FitResult", "SweepResult", "fit", "load")

__all__ = [
    "ConfigError",
    "DataError",
    "DeviceError",
    "ExpressionError",
    "FitResult",
    "FitcliError",
    "InputError",
    "NotRunDirError",
    "ResumeError",
    "RunDirError",
    "RunFileError",
    "SweepResult",
    "__version__",
    "fit",
    "load",
    "sweep",
]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (`import fitcli` stays free of torch)."""
    import importlib

    if name in _API:
        return getattr(importlib.import_module("fitcli.api"), name)
    if name == "sweep":  # the package fitcli.sweep, which called is `fitcli.api.sweep`
        return importlib.import_module("fitcli.sweep")
    raise AttributeError(f"module 'fitcli' has no attribute {name!r}")
