"""Multi-start (`starts: N`): the drawn starts, the search, the run it chooses and its summary,
against single runs and scipy's brute-force grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import optimize

from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.errors import ConfigError, ResumeError
from fitcli.experiment import execute
from fitcli.model import ParamInfo
from fitcli.prepare import prepare
from fitcli.resume import prepare_resume
from fitcli.rundir import files
from fitcli.starts import REACHED_RTOL, _batched, _one, draw_starts

# sin(w x) is multi-modal in w: LM from w = 1 ends in a local minimum.
FREQ = {
    "name": "freq",
    "seed": 3,
    "device": "cpu",
    "epochs": 200,
    "snapshots": 2,
    "data": {
        "target": "2.0*sin(3.7*x)",
        "x": {"start": 0, "stop": 10, "num": 200},
        "noise": {"std": 0.1},
    },
    "model": {
        "expr": "a*sin(w*x)",
        "params": {"a": 1.0, "w": {"value": 1.0, "min": 0.1, "max": 10}},
    },
    "optimizer": {"name": "LevenbergMarquardt"},
}


def _run(prep, run_dir, **kwargs) -> dict:
    run_dir.mkdir()
    return execute(prep, run_dir, **kwargs)


def _cfg(base: dict, **changes):
    raw = json.loads(json.dumps(base))
    raw.update(changes)
    return config_from_dict(raw)


def brute_force_rss(x: np.ndarray, y: np.ndarray) -> float:
    """The global least-squares minimum of a*sin(w x) by a dense grid in w (a is linear:
    closed form at each w), polished by scipy's least_squares."""
    ws = np.linspace(0.1, 10, 20001)
    s = np.sin(np.outer(ws, x))
    a = (s @ y) / np.einsum("ij,ij->i", s, s)
    rss = ((y[None, :] - a[:, None] * s) ** 2).sum(1)
    k = int(np.argmin(rss))
    fit = optimize.least_squares(
        lambda p: p[0] * np.sin(p[1] * x) - y, [a[k], ws[k]], xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    return float(2 * fit.cost)


def test_sixteen_starts_reach_the_brute_force_minimum_that_the_given_start_misses(runner, tmp_path):
    path = tmp_path / "freq.yaml"
    path.write_text(json.dumps({**FREQ, "starts": 16}))
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = tmp_path / "runs" / summary["run_dir"].split("/")[-1]
    data = np.loadtxt(run_dir / files.DATA, delimiter=",", skiprows=1)
    x, y = data[:, 0], data[:, 1]
    best_rss = brute_force_rss(x, y)
    n = len(x)
    starts = summary["starts"]
    # The given start alone ends in a local minimum, far above the global one.
    assert starts["losses"][0] * n > 10 * best_rss
    assert summary["final_loss"] * n == pytest.approx(best_rss, rel=1e-9)
    assert summary["params"]["w"] == pytest.approx(3.7, rel=1e-2)
    # The summary's record: one final loss per start, the best is their minimum.
    losses = starts["losses"]
    assert starts["count"] == len(losses) == 16
    assert starts["best"] == int(np.argmin(losses))
    low = min(losses)
    assert starts["reached_best"] == sum(abs(v - low) <= REACHED_RTOL * low for v in losses)
    # The run is the best start trained again (LM is deterministic): the same final loss, and
    # its first snapshot shows that start.
    assert summary["final_loss"] == losses[starts["best"]]
    snaps = json.loads((run_dir / files.SNAPSHOT_PARAMS).read_text())["snapshots"]
    assert snaps[0]["epoch"] == 0
    for name, value in starts["start"].items():
        assert snaps[0]["params"][name] == pytest.approx(value, rel=1e-12)
    # The resolved config reruns the search, not the chosen start.
    assert "starts: 16" in (run_dir / files.CONFIG).read_text()


def test_single_start_run_is_unchanged_and_has_no_starts_record(tmp_path):
    prep = prepare(_cfg(FREQ, epochs=20))
    summary = _run(prep, tmp_path / "run")
    assert "starts" not in summary
    assert summary["params"]["w"] < 2  # the local minimum near the given start


def test_batched_search_matches_each_start_trained_alone():
    # Adam is elementwise: the starts as one tensor program are the starts run one by one.
    cfg = _cfg(
        FREQ,
        starts=6,
        epochs=60,
        optimizer={"name": "Adam", "lr": 0.05},
        model={
            "expr": "a*sin(w*x) + c",
            "params": {"a": {"value": 1.0, "min": -5, "max": 5}, "w": 1.0, "c": 0.0},
        },
    )
    prep = prepare(cfg)
    starts = draw_starts(prep.model.infos, cfg.starts, seed=11)
    batched = _batched(prep, starts, None)
    alone = [_one(prep, s, None) for s in starts]
    assert all(v is not None for v in batched)
    assert batched == pytest.approx(alone, rel=1e-10)


def test_starts_are_deterministic_in_the_seed():
    infos = (ParamInfo("a", 1.0), ParamInfo("b", 0.5, 0.0, 2.0), ParamInfo("c", 3.0, min=1.0))
    one = draw_starts(infos, 8, seed=5)
    assert one == draw_starts(infos, 8, seed=5)
    assert one[1:] != draw_starts(infos, 8, seed=6)[1:]
    assert one[0] == {"a": 1.0, "b": 0.5, "c": 3.0}
    # The same config searches the same way: equal records.
    a = prepare(_cfg(FREQ, starts=4, epochs=30))
    b = prepare(_cfg(FREQ, starts=4, epochs=30))
    from fitcli.starts import search

    assert search(a) == search(b)
    assert search(prepare(_cfg(FREQ, starts=4, epochs=30, seed=4)))["start"] != a.starts["start"]


bound = st.floats(-1e6, 1e6, allow_nan=False)


@st.composite
def param(draw, k: int) -> ParamInfo:
    kind = draw(st.sampled_from(["none", "lower", "upper", "both"]))
    lo = draw(bound)
    width = draw(st.floats(1e-6, 1e6))
    t = draw(st.floats(0.001, 0.999))
    if kind == "both":
        return ParamInfo(f"p{k}", lo + t * width, lo, lo + width)
    if kind == "lower":
        return ParamInfo(f"p{k}", lo + width, min=lo)
    if kind == "upper":
        return ParamInfo(f"p{k}", lo - width, max=lo)
    return ParamInfo(f"p{k}", draw(bound))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(lambda n: st.tuples(*[param(k) for k in range(n)])),
    st.integers(2, 40),
    st.integers(0, 2**63 - 1),
)
def test_every_drawn_start_lies_strictly_inside_the_bounds(infos, count, seed):
    for info in infos:  # a config's own start lies strictly inside its bounds (the schema)
        assume(info.min is None or info.value > info.min)
        assume(info.max is None or info.value < info.max)
    drawn = draw_starts(infos, count, seed)
    assert len(drawn) == count
    assert drawn[0] == {i.name: i.value for i in infos}
    for start in drawn:
        for info in infos:
            v = start[info.name]
            assert math.isfinite(v)
            assert info.min is None or v > info.min
            assert info.max is None or v < info.max


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "starts: must be >= 1 (got 0)"),
        (2.5, "starts:"),
        ("many", "starts:"),
        (5000, "starts: must be <= 1024 (got 5000)"),
    ],
)
def test_starts_must_be_a_whole_number_from_1_to_1024(value, message):
    with pytest.raises(ConfigError) as err:
        _cfg(FREQ, starts=value)
    assert message in str(err.value)


