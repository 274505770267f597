"""Grouped data: many independent fits and global fits, against scipy on each group and on the
stacked problem; groups.csv, exit codes and bad input through `fitcli train`."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import curve_fit, least_squares
from typer.testing import CliRunner

from fitcli import groups
from fitcli.cli import app
from fitcli.groups import schur_solve

runner = CliRunner()
TIGHT = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "maxfev": 10000}


def decay(x, a, b, c):
    return a * np.exp(-b * x) + c


def write_wells(path: Path, groups: int = 5, n: int = 30, seed: int = 0, counts=None) -> dict:
    """A table t, y, well of decays a_g*exp(-b_g*t) + c_g with noise; returns the truth."""
    rng = np.random.default_rng(seed)
    truth = {}
    lines = ["t,y,well"]
    for g in range(groups):
        a, b, c = rng.uniform(1, 3), rng.uniform(0.4, 1.2), rng.uniform(0.1, 0.4)
        truth[f"w{g}"] = (a, b, c)
        m = n if counts is None else counts[g]
        for t in np.linspace(0, 5, m):
            lines.append(f"{float(t)!r},{float(decay(t, a, b, c) + rng.normal(0, 0.02))!r},w{g}")
    path.write_text("\n".join(lines) + "\n")
    return truth


def config(tmp_path: Path, params: dict, data: dict | None = None, **top) -> Path:
    cfg = {
        "name": "g",
        "epochs": 200,
        "snapshots": 2,
        "data": data or {"file": "wells.csv", "columns": {"x": "t", "y": "y", "group": "well"}},
        "model": {"expr": "a*exp(-b*x) + c", "params": params},
        "optimizer": {"name": "LevenbergMarquardt"},
        **top,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(path: Path, tmp_path: Path, *extra: str):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(path), "--run-dir", str(run), "--json", *extra])
    return result, run


def read_groups(run: Path) -> list[dict]:
    with open(run / "groups.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def table(path: Path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (
        np.array([float(r["t"]) for r in rows]),
        np.array([float(r["y"]) for r in rows]),
        np.array([r["well"] for r in rows]),
    )


ALL_PER_GROUP = {
    "a": {"value": 1, "per_group": True},
    "b": {"value": 1, "per_group": True},
    "c": {"value": 0.1, "per_group": True},
}


def test_independent_groups_equal_a_curve_fit_loop(tmp_path):
    write_wells(tmp_path / "wells.csv")
    result, run = train(config(tmp_path, ALL_PER_GROUP), tmp_path)
    assert result.exit_code == 0, result.output
    rows = read_groups(run)
    assert list(rows[0]) == [
        "group", "status", "reason", "iterations", "n_points", "loss", "rss",
        "a", "a_stderr", "b", "b_stderr", "c", "c_stderr",
    ]  # fmt: skip
    x, y, well = table(tmp_path / "wells.csv")
    for row in rows:
        sel = well == row["group"]
        p, cov = curve_fit(decay, x[sel], y[sel], p0=[1, 1, 0.1], **TIGHT)
        se = np.sqrt(np.diag(cov))
        got = np.array([float(row[k]) for k in "abc"])
        got_se = np.array([float(row[f"{k}_stderr"]) for k in "abc"])
        np.testing.assert_allclose(got, p, rtol=1e-6)
        np.testing.assert_allclose(got_se, se, rtol=1e-6)
        assert row["status"] == "converged"
        assert int(row["n_points"]) == sel.sum()
    summary = json.loads(result.stdout)
    assert summary["groups_converged"] == 5 and summary["groups_failed"] == 0
    assert len(summary["groups"]) == 5  # --json: the rows
    saved = json.loads((run / "summary.json").read_text())
    assert saved["groups"] == 5
    head = (run / "data.csv").read_text().splitlines()[:2]
    assert head[0] == "x,y,group" and head[1].endswith(",w0")


def test_independent_groups_with_bounds_and_a_tie_equal_a_curve_fit_loop(tmp_path):
    # The Jacobian's chain rule through bounds (internal -> value) and a per-group tie.
    write_wells(tmp_path / "wells.csv", groups=4)
    params = {
        "a": {"value": 1, "per_group": True},
        "b": {"value": 1, "min": 0.1, "max": 5, "per_group": True},
        "c": {"expr": "0.1*a"},
    }
    result, run = train(config(tmp_path, params), tmp_path)
    assert result.exit_code == 0, result.output
    x, y, well = table(tmp_path / "wells.csv")
    for row in read_groups(run):
        sel = well == row["group"]
        p, cov = curve_fit(
            lambda t, a, b: decay(t, a, b, 0.1 * a), x[sel], y[sel], p0=[1, 1], **TIGHT
        )
        got = np.array([float(row[k]) for k in "ab"])
        got_se = np.array([float(row[f"{k}_stderr"]) for k in "ab"])
        np.testing.assert_allclose(got, p, rtol=1e-6)
        np.testing.assert_allclose(got_se, np.sqrt(np.diag(cov)), rtol=1e-6)
        assert row["status"] == "converged"


def test_global_fit_equals_least_squares_on_the_stacked_problem(tmp_path):
    # 2 shared (b, c) + 2 per-group (a, d) parameters, 5 groups.
    write_wells(tmp_path / "wells.csv")
    params = {
        "a": {"value": 1, "per_group": True},
        "d": {"value": 0.0, "per_group": True},
        "b": 1,
        "c": 0.1,
    }
    path = config(tmp_path, params)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["expr"] = "a*exp(-b*x) + c + d*x"
    path.write_text(yaml.safe_dump(cfg))
    result, run = train(path, tmp_path)
    assert result.exit_code == 0, result.output
    x, y, well = table(tmp_path / "wells.csv")
    labels = list(dict.fromkeys(well))
    gi = np.array([labels.index(w) for w in well])
    G = len(labels)

    def res(p):
        a, d, b, c = p[:G], p[G : 2 * G], p[-2], p[-1]
        return y - (a[gi] * np.exp(-b * x) + c + d[gi] * x)

    def jac(p):  # exact: a finite-difference Jacobian would limit the reference's digits
        a, b = p[:G], p[-2]
        out = np.zeros((x.size, p.size))
        e = np.exp(-b * x)
        out[np.arange(x.size), gi] = -e
        out[np.arange(x.size), G + gi] = -x
        out[:, -2] = a[gi] * x * e
        out[:, -1] = -1.0
        return out

    start = np.r_[np.ones(G), np.zeros(G), 1.0, 0.1]
    ref = least_squares(res, start, jac=jac, xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10000)
    for _ in range(30):  # least_squares stops at ftol; Gauss-Newton steps finish the job
        ref.x = ref.x - np.linalg.lstsq(jac(ref.x), res(ref.x), rcond=None)[0]
    ref.fun, ref.jac = res(ref.x), jac(ref.x)
    J = ref.jac
    s2 = (ref.fun @ ref.fun) / (x.size - J.shape[1])
    se = np.sqrt(np.diag(np.linalg.inv(J.T @ J)) * s2)
    rows = read_groups(run)
    summary = json.loads((run / "summary.json").read_text())
    got = np.r_[
        [float(r["a"]) for r in rows], [float(r["d"]) for r in rows],
        summary["params"]["b"], summary["params"]["c"],
    ]  # fmt: skip
    got_se = np.r_[
        [float(r["a_stderr"]) for r in rows], [float(r["d_stderr"]) for r in rows],
        summary["stderr"]["b"], summary["stderr"]["c"],
    ]  # fmt: skip
    np.testing.assert_allclose(got, ref.x, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got_se, se, rtol=1e-6)


def test_schur_solve_equals_a_dense_solve():
    gen = torch.Generator().manual_seed(0)
    G, q, s = 7, 3, 2
    J = [torch.randn(20, q + s, generator=gen, dtype=torch.float64) for _ in range(G)]
    u = torch.stack([j[:, :q].T @ j[:, :q] for j in J])
    w = torch.stack([j[:, :q].T @ j[:, q:] for j in J])
    v = sum(j[:, q:].T @ j[:, q:] for j in J)
    a = torch.randn(G, q, generator=gen, dtype=torch.float64)
    b = torch.randn(s, generator=gen, dtype=torch.float64)
    dense = torch.zeros(G * q + s, G * q + s, dtype=torch.float64)
    for g in range(G):
        dense[g * q : (g + 1) * q, g * q : (g + 1) * q] = u[g]
        dense[g * q : (g + 1) * q, G * q :] = w[g]
        dense[G * q :, g * q : (g + 1) * q] = w[g].T
    dense[G * q :, G * q :] = v
    ref = torch.linalg.solve(dense, torch.cat([a.reshape(-1), b]))
    dg, ds = schur_solve(u, w, v, a, b)
    torch.testing.assert_close(torch.cat([dg.reshape(-1), ds]), ref, rtol=1e-10, atol=1e-12)


def test_a_group_with_too_few_points_fails_alone_exit_1(tmp_path):
    write_wells(tmp_path / "wells.csv", groups=4, counts=[30, 30, 3, 30])
    result, run = train(config(tmp_path, ALL_PER_GROUP), tmp_path)
    assert result.exit_code == 1, result.output
    rows = {r["group"]: r for r in read_groups(run)}
    assert rows["w2"]["status"] == "failed"
    assert rows["w2"]["reason"].startswith("too few points: 3 for 3")
    assert all(rows[g]["status"] == "converged" for g in ("w0", "w1", "w3"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["groups_failed"] == 1 and summary["exit_code"] == 1


def test_a_singular_group_fails_with_its_reason(tmp_path):
    # Group w1 is flat in t (all points at t = 0): a and c cannot be told apart there.
    lines = ["t,y,well"]
    rng = np.random.default_rng(3)
    for t in np.linspace(0, 5, 20):
        lines.append(f"{t},{decay(t, 2, 0.7, 0.2) + rng.normal(0, 0.01)},w0")
    for _ in range(20):
        lines.append(f"0,{2.2 + rng.normal(0, 0.01)},w1")
    (tmp_path / "wells.csv").write_text("\n".join(lines) + "\n")
    result, run = train(config(tmp_path, ALL_PER_GROUP), tmp_path)
    assert result.exit_code == 1, result.output
    rows = {r["group"]: r for r in read_groups(run)}
    assert rows["w0"]["status"] == "converged"
    assert rows["w1"]["status"] == "failed" and "singular" in rows["w1"]["reason"]


def test_data_files_list_and_glob_name_the_groups(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "wells").mkdir()
    truth = {}
    for name in ("alpha", "beta", "gamma"):
        a = rng.uniform(1, 3)
        truth[name] = a
        t = np.linspace(0, 5, 25)
        y = decay(t, a, 0.7, 0.2) + rng.normal(0, 0.01, t.size)
        body = "\n".join(f"{float(u)!r},{float(v)!r}" for u, v in zip(t, y, strict=True))
        (tmp_path / "wells" / f"{name}.csv").write_text("t,y\n" + body + "\n")
    params = {"a": {"value": 1, "per_group": True}, "b": 1, "c": 0.1}
    cols = {"x": "t", "y": "y"}
    for files in ("wells/*.csv", ["wells/alpha.csv", "wells/beta.csv", "wells/gamma.csv"]):
        path = config(tmp_path, params, {"files": files, "columns": cols})
        result, run = train(path, tmp_path, "--overwrite")
        assert result.exit_code == 0, result.output
        rows = read_groups(run)
        assert [r["group"] for r in rows] == ["alpha", "beta", "gamma"]
        for r in rows:
            assert abs(float(r["a"]) - truth[r["group"]]) < 0.05


def bad(tmp_path: Path, path: Path) -> str:
    result, run = train(path, tmp_path)
    assert result.exit_code == 2, result.output
    assert not run.exists()
    return result.output


def test_bad_grouped_input_exits_2_naming_the_fault(tmp_path):
    write_wells(tmp_path / "wells.csv", groups=1)
    out = bad(tmp_path, config(tmp_path, ALL_PER_GROUP))
    assert "data.columns.group" in out and "one group" in out and "wells.csv" in out
    cols = {"x": "t", "y": "y"}
    out = bad(tmp_path, config(tmp_path, ALL_PER_GROUP, {"files": "none/*.csv", "columns": cols}))
    assert "data.files" in out and "matches no file" in out
    (tmp_path / "a.csv").write_text("t,y\n0,1\n1,2\n2,3\n3,4\n4,5\n")
    (tmp_path / "b.csv").write_text("time,y\n0,1\n1,2\n2,3\n3,4\n4,5\n")
    out = bad(tmp_path, config(tmp_path, ALL_PER_GROUP, {"files": ["a.csv", "b.csv"]}))
    assert "b.csv line 1" in out and "same columns" in out
    write_wells(tmp_path / "wells.csv")
    one = {"a": {"value": 1, "per_group": True}}
    out = bad(tmp_path, config(tmp_path, one, {"file": "wells.csv"}))
    assert "per_group" in out and "needs grouped data" in out


def test_memory_estimate_refuses_with_the_figure(tmp_path, monkeypatch):
    import fitcli.grouped_run as gr

    write_wells(tmp_path / "wells.csv")
    monkeypatch.setattr(gr, "available_memory", lambda device: 1000)
    out = bad(tmp_path, config(tmp_path, ALL_PER_GROUP))
    assert "GiB to fit, more than the 0.0 GiB available" in out


def test_adam_global_fit_reaches_the_lm_optimum(tmp_path):
    write_wells(tmp_path / "wells.csv", groups=3)
    params = {"a": {"value": 2, "per_group": True}, "b": 0.8, "c": 0.2}
    result, run = train(config(tmp_path, params), tmp_path)
    assert result.exit_code == 0, result.output
    lm = json.loads((run / "summary.json").read_text())
    # 3000 epochs left c 2.5e-3 short of the optimum (Adam still creeping along its valley);
    # 6000 reach it to about 1e-11.
    path = config(tmp_path, params, optimizer={"name": "Adam", "lr": 0.02}, epochs=6000)
    result, run = train(path, tmp_path, "--overwrite")
    assert result.exit_code == 0, result.output
    adam = json.loads((run / "summary.json").read_text())
    assert {r["status"] for r in read_groups(run)} == {"completed"}
    for k in ("b", "c"):
        assert abs(adam["params"][k] - lm["params"][k]) < 1e-6
    assert adam["rss"] <= lm["rss"] * 1.001


def test_a_grouped_run_prints_its_summary_without_json(tmp_path):
    # The plain (not --json) summary counts every free parameter: 5 groups x 1 + 2 shared.
    write_wells(tmp_path / "wells.csv")
    path = config(tmp_path, {"a": {"value": 1, "per_group": True}, "b": 1, "c": 0.1})
    result = runner.invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "(150 points, 7 free)" in result.output
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["n_params"] == 7


def test_lm_at_its_iteration_limit_leaves_groups_unconverged_not_failed(tmp_path):
    # As for a single run: running out of epochs is "did not converge" (exit 0, 4 with
    # --strict), not a failure of the group (exit 1), for independent and global fits alike.
    write_wells(tmp_path / "wells.csv")
    for params in (ALL_PER_GROUP, {"a": {"value": 2, "per_group": True}, "b": 0.8, "c": 0.2}):
        result, run = train(config(tmp_path, params, epochs=2), tmp_path, "--overwrite")
        assert result.exit_code == 0, result.output
        rows = read_groups(run)
        assert {r["status"] for r in rows} == {"completed"}
        assert all(r["reason"].startswith("iteration limit") for r in rows)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["groups_failed"] == 0 and summary["groups_converged"] == 0


def test_the_terminal_summary_of_groups_counts_them_instead_of_an_empty_table(tmp_path):
    write_wells(tmp_path / "wells.csv", groups=4, counts=[30, 30, 3, 30])
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(config(tmp_path, ALL_PER_GROUP)), "--run-dir", str(run)]
    )
    assert result.exit_code == 1, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("groups "))
    assert line.split(None, 1)[1] == ("4: 3 converged, 1 failed; per group (a, b, c) in groups.csv")
    assert "parameter" not in result.output  # no table without shared parameters


def assert_plot_redraws(run: Path) -> dict:
    """`fitcli plot RUN_DIR` after the run's pages are deleted draws them again byte for byte;
    returns them (path relative to the run: bytes)."""
    pages = sorted(p.relative_to(run) for p in run.rglob("*.html"))
    before = {p: (run / p).read_bytes() for p in pages}
    for p in pages:
        (run / p).unlink()
    plotted = runner.invoke(app, ["plot", str(run)])
    assert plotted.exit_code == 0, plotted.output
    assert sorted(p.relative_to(run) for p in run.rglob("*.html")) == pages
    assert {p: (run / p).read_bytes() for p in pages} == before
    return before


def test_fitcli_plot_rebuilds_a_grouped_runs_pages_as_train_wrote_them(tmp_path):
    # `fitcli plot RUN_DIR` of a grouped run said its data.csv was garbled; it now draws the
    # report and snapshots again from the run directory, byte for byte what train wrote.
    write_wells(tmp_path / "wells.csv", groups=6, n=25, seed=3)
    for params in (ALL_PER_GROUP, {"a": {"value": 2, "per_group": True}, "b": 0.8, "c": 0.2}):
        result, run = train(config(tmp_path, params), tmp_path, "--overwrite")
        assert result.exit_code == 0, result.output
        before = assert_plot_redraws(run)
        elsewhere = tmp_path / "out" / "page.html"
        elsewhere.parent.mkdir(exist_ok=True)
        plotted = runner.invoke(app, ["plot", str(run), "--out", str(elsewhere)])
        assert plotted.exit_code == 0, plotted.output
        # The same page, its links to the snapshot pages made relative to where it is.
        page = elsewhere.read_text(encoding="utf-8")
        links = re.findall(r'<a href="([^"]+)"', page)
        assert links and all((elsewhere.parent / link).resolve().is_file() for link in links)
        assert {(elsewhere.parent / link).resolve() for link in links} == {
            p.resolve() for p in (run / "snapshots").glob("*.html")
        }
        target = os.path.relpath(run / "snapshots", elsewhere.parent)
        own = before[Path("report.html")].decode("utf-8")
        assert page == own.replace('href="snapshots/', f'href="{target}/')
        assert (elsewhere.parent / "plotly.min.js").is_file()
        elsewhere.unlink()
    # Comparisons and static figures take single runs: said plainly, exit 2.
    compared = runner.invoke(app, ["plot", str(run), str(run), "--out", str(tmp_path / "c.html")])
    assert compared.exit_code == 2 and "grouped run" in compared.output


def test_a_large_grouped_data_file_is_referenced_not_copied(tmp_path, monkeypatch):
    # As for single runs: above files.DATA_CSV_MAX_ROWS rows (here lowered to 50) the data file
    # is the run's data, named in summary.json with its size and digest; `fitcli plot` reads it
    # again and draws the pages train wrote; --copy-data copies it into data.csv; a changed or
    # missing file is named (exit 2), and resume keeps the form.
    from fitcli.config import load_config
    from fitcli.experiment import execute
    from fitcli.prepare import prepare
    from fitcli.rundir import files as store

    monkeypatch.setattr(store, "DATA_CSV_MAX_ROWS", 50)
    data = tmp_path / "wells.csv"
    write_wells(data, groups=4, n=20, seed=2)
    cfg = config(tmp_path, ALL_PER_GROUP)
    result, run = train(cfg, tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert not (run / "data.csv").exists()
    assert summary["data_file"] == {"path": str(data.resolve()), "size": data.stat().st_size}
    assert summary["data_digest"].startswith("sha256:")
    copied = tmp_path / "copied"
    again = runner.invoke(app, ["train", str(cfg), "--run-dir", str(copied), "--copy-data"])
    assert again.exit_code == 0, again.output
    assert (copied / "data.csv").is_file()
    assert "data_file" not in json.loads((copied / "summary.json").read_text())
    assert read_groups(copied) == read_groups(run)
    assert_plot_redraws(run)
    text = data.read_text()
    data.write_text(text.replace("w3", "w9"))  # the same size, other content
    plotted = runner.invoke(app, ["plot", str(run)])
    assert plotted.exit_code == 2 and "changed since the run read it" in plotted.output
    assert str(data.resolve()) in plotted.output
    data.unlink()
    plotted = runner.invoke(app, ["plot", str(run)])
    assert plotted.exit_code == 2 and "missing; put it back" in plotted.output
    data.write_text(text)
    stopped = tmp_path / "stopped"
    prep = prepare(load_config(cfg))
    stopped.mkdir()
    execute(prep, stopped, command=["test"], on_epoch=lambda epoch, loss: epoch >= 2)
    resumed = runner.invoke(app, ["train", "--resume", str(stopped), "--copy-data"])
    assert resumed.exit_code == 0, resumed.output
    assert not (stopped / "data.csv").exists()
    assert "data_file" in json.loads((stopped / "summary.json").read_text())
    assert read_groups(stopped) == read_groups(run)


@pytest.mark.parametrize("agrees", [True, False])
def test_a_run_checks_its_compiled_fit_at_the_set_up(tmp_path, monkeypatch, agrees):
    # The translation's check against autograd is part of preparing a run (not of fit_s): a
    # program that disagrees is dropped there, and the groups are fitted by the batched program.
    from fitcli import lm_jit
    from fitcli.config import load_config
    from fitcli.prepare import prepare

    if not lm_jit.available():
        pytest.skip("numba is not installed")
    monkeypatch.setenv("FITCLI_JIT", "1")
    monkeypatch.setattr(groups, "_AGREES", {})
    if not agrees:
        monkeypatch.setattr(groups, "_agrees", lambda *args: False)
    write_wells(tmp_path / "wells.csv", groups=4, n=20, seed=3)
    prep = prepare(load_config(config(tmp_path, ALL_PER_GROUP)))
    assert (prep.program is not None) is agrees
    assert len(groups._AGREES) == 1


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("with_sigma", [False, True])
@pytest.mark.parametrize("length", [None, 16])
def test_packing_groups_of_equal_size_in_order_equals_the_general_packing(k, with_sigma, length):
    # Rows already grouped, every group the same size: `pack` reshapes instead of scattering
    # each row; the result is the general path's, bit for bit (one and two variables, with
    # pads to a longer length or none).
    rng = np.random.default_rng(4)
    g, n = 7, 13
    x = rng.normal(size=(g * n, k)) if k > 1 else rng.normal(size=g * n)
    y = rng.normal(size=g * n)
    sigma = rng.uniform(0.5, 2.0, g * n) if with_sigma else None
    label = np.repeat(np.arange(g), n)
    fast = groups.pack(x, y, sigma, label, g, torch.float64, torch.device("cpu"), length)
    counts = np.bincount(label, minlength=g)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    general = groups._pack_rows(x, y, sigma, label, counts, length or n, t)
    assert fast.w.shape == (g, length or n)
    for a, b in ((fast.x, general.x), (fast.wy, general.wy), (fast.w, general.w)):
        assert a.shape == b.shape and torch.equal(a, b)
    np.testing.assert_array_equal(fast.counts, general.counts)
    # and the layout the compiled fit reads: each variable's column contiguous
    assert groups._arrays(fast)[0].shape == ((g, length or n) if k == 1 else (g, k, length or n))
