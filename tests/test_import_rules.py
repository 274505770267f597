"""The import rules, checked so that breaking one fails the build:

- rich is imported only by `fitcli.console`, plotly only by `fitcli.plots`, kaleido and
  choreographer (the static figure exporter and its browser driver) only by `fitcli.export`
  (anywhere in the module, function-level imports included). `fitcli.rundir.files` finds
  plotly.min.js in plotly's package with `importlib.util.find_spec`, which does not import
  plotly.
- At import: `fitcli.cli` loads none of torch, rich, plotly or kaleido (`fitcli --help` answers
  instantly); `fitcli.export` loads no kaleido (only drawing does); `fitcli.sweep` (and its plan
  and table, once they are modules of their own) loads no torch (a Dask sweep's client stays
  torch-free); the core modules (config, expr, data, model, optim, train, stats) load neither
  rich nor plotly.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fitcli"
HEAVY = ("torch", "rich", "plotly", "kaleido", "choreographer")
# the one module that may import each
OWNER = {"rich": "console", "plotly": "plots", "kaleido": "export", "choreographer": "export"}
CORE = ("config", "expr", "data", "model", "optim", "train", "stats")

FORBIDDEN_AT_IMPORT = {
    "fitcli.cli": {"torch", "rich", "plotly", "kaleido"},
    "fitcli.export": {"plotly", "kaleido", "choreographer"},
    "fitcli.sweep": {"torch"},
    "fitcli.sweep.plan": {"torch"},
    "fitcli.sweep.table": {"torch"},
    **{f"fitcli.{m}": {"rich", "plotly"} for m in CORE},
}


def _exists(module: str) -> bool:
    parent = module.rpartition(".")[0]
    if parent != "fitcli" and importlib.util.find_spec(parent).submodule_search_locations is None:
        return False  # fitcli.sweep is still one module: no plan or table yet
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("module", sorted(FORBIDDEN_AT_IMPORT))
def test_importing_a_module_loads_only_the_heavy_packages_it_may(module):
    if not _exists(module):
        pytest.skip(f"{module} does not exist (yet)")
    code = (
        f"import sys, json, {module}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & FORBIDDEN_AT_IMPORT[module], f"import {module} loads {sorted(loaded)}"


def banned_imports(source: str, module: str) -> list[str]:
    """`line: what` for each import of rich or plotly in `module` (a name relative to fitcli,
    e.g. "report" or "sweep.plan") that its owner rule does not allow."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            top = name.split(".")[0]
            owner = OWNER.get(top)
            if owner is not None and module != owner and not module.startswith(owner + "."):
                found.append(f"{node.lineno}: {name}")
    return found


def test_rich_only_in_console_and_plotly_only_in_plots():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for hit in banned_imports(path.read_text(encoding="utf-8"), module):
            problems.append(f"src/fitcli/{path.relative_to(SRC)}:{hit}")
    assert not problems, (
        "rich belongs in console, plotly in plots, kaleido in export:\n" + "\n".join(problems)
    )


def test_the_scan_finds_imports_inside_functions():
    source = "def page():\n    from plotly import io\n    import rich.table\n"
    assert banned_imports(source, "report") == ["2: plotly", "3: rich.table"]
    assert banned_imports(source.replace("rich.table", "os"), "plots") == []
    assert banned_imports("import importlib\nimportlib.import_module('rich')\n", "cli") == [
        "2: rich"
    ]
    assert banned_imports("def draw():\n    import kaleido\n", "figures") == ["2: kaleido"]
    assert banned_imports("def draw():\n    import kaleido\n", "export") == []
