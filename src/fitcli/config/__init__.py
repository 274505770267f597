"""The experiment config: read, override and validate a YAML file into a `Config`.

Every problem in a config is collected and reported at once in one `ConfigError`, each naming its
key path, the bad value, what would be valid and, when known, its line in the file. This package
imports neither torch nor rich: `fitcli check` must answer instantly.

`yaml_safe` reads the file, `schema` declares the keys, `messages` words the problems,
`overrides` applies `key.path=value`; `load_config` and `config_from_dict` put them together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fitcli.config.messages import _validate, _Where
from fitcli.config.overrides import _apply, apply_overrides, apply_values, override_keys
from fitcli.config.schema import (
    ColumnsSpec,
    Config,
    DataSpec,
    GridSpec,
    ModelSpec,
    NoiseSpec,
    OptimizerSpec,
    ParamSpec,
    SchedulerSpec,
    UncertaintySpec,
    config_to_dict,
    json_schema,
)
from fitcli.config.yaml_safe import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    Loc,
    _load,
    dump_yaml,
    load_yaml,
    read_config_text,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "ColumnsSpec",
    "Config",
    "DataSpec",
    "GridSpec",
    "ModelSpec",
    "NoiseSpec",
    "OptimizerSpec",
    "ParamSpec",
    "SchedulerSpec",
    "UncertaintySpec",
    "apply_overrides",
    "apply_values",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "json_schema",
    "load_config",
    "load_yaml",
    "override_keys",
    "read_config_text",
]


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
