"""Config loading, validation messages, overrides and the YAML round trip."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fitcli.config import (
    Config,
    ParamSpec,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    json_schema,
    load_config,
    load_yaml,
    read_config_text,
)
from fitcli.errors import ConfigError, ExitCode
from fitcli.losses import LIKELIHOODS, ROBUST

GOOD = """\
name: seed-sine
seed: 0
epochs: 500
data:
  target: "1.5*sin(x) + 1.2*cos(x/4)"
  x: {start: -10, stop: 10, num: 1000}
  noise: {std: 1.0}
model:
  basis: ["x", "sin(x)", "cos(x/4)"]
optimizer:
  name: SGD
  lr: 0.01
"""


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    assert info.value.exit_code == ExitCode.INVALID_INPUT
    return info.value.problems


def base() -> dict:
    return load_yaml(GOOD, "GOOD")


# ------------------------------------------------------------------ loading a good config


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.name == "seed-sine"
    assert (cfg.device, cfg.dtype, cfg.loss, cfg.snapshots) == ("auto", "float64", "mse", 10)
    assert cfg.batch_size is None and cfg.scheduler is None
    assert cfg.data.x.num == 1000 and cfg.data.x.start == -10.0
    assert cfg.model.basis == ["x", "sin(x)", "cos(x/4)"]
    assert cfg.optimizer.name == "SGD" and cfg.optimizer.model_extra == {"lr": 0.01}


def test_minimal_config_gets_documented_defaults():
    cfg = config_from_dict(
        {
            "data": {"target": "sin(x)", "x": {"start": 0, "stop": 1, "num": 2}},
            "model": {"basis": ["x"]},
        }
    )
    assert (cfg.name, cfg.seed, cfg.epochs) == ("experiment", 0, 500)
    assert cfg.optimizer.model_dump() == {"name": "SGD", "lr": 0.01}
    assert cfg.data.noise.std == 0.0
    assert cfg.loss == "mse" and cfg.scheduler is None


def test_data_file_resolves_relative_to_the_config(tmp_path):
    sub = tmp_path / "exp"
    sub.mkdir()
    text = "data:\n  file: m.csv\n  columns: {x: time, y: 1}\nmodel: {basis: [x]}\n"
    cfg = load_config(write(sub, text))
    assert cfg.data.file == str(sub / "m.csv")
    assert os.path.isabs(cfg.data.file)
    assert cfg.data.columns.x == "time" and cfg.data.columns.y == 1
    assert cfg.data.columns.sigma is None and cfg.data.noise is None


def test_expr_params_fill_in_defaults_in_expression_order():
    raw = base()
    raw["model"] = {
        "expr": "a*sin(b*x) + c",
        "params": {"c": {"value": 0.0, "vary": False}, "b": {"value": 0.5, "min": 0, "max": 10}},
    }
    cfg = config_from_dict(raw)
    assert list(cfg.model.params) == ["a", "b", "c"]
    assert cfg.model.params["a"] == ParamSpec()
    assert cfg.model.params["b"] == ParamSpec(value=0.5, min=0.0, max=10.0)
    assert cfg.model.params["c"].vary is False


def test_number_is_shorthand_for_param_value():
    raw = base()
    raw["model"] = {"expr": "a*x", "params": {"a": 2}}
    assert config_from_dict(raw).model.params["a"] == ParamSpec(value=2.0)


def test_integral_float_counts_as_int_and_numbers_as_expressions(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            GOOD.replace("epochs: 500", "epochs: 1e4").replace(
                '["x", "sin(x)", "cos(x/4)"]', "[1, x]"
            ),
        )
    )
    assert cfg.epochs == 10000 and isinstance(cfg.epochs, int)
    assert cfg.model.basis == ["1", "x"]


# ------------------------------------------------------------------ YAML loading


def test_yaml_12_floats():
    got = load_yaml("a: [1e-3, 1E5, -2.5e-10, .5, 2.5e3, +1e2, 7, '1e-3', 1e5x]", "s")
    assert got == {"a": [0.001, 100000.0, -2.5e-10, 0.5, 2500.0, 100.0, 7, "1e-3", "1e5x"]}
    assert isinstance(got["a"][6], int)


def test_dates_stay_text():
    assert load_yaml("name: 2024-05-01", "s") == {"name": "2024-05-01"}


def test_duplicate_keys_name_the_key_and_both_lines():
    with pytest.raises(ConfigError) as info:
        load_yaml("seed: 1\ndata:\n  file: a\n  file: b\nseed: 2\n", "c.yaml")
    assert info.value.problems == [
        "duplicate key 'data.file' on lines 3 and 4; give each key once",
        "duplicate key 'seed' on lines 1 and 5; give each key once",
    ]
    assert str(info.value).startswith("invalid config c.yaml (2 problems)")


def test_keys_must_be_text():
    with pytest.raises(ConfigError) as info:
        load_yaml("1: x\non: y\n", "s")
    assert info.value.problems == [
        "key '1' (line 1) is not text; keys must be text (put it in quotes)",
        "key 'on' (line 2) is not text; keys must be text (put it in quotes)",
    ]


def test_syntax_error_has_line_and_column():
    with pytest.raises(ConfigError) as info:
        load_yaml("name: x\nseed: a: b\n", "c.yaml")
    assert str(info.value) == (
        "invalid config c.yaml: YAML syntax error at line 2, column 8: "
        "mapping values are not allowed here"
    )


def test_unsafe_tags_are_refused():
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_yaml("x: !!python/object/apply:os.system [echo hi]", "s")


def test_control_character_is_refused():
    with pytest.raises(ConfigError) as info:
        load_yaml("a: 1\nb: \x01\n", "s")
    assert info.value.problems == [
        "character U+0001 at line 2, column 4 is not allowed in YAML "
        "(control characters cannot appear in a config)"
    ]


def test_billion_laughs_is_refused_fast():
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_yaml("\n".join(lines), "bomb.yaml")
    assert time.perf_counter() - start < 1.0


def test_few_aliases_are_fine():
    assert load_yaml("a: &v [1, 2]\nb: *v\n", "s") == {"a": [1, 2], "b": [1, 2]}


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="an alias refers to itself"):
        load_yaml("a: &a [*a]", "s")


def test_deep_nesting_is_refused():
    with pytest.raises(ConfigError, match="nesting deeper than 50 levels"):
        load_yaml("[" * 100_000 + "]" * 100_000, "s")
    assert load_yaml("[" * 40 + "]" * 40, "s") is not None


def test_empty_file(tmp_path):
    assert problems_of(tmp_path, "# only a comment\n") == [
        "the file is empty; a config is a mapping of keys such as name, data and model"
    ]


def test_list_at_top_level(tmp_path):
    assert problems_of(tmp_path, "- a\n- b\n") == [
        "the top level must be a mapping of keys such as name, data and model, not a list"
    ]
    assert problems_of(tmp_path, "42\n") == [
        "the top level must be a mapping of keys such as name, data and model, "
        "not a single value (42)"
    ]


def test_binary_file(tmp_path):
    path = write(tmp_path, b"name: x\n\xff\xfe\x00\x01", "c.bin")
    with pytest.raises(ConfigError) as info:
        read_config_text(path)
    assert str(info.value) == (
        f"invalid config {path}: not a UTF-8 text file "
        "(byte 0xff at byte offset 8 is not valid UTF-8)"
    )


def test_nul_byte(tmp_path):
    path = write(tmp_path, b"name: x\x00\n")
    with pytest.raises(ConfigError, match=r"not a text file \(NUL byte at byte offset 7\)"):
        read_config_text(path)


def test_directory_as_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"invalid config {tmp_path}: is a directory, not a config file"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"invalid config {path}: no such file"


def test_file_size_cap(tmp_path):
    path = write(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        read_config_text(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path, "\ufeff" + GOOD)
    assert load_config(path).name == "seed-sine"


# ------------------------------------------------------------------ validation messages


def test_unknown_key_did_you_mean_with_line(tmp_path):
    text = GOOD.replace("epochs: 500", "epoch: 500")
    assert problems_of(tmp_path, text) == ["unknown key 'epoch'; did you mean 'epochs'? (line 3)"]


def test_unknown_nested_key_and_no_close_match(tmp_path):
    text = GOOD.replace("  noise: {std: 1.0}", "  nosie: {std: 1.0}\n  zzz: 1")
    assert problems_of(tmp_path, text) == [
        "data: unknown key 'nosie'; did you mean 'noise'? (line 7)",
        "data: unknown key 'zzz'; valid keys are target, x, noise, file, files, columns, "
        "nan_policy, range, absolute_sigma (line 8)",
    ]


def test_every_problem_is_reported_at_once(tmp_path):
    text = """\
