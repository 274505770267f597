"""The experiment config: read, override and validate a YAML file into a `Config`."""

from fitcli.config.schema import (
    Config,
    ParamSpec,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    json_schema,
    load_config,
    load_yaml,
    override_keys,
    read_config_text,
)

__all__ = [
    "Config",
    "ParamSpec",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "json_schema",
    "load_config",
    "load_yaml",
    "override_keys",
    "read_config_text",
]
