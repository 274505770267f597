"""`fitcli graph`: the autograd graph of one loss evaluation, as plain nodes and edges.

`build_graph` walks `loss.grad_fn` back through `next_functions` to the leaves; every backward
node becomes an op node, every `AccumulateGrad` a leaf tensor that requires grad (a parameter),
and every tensor an op saved for its backward that requires no grad (x, y, a design matrix, a
bound) a data node. A node reached twice is one node: the result is a DAG. `layers` lays it out
for drawing. Rendering lives elsewhere: console.py (rich tree) and plots.py (plotly figure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OP, PARAM, DATA = "op", "param", "data"


@dataclass(frozen=True)
class Node:
    """One vertex: an operation (`MulBackward0`), a parameter leaf or a data tensor."""

    id: int
    kind: str  # op | param | data
    label: str
    detail: str = ""


@dataclass
class Graph:
    """A DAG from the loss (root) to its leaves; `children[id]` lists a node's inputs in order."""

    root: int
    nodes: dict[int, Node] = field(default_factory=dict)
    children: dict[int, list[int]] = field(default_factory=dict)

    @property
    def edges(self) -> list[tuple[int, int]]:
        return [(a, b) for a, bs in self.children.items() for b in bs]

    def labels(self, kind: str | None = None) -> list[str]:
        return [n.label for n in self.nodes.values() if kind is None or n.kind == kind]


def _shape(t: Any) -> str:
    return "scalar" if t.dim() == 0 else "×".join(str(s) for s in t.shape)


def _key(t: Any) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))