name: x
epochs: abc
seed: -1
data:
  target: "sin(x)"
  x: {start: 0, stop: 1, num: 1}
model:
  basis: [x, "sin(x"]
  init: [1.0]
loss: mae
device: gpu
dtype: float16
"""
    probs = problems_of(tmp_path, text)
    assert probs[:4] == [
        "epochs: must be an integer (got 'abc') (line 2)",
        "seed: must be >= 0 (got -1) (line 3)",
        "data.x.num: must be >= 2 (got 1) (line 6)",
        "model.basis[1]: syntax error: '(' was never closed in expression 'sin(x' at column 4"
        " (line 8)\n    sin(x\n       ^",
    ]
    assert probs[4:] == [
        "model.init: has 1 values but basis has 2 functions; give one initial coefficient per"
        " basis function (line 9)",
        "loss: must be one of mse, l1, huber, smooth_l1, poisson, bce, student_t, cauchy,"
        " soft_l1, arctan (got 'mae'); did you mean 'mse'? (line 10)",
        "device: must be auto, cpu, cuda or cuda:N (N a GPU index) (got 'gpu') (line 11)",
        "dtype: must be one of float32, float64 (got 'float16'); did you mean 'float64'? (line 12)",
    ]
    assert all("Input should" not in p and "http" not in p for p in probs)


def test_expression_errors_land_on_their_key(tmp_path):
    text = GOOD.replace('"1.5*sin(x) + 1.2*cos(x/4)"', '"sin(y)"').replace('"sin(x)"', '"sin(a*x)"')
    probs = problems_of(tmp_path, text)
    assert len(probs) == 2
    assert probs[0].startswith("data.target: unknown name 'y'")
    assert "(line 5)" in probs[0].splitlines()[0]
    assert probs[1].startswith("model.basis[1]: unknown name 'a'")


def test_param_not_in_expression():
    raw = base()
    raw["model"] = {"expr": "a*sin(b*x) + c", "params": {"q": 1.0}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.problems == [
        "model.params.q: 'q' does not appear in model.expr; its parameters are a, b, c"
    ]


def test_expression_without_parameters():
    raw = base()
    raw["model"] = {"expr": "sin(x)"}
    with pytest.raises(ConfigError, match="model.expr: has no parameters to fit"):
        config_from_dict(raw)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"value": 5, "min": 0, "max": 1},
            "model.params.a.value: 5.0 is outside the bounds [0.0, 1.0]",
        ),
        (
            {"value": 0, "min": 0, "max": 1},
            "model.params.a.value: 0.0 lies on a bound of [0.0, 1.0]; "
            "start strictly inside the bounds",
        ),
        (
            {"value": 1, "max": 1},
            "model.params.a.value: 1.0 lies on a bound of [-inf, 1.0]; "
            "start strictly inside the bounds",
        ),
        (
            {"value": 0.5, "min": 1, "max": 0},
            "model.params.a.max: must be greater than min (1.0) (got 0.0)",
        ),
        ({"value": "big"}, "model.params.a.value: must be a number or guess (got 'big')"),
        ({"valu": 1}, "model.params.a: unknown key 'valu'; did you mean 'value'?"),
    ],
)
def test_param_bounds(spec, message):
    raw = base()
    raw["model"] = {"expr": "a*x", "params": {"a": spec}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.problems == [message]


def test_model_shape_messages():
    raw = base()
    for model, message in [
        ({"basis": []}, "model.basis: must have at least 1 entry (got none)"),
        ({"basis": "x"}, "model.basis: must be a list (got 'x')"),
        ({"basis": ["x"] * 101}, "model.basis: must have at most 100 entries (got 101)"),
        (
            {"expr": "a*x", "params": {"a": "z"}},
            "model.params.a: must be a number (the start value) or a mapping of value, min, "
            "max, vary (got 'z')",
        ),
        (
            {"expr": "sin(x)", "params": {"a": 1}},
            "model.params.a: 'a' does not appear in model.expr; it has no parameters",
        ),
        ({"expr": "a*x", "init": [1]}, "model.init: only allowed with basis; use params with expr"),
    ]:
        raw["model"] = model
        with pytest.raises(ConfigError) as info:
            config_from_dict(raw)
        assert info.value.problems[-1] == message


def test_fixed_param_may_sit_on_a_bound():
    raw = base()
    raw["model"] = {"expr": "a*x", "params": {"a": {"value": 0, "min": 0, "vary": False}}}
    assert config_from_dict(raw).model.params["a"].vary is False


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_refused(tmp_path, value):
    text = GOOD.replace("std: 1.0", f"std: {value}").replace("lr: 0.01", f"lr: {value}")
    got = "nan" if value == ".nan" else value.replace(".", "")
    assert problems_of(tmp_path, text) == [
        f"data.noise.std: must be a finite number (got {got}) (line 7)",
        f"optimizer.lr: must be a finite number, text, true/false, null or a list of those "
        f"(got {got}) (line 12)",
    ]


def test_grid_order_and_source_exclusivity():
    raw = base()
    raw["data"] = {"target": "sin(x)", "file": "m.csv", "x": {"start": 1, "stop": 1, "num": 3}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.problems == [
        "data.x.stop: must be greater than start (1.0) (got 1.0)",
        "data: give either target or file, not both",
    ]


def test_synthetic_and_file_keys_do_not_mix():
    raw = base()
    raw["data"] = {"file": "m.csv", "noise": {"std": 1}}
    raw["model"] = {"basis": ["x"], "params": {"a": 1}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.problems == [
        "data.noise: only allowed with target, not with file",
        "model.params: only allowed with expr, not with basis",
    ]


def test_missing_sections():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x"})
    assert info.value.problems == [
        "data: required key is missing",
        "model: required key is missing",
    ]
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"target": "x"}, "model": {}})
    assert info.value.problems == [
        "data.x: required with target, e.g. x: {start: -10, stop: 10, num: 1000}",
        "model: give either basis (linear model) or expr (expression model)",
    ]


def test_strict_types():
    for key, value, message in [
        ("seed", "3", "seed: must be an integer (got '3')"),
        ("epochs", 2.5, "epochs: must be an integer (got 2.5)"),
        ("epochs", True, "epochs: must be an integer (got true)"),
        ("epochs", 10**9 + 1, "epochs: must be <= 1000000000 (got 1000000001)"),
        ("snapshots", 1001, "snapshots: must be <= 1000 (got 1001)"),
        ("batch_size", 0, "batch_size: must be >= 1 (got 0)"),
        ("name", "", "name: must not be empty"),
        (
            "name",
            "a\nb",
            "name: must be a single line of text without control characters ('a\\nb')",
        ),
        ("data", [1], "data: must be a mapping of keys (got [1])"),
        (
            "optimizer",
            {"name": "torch.optim.SGD"},
            "optimizer.name: must be a Python class name such as Adam or StepLR "
            "(got 'torch.optim.SGD')",
        ),
        (
            "optimizer",
            {"lr": {"a": 1}},
            "optimizer.lr: must be a finite number, text, true/false, null or a list of those "
            "(got {'a': 1})",
        ),
        ("scheduler", {"step_size": 3}, "scheduler.name: required key is missing"),
    ]:
        raw = base()
        raw[key] = value
        with pytest.raises(ConfigError) as info:
            config_from_dict(raw)
        assert info.value.problems == [message], key


def test_ints_are_accepted_for_floats_and_devices():
    raw = base()
    raw["data"]["noise"] = {"std": 2}
    for device in ("auto", "cpu", "cuda", "cuda:3"):
        raw["device"] = device
        cfg = config_from_dict(raw)
        assert cfg.device == device and cfg.data.noise.std == 2.0


# ------------------------------------------------------------------ overrides


def test_override_values_are_yaml_scalars():
    raw = apply_overrides(
        base(),
        [
            "optimizer.lr=1e-3",
            "model.basis=[x, sin(x)]",
            "data.target=sin(x)",
            "scheduler=null",
            "epochs=7",
            "data.noise={std: 2}",
            "name=a=b",
        ],
    )
    assert raw["optimizer"]["lr"] == 0.001
    assert raw["model"]["basis"] == ["x", "sin(x)"]
    assert raw["data"]["target"] == "sin(x)"
    assert raw["scheduler"] is None and raw["epochs"] == 7 and raw["name"] == "a=b"
    assert raw["data"]["noise"] == {"std": 2}
    cfg = config_from_dict(raw)
    assert cfg.optimizer.model_extra["lr"] == 0.001


def test_overrides_return_a_new_dict():
    raw = base()
    apply_overrides(raw, ["optimizer.lr=1", "data.x.num=5"])
    assert raw == base()


def test_override_creates_a_null_or_absent_section():
    raw = base()
    raw["scheduler"] = None
    out = apply_overrides(raw, ["scheduler.name=StepLR", "scheduler.step_size=100"])
    assert out["scheduler"] == {"name": "StepLR", "step_size": 100}
    del raw["scheduler"]
    assert apply_overrides(raw, ["scheduler.name=StepLR"])["scheduler"] == {"name": "StepLR"}
    cfg = config_from_dict(apply_overrides(raw, ["scheduler.name=StepLR", "scheduler.gamma=.5"]))
    assert cfg.scheduler.name == "StepLR" and cfg.scheduler.model_extra == {"gamma": 0.5}


def test_override_param_shorthand_becomes_a_spec():
    raw = base()
    raw["model"] = {"expr": "a*x", "params": {"a": 2.0}}
    out = apply_overrides(raw, ["model.params.a.min=0", "model.params.b.value=3"])
    assert out["model"]["params"] == {"a": {"value": 2.0, "min": 0}, "b": {"value": 3}}


def test_override_errors_are_all_reported():
    with pytest.raises(ConfigError) as info:
        apply_overrides(
            base(),
            [
                "epoch=3",
                "data.nosie.std=2",
                "optimizr.lr=1",
                "lr",
                "seed.x=1",
                "model.params.a.valu=1",
                "x=[1",
            ],
        )
    assert info.value.problems[:6] == [
        "override 'epoch=3': unknown key 'epoch'; did you mean 'epochs'?",
        "override 'data.nosie.std=2': unknown key 'data.nosie'; did you mean 'data.noise'?",
        "override 'optimizr.lr=1': unknown key 'optimizr'; did you mean 'optimizer'?",
        "override 'lr' is not key.path=value (for example optimizer.lr=1e-3)",
        "override 'seed.x=1': 'seed' is a single value, not a section with keys",
        "override 'model.params.a.valu=1': unknown key 'model.params.a.valu'; "
        "did you mean 'model.params.a.value'?",
    ]
    assert info.value.problems[6].startswith("override 'x=[1': YAML syntax error at line 1")


def test_override_suggests_keys_present_in_the_file():
    raw = base()
    raw["custom_thing"] = 1
    with pytest.raises(ConfigError, match="did you mean 'custom_thing'"):
        apply_overrides(raw, ["custom_thin=2"])


def test_override_problems_name_the_override(tmp_path):
    probs = problems_of(tmp_path, GOOD, ("data.x.num=1", "optimizer.lr=.nan"))
    assert probs == [
        "data.x.num: must be >= 2 (got 1) (set by override 'data.x.num=1')",
        "optimizer.lr: must be a finite number, text, true/false, null or a list of those "
        "(got nan) (set by override 'optimizer.lr=.nan')",
    ]


def test_load_config_applies_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["epochs=9", "optimizer.name=Adam"])
    assert cfg.epochs == 9 and cfg.optimizer.name == "Adam"


# ------------------------------------------------------------------ round trip and schema


def test_dump_keeps_schema_order_and_null_scheduler():
    cfg = config_from_dict(base())
    d = config_to_dict(cfg)
    assert list(d) == list(Config.model_fields)
    assert d["scheduler"] is None and d["batch_size"] is None
    text = dump_yaml(d)
    assert "scheduler: null" in text and "{" not in text
    assert config_from_dict(load_yaml(text, "dump")) == cfg


def test_dump_quotes_strings_that_look_like_numbers():
    raw = base()
    raw["name"] = "1e5"
    text = dump_yaml(config_to_dict(config_from_dict(raw)))
    assert load_yaml(text, "dump")["name"] == "1e5"


def test_json_schema_describes_every_field():
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "fitcli experiment config"
    json.dumps(schema)
    sections = [schema, *schema["$defs"].values()]
    for section in sections:
        for name, prop in section.get("properties", {}).items():
            assert prop.get("description"), name
    name, mapping = schema["properties"]["loss"]["anyOf"]
    assert name["enum"] == ["mse", "l1", "huber", "smooth_l1", *LIKELIHOODS, *ROBUST]
    assert mapping == {"$ref": "#/$defs/LossSpec"}
    assert list(schema["$defs"]["LossSpec"]["properties"]) == ["name", "f_scale", "nu"]


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fitcli.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
plain_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    min_size=1,
    max_size=20,
)
ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    finite,
    plain_text,
    st.lists(finite, max_size=3),
)


@st.composite
def grids(draw):
    a, b = draw(finite), draw(finite)
    assume(a != b)
    return {"start": min(a, b), "stop": max(a, b), "num": draw(st.integers(2, 10**8))}


@st.composite
def param_specs(draw):
    kind = draw(st.integers(0, 2))
    value = draw(finite)
    if kind == 0:
        return value
    if kind == 1:
        return {"value": value, "vary": draw(st.booleans())}
    lo, hi = draw(finite), draw(finite)
    lo, hi = min(lo, hi), max(lo, hi)
    assume(lo < value < hi)
    return {"value": value, "min": lo, "max": hi}


columns = st.one_of(st.none(), plain_text, st.integers(0, 50))
data = st.one_of(
    st.fixed_dictionaries(
        {
            "target": st.sampled_from(["sin(x)", "1.5*sin(x) + 1.2*cos(x/4)", "x**2", "3"]),
            "x": grids(),
        },
        optional={"noise": st.fixed_dictionaries({}, optional={"std": finite.map(abs)})},
    ),
    st.fixed_dictionaries(
        {"file": plain_text},
        optional={
            "columns": st.fixed_dictionaries(
                {}, optional={"x": columns, "y": columns, "sigma": columns}
            )
        },
    ),
)


@st.composite
def models(draw):
    if draw(st.booleans()):
        basis = draw(
            st.lists(
                st.sampled_from(["x", "sin(x)", "cos(x/4)", "1", "exp(-x)"]), min_size=1, max_size=5
            )
        )
        out = {"basis": basis}
        if draw(st.booleans()):
            out["init"] = draw(st.lists(finite, min_size=len(basis), max_size=len(basis)))
        return out
    expr = draw(st.sampled_from(["a*sin(b*x) + c", "a*x + b", "amp*exp(-k*x)"]))
    names = {"a*sin(b*x) + c": "abc", "a*x + b": "ab", "amp*exp(-k*x)": ["amp", "k"]}[expr]
    chosen = draw(st.lists(st.sampled_from(list(names)), unique=True))
    return {"expr": expr, "params": {n: draw(param_specs()) for n in chosen}}


configs = st.fixed_dictionaries(
    {"data": data, "model": models()},
    optional={
        "name": plain_text,
        "seed": st.integers(0, 2**63 - 1),
        "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:12"]),
        "dtype": st.sampled_from(["float32", "float64"]),
        "epochs": st.integers(1, 10**9),
        "snapshots": st.integers(1, 1000),
        "batch_size": st.one_of(st.none(), st.integers(1, 10**9)),
        "loss": st.one_of(
            st.sampled_from(["mse", "l1", "huber", "smooth_l1", "poisson", "bce", *ROBUST]),
            st.builds(
                lambda name, c: {"name": name, "f_scale": c},
                st.sampled_from([*ROBUST, "student_t"]),
                st.floats(1e-6, 1e6),
            ).map(lambda d: {**d, "nu": 4.0} if d["name"] == "student_t" else d),
        ),
        "optimizer": st.builds(
            lambda name, kw: {"name": name, **kw},
            st.sampled_from(["SGD", "Adam", "LBFGS"]),
            st.dictionaries(ident.filter(lambda k: k != "name"), plain, max_size=4),
        ),
        "scheduler": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"name": st.just("StepLR"), "step_size": st.integers(1, 1000), "gamma": finite}
            ),
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_round_trip_through_yaml(raw):
    cfg = config_from_dict(raw)
    d = config_to_dict(cfg)
    json.dumps(d, allow_nan=False)
    text = dump_yaml(d)
    again = config_from_dict(load_yaml(text, "dump"))
    assert again == cfg
    assert config_to_dict(again) == d


@settings(max_examples=50, deadline=None)
@given(configs)
def test_round_trip_through_a_file(tmp_path_factory, raw):
    cfg = config_from_dict(raw)
    path = tmp_path_factory.mktemp("rt") / "c.yaml"
    path.write_text(dump_yaml(config_to_dict(cfg)), encoding="utf-8")
    again = load_config(path)
    if cfg.data.file is not None:
        assert again.data.file == os.path.normpath(
            str(path.parent / os.path.expanduser(cfg.data.file))
        )
        again = again.model_copy(
            update={"data": again.data.model_copy(update={"file": cfg.data.file})}
        )
    assert again == cfg


# -- the report section ---------------------------------------------------------------------------


def test_report_section_defaults_and_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.report.x_label, cfg.report.y_label, cfg.report.title) == (None, None, None)
    assert (cfg.report.log_x, cfg.report.log_y) == (False, False)
    text = (
        GOOD + 'report: {x_label: "time (s)", y_label: "I / a.u.", title: "Fig. 2", log_y: true}\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.report.model_dump(exclude={"formats", "levels"}) == {
        "x_label": "time (s)",
        "y_label": "I / a.u.",
        "title": "Fig. 2",
        "log_x": False,
        "log_y": True,
    }
    again = config_from_dict(load_yaml(dump_yaml(config_to_dict(cfg)), "dump"))
    assert again == cfg


def test_report_section_is_validated_strictly(tmp_path):
    text = GOOD + 'report: {x_lable: t, title: "a\\tb", y_label: "", log_x: "yes"}\n'
    problems = problems_of(tmp_path, text)
    assert "report: unknown key 'x_lable'; did you mean 'x_label'? (line 13)" in problems
    assert any(p.startswith("report.title: must be a single line of text") for p in problems)
    assert any(p.startswith("report.y_label: ") for p in problems)
    assert "report.log_x: must be true or false (got 'yes') (line 13)" in problems
    assert len(problems) == 4
    long = GOOD + f"report: {{title: {'x' * 201}}}\n"
    (problem,) = problems_of(tmp_path, long)
    assert problem.startswith("report.title: ") and "200" in problem
    (problem,) = problems_of(tmp_path, GOOD, ("report.x_labels=t",))
    assert "unknown key 'report.x_labels'; did you mean 'report.x_label'?" in problem
