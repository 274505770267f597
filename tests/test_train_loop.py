"""The training loop on its own: snapshots schedule, divergence, interruption, optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from fitcli.config import config_from_dict
from fitcli.prepare import prepare
from fitcli.train import snapshot_epochs, train


def make(changes: dict | None = None):
    raw = {
        "device": "cpu",
        "epochs": 30,
        "data": {
            "target": "2*x + 1",
            "x": {"start": -1, "stop": 1, "num": 50},
            "noise": {"std": 0.1},
        },
        "model": {"expr": "a*x + b", "params": {"a": 0.0, "b": 0.0}},
        "optimizer": {"name": "Adam", "lr": 0.1},
    }
    raw.update(changes or {})
    return prepare(config_from_dict(raw))


def run(prep, epochs=30, **kw):
    return train(prep.model, prep.stepper, epochs=epochs, evaluate_loss=prep.evaluate_loss, **kw)


@pytest.mark.parametrize(
    ("epochs", "snapshots", "expect"),
    [
        (500, 10, [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500]),
        (7, 3, [0, 2, 5, 7]),
        (3, 10, [0, 1, 2, 3]),
        (1, 1, [0, 1]),
    ],
)
def test_snapshot_epochs(epochs, snapshots, expect):
    assert snapshot_epochs(epochs, snapshots) == expect


def test_callbacks_and_history():
    prep = make()
    seen, snaps = [], []
    result = run(
        prep,
        snapshots_at=[0, 10, 20, 30],
        on_epoch=lambda e, loss: seen.append(e) or False,
        on_snapshot=lambda e, loss: snaps.append((e, loss)),
    )
    assert result.status == "completed" and result.epochs_run == 30
    assert seen == list(range(1, 31))
    assert [e for e, _ in snaps] == [0, 10, 20, 30]
    assert len(result.history.losses) == 31
    assert result.history.losses[-1] == result.final_loss == snaps[-1][1]
    assert result.history.losses[0] > result.final_loss


def test_interrupt_stops_after_the_current_epoch():
    prep = make()
    result = run(prep, on_epoch=lambda e, loss: e == 7)
    assert result.status == "interrupted" and result.epochs_run == 7
    assert len(result.history.losses) == 8


def test_divergence_restores_the_last_finite_state():
    prep = make({"optimizer": {"name": "SGD", "lr": 1e6}})
    result = run(prep, epochs=100)
    assert result.status == "diverged"
    assert math.isfinite(result.final_loss)
    assert all(math.isfinite(v) for v in prep.model.values().values())
    assert result.history.params[-1] == prep.model.raw.tolist()
    assert len(result.history.losses) == result.epochs_run + 1


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LBFGS", "NAdam"])
def test_every_common_optimizer_reduces_the_loss(name):
    lr = {"SGD": 0.1, "LBFGS": 1.0, "Adagrad": 0.5}.get(name, 0.05)
    prep = make({"optimizer": {"name": name, "lr": lr}})
    result = run(prep, epochs=40)
    assert result.status == "completed"
    assert result.final_loss < 0.5 * result.history.losses[0]


def test_lbfgs_reaches_the_least_squares_optimum():
    prep = make({"optimizer": {"name": "LBFGS", "lr": 1, "line_search_fn": "strong_wolfe"}})
    run(prep, epochs=10)
    x, y = prep.x, prep.y
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    best = torch.linalg.lstsq(design, y[:, None]).solution.squeeze()
    v = prep.model.values()
    assert v["a"] == pytest.approx(float(best[0]), abs=1e-5)
    assert v["b"] == pytest.approx(float(best[1]), abs=1e-5)


def test_schedulers_change_the_learning_rate():
    prep = make(
        {
            "optimizer": {"name": "SGD", "lr": 0.1},
            "scheduler": {"name": "StepLR", "step_size": 10, "gamma": 0.5},
        }
    )
    result = run(prep, epochs=30)
    assert result.history.lrs[0] == 0.1 and result.history.lrs[10] == 0.05
    assert result.history.lrs[29] == 0.025
    prep = make({"scheduler": {"name": "ReduceLROnPlateau", "patience": 1}})
    assert run(prep, epochs=20).status == "completed"


def test_mini_batches_are_seeded_and_cover_the_data():
    a = make({"batch_size": 8})
    b = make({"batch_size": 8})
    ra, rb = run(a, epochs=5), run(b, epochs=5)
    assert ra.history.params == rb.history.params
    full = make()
    assert run(full, epochs=5).history.params != ra.history.params


def test_weighted_loss_uses_sigma(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("x,y,err\n0,1,1\n1,3,1\n2,5,100\n3,100,1e6\n")
    prep = prepare(
        config_from_dict(
            {
                "device": "cpu",
                "data": {"file": str(data), "columns": {"sigma": "err"}},
                "model": {"expr": "a*x + b"},
                "optimizer": {"name": "LBFGS", "lr": 1, "line_search_fn": "strong_wolfe"},
            }
        )
    )
    run(prep, epochs=20)
    v = prep.model.values()
    # The outlier at x=3 has a huge sigma: the fit follows the first points.
    assert v["a"] == pytest.approx(2.0, abs=1e-3) and v["b"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = make()
    gpu = make({"device": "cuda"})
    run(cpu), run(gpu)
    c, g = cpu.model.values(), gpu.model.values()
    for k in c:
        assert g[k] == pytest.approx(c[k], rel=1e-10)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"optimizer": {"name": "SGD", "lr": 1e6}},  # diverges mid-window
        {"batch_size": 8, "scheduler": {"name": "StepLR", "step_size": 4, "gamma": 0.5}},
    ],
)
def test_deferred_reads_give_the_same_run(changes):
    """CUDA reads the loss back every 64 epochs, not every epoch; on the CPU, forcing that mode
    must give the very same history, snapshots and final state as reading every epoch."""
    outcomes = []
    for sync_every in (1, 7):
        prep = make(changes)
        snaps, seen = [], []
        result = run(
            prep,
            epochs=30,
            snapshots_at=[0, 10, 20, 30],
            sync_every=sync_every,
            on_epoch=lambda e, loss, seen=seen: seen.append((e, loss)) or False,
            on_snapshot=lambda e, loss, snaps=snaps: snaps.append((e, loss)),
        )
        outcomes.append(
            (
                result.status,
                result.epochs_run,
                result.final_loss,
                result.history.losses,
                result.history.params,
                result.history.lrs,
                snaps,
                seen,
                prep.model.raw.tolist(),
            )
        )
    assert outcomes[0] == outcomes[1]


def test_deferred_reads_stop_at_the_end_of_the_window():
    prep = make()
    result = run(prep, epochs=30, sync_every=7, on_epoch=lambda e, loss: e == 3)
    assert result.status == "interrupted" and result.epochs_run == 7