def _signed(v: Any) -> Any:
    """A negative dim comes back from a saved attribute as its unsigned 64-bit value."""
    if isinstance(v, tuple):
        return tuple(_signed(i) for i in v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 2**63:
        return v - 2**64
    return v


def _details(fn: Any) -> str:
    """Non-tensor arguments the op saved (dim, index, exponent, ...), briefly."""
    out = []
    for attr in sorted(dir(fn)):
        if not attr.startswith("_saved_") or "sizes" in attr or "strides" in attr:
            continue
        try:
            v = getattr(fn, attr)
        except Exception:  # some saved values cannot be read back; they are not needed
            continue
        v = _signed(v)
        if isinstance(v, bool | int | float | str) or (
            isinstance(v, tuple) and len(v) <= 4 and all(isinstance(i, int) for i in v)
        ):
            out.append(f"{attr.removeprefix('_saved_')}={v}")
    return ", ".join(out)


def _saved_tensors(fn: Any, torch: Any) -> list[Any]:
    out = []
    for attr in sorted(dir(fn)):
        if not attr.startswith("_saved_"):
            continue
        try:
            v = getattr(fn, attr)
        except Exception:
            continue
        for t in v if isinstance(v, tuple | list) else (v,):
            if isinstance(t, torch.Tensor) and not t.requires_grad:
                out.append(t)
    return out


def build_graph(
    loss: Any, *, params: dict[int, str] | None = None, data: dict[str, Any] | None = None
) -> Graph:
    """The DAG behind `loss`. `params` labels leaf tensors by `id(tensor)`; `data` names tensors
    ops saved (matched by storage, shape and strides), others are labelled `constant`."""
    import torch

    params = params or {}
    known = {_key(t): name for name, t in (data or {}).items() if t is not None}
    if loss.grad_fn is None:
        raise ValueError("the loss does not depend on any tensor that requires grad")
    ids: dict[Any, int] = {}  # grad_fn or data key -> node id
    keep: list[Any] = []  # hold every grad_fn so no id() is reused while walking
    graph = Graph(root=0)

    def add(key: Any, kind: str, label: str, detail: str = "") -> tuple[int, bool]:
        if key in ids:
            return ids[key], False
        nid = len(ids)
        ids[key] = nid
        graph.nodes[nid] = Node(nid, kind, label, detail)
        graph.children[nid] = []
        return nid, True

    def visit(fn: Any) -> int:
        keep.append(fn)
        name = type(fn).__name__
        if name == "AccumulateGrad":
            var = fn.variable
            label = params.get(id(var), f"leaf tensor {_shape(var)}")
            return add(("fn", id(fn)), PARAM, label, f"shape {_shape(var)}, {var.dtype}")[0]
        nid, new = add(("fn", id(fn)), OP, name, _details(fn))
        if not new:
            return nid
        kids = graph.children[nid]
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                kids.append(visit(nxt))
        for t in _saved_tensors(fn, torch):
            k = _key(t)
            label = known.get(k, "constant")
            did, _ = add(("data", k), DATA, label, f"shape {_shape(t)}, {t.dtype}")
            if did not in kids:
                kids.append(did)
        return nid

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        graph.root = visit(loss.grad_fn)
    finally:
        sys.setrecursionlimit(limit)
    return graph


def autograd_graph(prep: Any) -> Graph:
    """Build the model and one loss evaluation from a prepared run, and return its graph."""
    import torch

    model = prep.model
    loss = prep.loss_fn(model(prep.x), prep.y)
    free = ", ".join(model.free_names)
    params = {id(model.raw): f"raw: free parameters ({free})" if free else "raw (empty)"}
    data = {"x (data)": prep.x, "y (data)": prep.y, "weights 1/sigma (data)": prep.weights}
    # Tensors the model keeps (a basis model's cached design matrix, bounds, fixed values),
    # named after their attribute, so saved tensors that are them get a name.
    design = getattr(model, "_designs", [])
    for _, (phi, phi_t) in design:
        data.setdefault("design matrix [b_k(x)]", phi)
        if phi_t is not None:
            data.setdefault("design matrix [b_k(x)] transposed", phi_t)
    for name, t in [*vars(model).items(), *model.named_buffers()]:
        if not isinstance(t, torch.Tensor) or t is model.raw:
            continue
        data.setdefault(f"{name.strip('_')} (model)", t)
    return build_graph(loss, params=params, data=data)


def layers(graph: Graph) -> dict[int, tuple[int, int]]:
    """(layer, position) of every node: layer = longest path from the root, so every edge
    points down; positions in a layer ordered by their parents' mean position."""
    order = _topological(graph)
    depth = dict.fromkeys(graph.nodes, 0)
    for nid in order:
        for c in graph.children[nid]:
            depth[c] = max(depth[c], depth[nid] + 1)
    parents: dict[int, list[int]] = {n: [] for n in graph.nodes}
    for a, b in graph.edges:
        parents[b].append(a)
    pos: dict[int, tuple[int, int]] = {}
    by_layer: dict[int, list[int]] = {}
    for nid in order:
        by_layer.setdefault(depth[nid], []).append(nid)
    for layer in sorted(by_layer):
        members = by_layer[layer]

        def bary(n: int) -> float:
            ps = [pos[p][1] for p in parents[n] if p in pos]
            return sum(ps) / len(ps) if ps else 0.0

        members.sort(key=lambda n: (bary(n), n))
        for k, nid in enumerate(members):
            pos[nid] = (layer, k)
    return pos


def _topological(graph: Graph) -> list[int]:
    indeg = dict.fromkeys(graph.nodes, 0)
    for _, b in graph.edges:
        indeg[b] += 1
    ready = [n for n in graph.nodes if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for c in graph.children[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    return out


def write_html(graph: Graph, path: Path, *, plotlyjs: str = "embed", title: str = "") -> None:
    """The graph as an interactive plotly page at `path`."""
    from fitcli import plots
    from fitcli.rundir import files

    path = Path(path)
    files.check_output_file(path, "--html")
    fig = plots.graph_figure(graph, layers(graph), title=title or "autograd graph of the loss")
    if plotlyjs == "directory":
        files.copy_plotly_js(path.parent)
    page = plots.to_html(fig, plotlyjs, title=title or "fitcli graph", div_id="fitcli-graph")
    files.atomic_write(path, page)
