"""fitcli graph: the autograd DAG of one loss evaluation, checked against torch's own graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fitcli.cli import app
from fitcli.config import load_config
from fitcli.graph import DATA, OP, PARAM, autograd_graph, build_graph, layers
from fitcli.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def prep_for(config: str, *overrides: str):
    return prepare(load_config(ROOT / config, list(overrides)))


def torch_walk(loss: torch.Tensor) -> tuple[set[str], int]:
    """Reference: op names and the number of distinct backward nodes, walked plainly."""
    seen: dict[int, object] = {}
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        stack.extend(n for n, _ in fn.next_functions if n is not None)
    return {type(f).__name__ for f in seen.values()}, len(seen)


CASES = [
    ("configs/seed.yaml", ()),
    ("configs/polynomial-adam.yaml", ()),
    ("configs/damped-oscillator.yaml", ()),
    ("configs/measured-decay.yaml", ()),
    ("configs/seed.yaml", ("loss=l1",)),
    ("configs/damped-oscillator.yaml", ("model.params={a: 1, k: 0.1, w: 1.5, phi: 0, c: 0}",)),
    ("configs/damped-oscillator.yaml", ("model.params.k={value: 0.1, max: 5}",)),
]


@pytest.mark.parametrize(("config", "overrides"), CASES)
def test_graph_is_torchs_graph(config: str, overrides: tuple[str, ...]) -> None:
    prep = prep_for(config, *overrides)
    g = autograd_graph(prep)
    loss = prep.loss_fn(prep.model(prep.x), prep.y)
    names, count = torch_walk(loss)
    ops = [n for n in g.nodes.values() if n.kind == OP]
    params = [n for n in g.nodes.values() if n.kind == PARAM]
    # every backward node once (the DAG is not unrolled into a tree) ...
    assert len(ops) + len(params) == count
    # ... with torch's own names, AccumulateGrad shown as the parameter leaf
    assert {n.label for n in ops} == names - {"AccumulateGrad"}
    assert len(params) == 1
    assert params[0].label == f"raw: free parameters ({', '.join(prep.model.free_names)})"
    assert g.nodes[g.root].label == type(loss.grad_fn).__name__
    # every edge points at a node, leaves have no children
    for a, b in g.edges:
        assert a in g.nodes and b in g.nodes
    for n in g.nodes.values():
        if n.kind != OP:
            assert g.children[n.id] == []


def test_seed_graph() -> None:
    g = autograd_graph(prep_for("configs/seed.yaml"))
    assert g.nodes[g.root].label == "MseLossBackward0"
    assert [g.nodes[c].label for c in g.children[g.root]][1] == "y (data)"
    assert g.labels(PARAM) == ["raw: free parameters (theta0, theta1, theta2)"]
    # the basis functions are data (computed once, without grad): only the coefficients learn
    design = [n for n in g.nodes.values() if n.label.startswith("design matrix")]
    assert len(design) == 1 and design[0].kind == DATA
    assert "1000" in design[0].detail and "3" in design[0].detail
    assert not {"SinBackward0", "CosBackward0"} & set(g.labels(OP))


def test_bounds_show_their_transforms_and_unbounded_models_do_not() -> None:
    bounded = autograd_graph(prep_for("configs/damped-oscillator.yaml")).labels(OP)
    assert {"SigmoidBackward0", "SoftplusBackward0", "SinBackward0", "ExpBackward0"} <= set(bounded)
    free = autograd_graph(
        prep_for("configs/damped-oscillator.yaml", "model.params={a: 1, k: 0.1, w: 1.5}")
    ).labels(OP)
    assert "SigmoidBackward0" not in free and "SoftplusBackward0" not in free
    assert "SinBackward0" in free


def test_shared_nodes_appear_once() -> None:
    # x is used twice in the expression, the parameter vector many times: one node each.
    g = autograd_graph(prep_for("configs/damped-oscillator.yaml"))
    assert g.labels(DATA).count("x (data)") == 1
    x = next(n.id for n in g.nodes.values() if n.label == "x (data)")
    assert sum(1 for _, b in g.edges if b == x) == 2


def test_weighted_loss_shows_the_weights(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("x,y,s\n0,1,0.5\n1,2,0.5\n2,2.9,1\n3,4.2,1\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: w\nepochs: 2\ndata: {file: d.csv, columns: {x: x, y: y, sigma: s}}\n"
        "model: {expr: 'a*x + b'}\noptimizer: {name: SGD, lr: 0.01}\n"
    )
    g = autograd_graph(prepare(load_config(cfg)))
    assert "weights 1/sigma (data)" in g.labels(DATA)


def test_layers_point_every_edge_down() -> None:
    g = autograd_graph(prep_for("configs/damped-oscillator.yaml"))
    pos = layers(g)
    assert set(pos) == set(g.nodes)
    assert len(set(pos.values())) == len(pos)
    for a, b in g.edges:
        assert pos[a][0] < pos[b][0]
    assert pos[g.root] == (0, 0)


def test_build_graph_on_a_hand_made_graph() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    h = w * x
    loss = (h.sin() + h.cos()).sum()  # h is shared by sin and cos
    g = build_graph(loss, params={id(w): "w"}, data={"x": x})
    assert g.nodes[g.root].label == "SumBackward0"
    mul = [n for n in g.nodes.values() if n.label == "MulBackward0"]
    assert len(mul) == 1
    assert sum(1 for _, b in g.edges if b == mul[0].id) == 2
    assert "w" in g.labels(PARAM) and "x" in g.labels(DATA)
    with pytest.raises(ValueError):
        build_graph(x.sum())


def test_cli_tree_and_html(tmp_path: Path) -> None:
    out = tmp_path / "g.html"
    res = runner.invoke(
        app,
        ["graph", str(ROOT / "configs/damped-oscillator.yaml"), "--html", str(out)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "MseLossBackward0" in res.stdout and "SigmoidBackward0" in res.stdout
    assert "raw: free parameters (a, k, w, phi)  [requires grad]" in res.stdout
    assert "x (data)  [data, no grad]" in res.stdout
    assert "-> see #" in res.stdout  # shared subgraphs as references
    page = out.read_text()
    assert 'id="fitcli-graph"' in page and "Plotly.newPlot" in page
    assert not (tmp_path / "plotly.min.js").exists()  # embedded by default


def test_cli_graph_directory_mode_and_bad_config(tmp_path: Path) -> None:
    out = tmp_path / "g.html"
    res = runner.invoke(
        app,
        ["graph", str(ROOT / "configs/seed.yaml"), "--html", str(out), "--plotlyjs", "directory"],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "plotly.min.js").exists() and 'src="plotly.min.js"' in out.read_text()
    res = runner.invoke(app, ["graph", str(ROOT / "configs/seed.yaml"), "model.basis=[x, y]"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