def test_resume_continues_the_best_start_without_searching_again(tmp_path):
    cfg = _cfg(FREQ, starts=4, epochs=30, optimizer={"name": "Adam", "lr": 0.05})
    whole = _run(prepare(cfg), tmp_path / "whole")
    # The same run stopped after epoch 12 and resumed.
    _run(prepare(cfg), tmp_path / "part", on_epoch=lambda epoch, loss: epoch >= 12)
    prep, point = prepare_resume(tmp_path / "part", [])
    assert prep.starts is None  # nothing searched: the state is the best start's run
    resumed = execute(prep, tmp_path / "part", resume=point)
    assert resumed["starts"] == whole["starts"]
    assert resumed["params"] == whole["params"]
    _run(prepare(cfg), tmp_path / "part2", on_epoch=lambda epoch, loss: epoch >= 5)
    with pytest.raises(ResumeError, match="different starts"):
        prepare_resume(tmp_path / "part2", ["starts=8"])


def test_a_sweep_run_with_starts_is_the_run_train_writes(runner, tmp_path):
    path = tmp_path / "freq.yaml"
    path.write_text(json.dumps({**FREQ, "starts": 4, "epochs": 40}))
    train = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "t"), "--json"])
    assert train.exit_code == 0, train.output
    args = ["sweep", str(path), "seed=3", "--out", str(tmp_path / "s"), "--json"]
    sweep = runner.invoke(app, [*args, "--progress", "none"])
    assert sweep.exit_code == 0, sweep.output
    run = json.loads(sweep.stdout)["runs"][0]
    one = json.loads(train.stdout)
    swept = json.loads(
        (tmp_path / "s" / run["run_dir"].split("/s/")[-1] / "summary.json").read_text()
    )
    assert swept["starts"] == one["starts"]
    assert swept["params"] == one["params"]
