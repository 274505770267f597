"""Scale: mini-batches, LM's bounded chunks, cheap snapshots, data at size, and CUDA parity.

Kept small for CI (at most 10^5 points); benchmarks/scale.py measures 10^3 to 10^7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fitcli import data, experiment, lm, prepare
from fitcli.config import config_from_dict
from fitcli.errors import ConfigError

TARGET = "90*exp(-0.01*x) + 100*exp(-(x-110)**2/25**2)"
MODEL = "a*exp(-b*x) + c*exp(-(x-d)**2/s**2)"
START = {"a": 80, "b": 0.02, "c": 90, "d": 100, "s": 20}


def config(n: int = 2000, **over) -> dict:
    cfg = {
        "name": "scale",
        "seed": 3,
        "epochs": 5,
        "snapshots": 1,
        "device": "cpu",
        "data": {"target": TARGET, "x": {"start": 0, "stop": 250, "num": n}, "noise": {"std": 2}},
        "model": {"expr": MODEL, "params": dict(START)},
        "optimizer": {"name": "Adam", "lr": 0.01},
    }
    cfg.update(over)
    return cfg


def train_params(cfg: dict) -> tuple[list[float], list[float]]:
    prep = prepare.prepare(config_from_dict(cfg))
    losses = [float(prep.stepper.step()) for _ in range(cfg["epochs"])]
    return list(prep.model.values().values()), losses


def test_minibatch_shuffle_is_deterministic_under_the_seed():
    cfg = config(batch_size=256)
    p1, l1 = train_params(cfg)
    p2, l2 = train_params(cfg)
    assert p1 == p2 and l1 == l2  # bit for bit
    p3, _ = train_params({**cfg, "seed": 4})
    assert p3 != p1
    full, _ = train_params(config())
    assert full != p1  # mini-batches really take more, different steps


def test_minibatch_basis_model_indexes_the_cached_design(monkeypatch):
    cfg = config(
        model={"basis": ["1", "x", "x**2"], "init": [0, 0, 0]},
        optimizer={"name": "SGD", "lr": 1e-9},
        batch_size=100,
    )
    prep = prepare.prepare(config_from_dict(cfg))
    phi = prep.model.design(prep.x)

    def boom(x):
        raise AssertionError("a basis function was re-evaluated for a mini-batch")

    monkeypatch.setattr(prep.model, "basis", [boom] * len(prep.model.basis))
    prep.stepper.step()
    prep.stepper.step()
    assert prep.model.design(prep.x) is phi  # the design matrix is built once, not per batch


def test_mean_of_batch_losses_equals_full_loss_at_zero_lr():
    cfg = config(optimizer={"name": "SGD", "lr": 0.0}, batch_size=300, epochs=1)
    prep = prepare.prepare(config_from_dict(cfg))
    batched = float(prep.stepper.step())
    assert batched == pytest.approx(prep.evaluate_loss(), rel=1e-12)


def test_lm_rejects_batch_size():
    cfg = config(optimizer={"name": "LM"}, batch_size=100)
    with pytest.raises(ConfigError, match="batch_size: LevenbergMarquardt works on the full batch"):
        prepare.prepare(config_from_dict(cfg))


def test_lm_chunks_bound_the_jacobian_and_match_one_chunk():
    n = 100_000
    x = torch.linspace(0, 250, n, dtype=torch.float64)
    rng = np.random.default_rng(0)
    y = 90 * torch.exp(-0.01 * x) + 100 * torch.exp(-(((x - 110) / 25) ** 2))
    y = y + torch.from_numpy(rng.normal(0, 2, n))

    def fn(th, x):
        return th[0] * torch.exp(-th[1] * x) + th[2] * torch.exp(-((x - th[3]) ** 2) / th[4] ** 2)

    theta = torch.tensor([80, 0.02, 90, 100, 20], dtype=torch.float64)
    size = lm.default_chunk_size(5)
    assert size * 5 * 8 <= 4_000_000 + 40  # one chunk's Jacobian stays near 4 MB on the CPU
    assert lm.default_chunk_size(5, torch.device("cuda")) * 5 * 8 <= 64_000_000 + 40
    seen = []
    real = lm._jacobian_and_residual

    def spy(fn, theta, x, y, w, rowwise=False):
        seen.append(x.shape[0])
        return real(fn, theta, x, y, w, rowwise)

    lm._jacobian_and_residual = spy
    try:
        chunked = lm.jtj_jtr(fn, theta, x, y, chunk_size=4096)
    finally:
        lm._jacobian_and_residual = real
    assert max(seen) == 4096 and sum(seen) == n
    whole = lm.jtj_jtr(fn, theta, x, y, chunk_size=n)
    # Same sums in another order: equal to rounding, relative to the largest entry.
    scale = whole[0].abs().max()
    # (plain comparisons: torch.testing would import the torch._dynamo that fitcli defers)
    assert float((chunked[0] - whole[0]).abs().max()) <= 1e-12 * float(scale)
    assert float((chunked[1] - whole[1]).abs().max()) <= 1e-10 * float(whole[1].abs().max())
    assert chunked[2] == pytest.approx(whole[2], rel=1e-12)


def test_snapshots_do_not_grow_with_n(tmp_path):
    sizes = {}
    for n in (1_000, 100_000):
        cfg = config(n, epochs=2, snapshots=1, name=f"n{n}")
        prep = prepare.prepare(config_from_dict(cfg))
        run = tmp_path / f"run{n}"
        run.mkdir()
        experiment.execute(prep, run, plotlyjs="cdn", command=["test"])
        pages = sorted((run / "snapshots").glob("*.html"))
        sizes[n] = max(p.stat().st_size for p in pages)
        assert (run / "data.csv").stat().st_size > n * 20  # data.csv does hold every point
    # 4000 drawn points per trace at most: 10^5 points give a page about as big as 4000 would
    assert sizes[100_000] < 2.5 * sizes[1_000] + 400_000
    assert sizes[100_000] < 1_000_000


def test_unsorted_data_file_is_sorted_once_for_snapshots(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, 500)
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{a!r},{2 * a!r}\n" for a in x.tolist()))
    cfg = config(data={"file": str(path)}, model={"expr": "k*x", "params": {"k": 1}})
    prep = prepare.prepare(config_from_dict(cfg))
    writer = experiment.RunWriter(tmp_path, prep, "cdn")
    xs, ys, yt = writer.obs
    assert np.all(np.diff(xs) >= 0) and np.array_equal(ys, 2 * xs) and yt is None
    assert np.array_equal(prep.dataset.x, x)  # the data set itself stays in file order


def test_synthetic_data_is_chunk_invariant(monkeypatch):
    cfg = config_from_dict(config(10_001))
    ref = data.make_dataset(cfg)
    monkeypatch.setattr(data, "EVAL_CHUNK", 1000)
    chunked = data.make_dataset(cfg)
    np.testing.assert_array_equal(ref.y_true, chunked.y_true)
    np.testing.assert_array_equal(ref.y, chunked.y)
    # noise added in place equals y_true + noise
    rng = np.random.default_rng(data.seed_streams(3)["noise"])
    np.testing.assert_array_equal(ref.y, ref.y_true + rng.normal(0, 2, 10_001))


def test_float64_tensors_share_the_dataset_memory():
    prep = prepare.prepare(config_from_dict(config(5000)))
    assert prep.x.data_ptr() == prep.dataset.x.ctypes.data  # no copy on the CPU in float64
    assert prep.y.data_ptr() == prep.dataset.y.ctypes.data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", [{"name": "LM"}, {"name": "Adam", "lr": 0.01}])
def test_cuda_agrees_with_cpu(optimizer, tmp_path: Path):
    results = {}
    for device in ("cpu", "cuda"):
        cfg = config(20_000, device=device, optimizer=optimizer, epochs=20)
        prep = prepare.prepare(config_from_dict(cfg))
        assert prep.x.device.type == device and prep.model.raw.device.type == device
        run = tmp_path / device
        run.mkdir()
        summary = experiment.execute(prep, run, plotlyjs="cdn", command=["test"])
        results[device] = summary["params"]
    for name, value in results["cpu"].items():
        assert results["cuda"][name] == pytest.approx(value, rel=1e-9), name


# -- full batches in chunks of rows (train.FULL_BATCH_CHUNK_BYTES) ----------------------------


def _chunked_and_whole(monkeypatch, cfg: dict):
    """(params, losses) of the same run with chunks of 500 rows and in one piece."""
    from fitcli import train as train_mod

    whole = train_params(cfg)
    monkeypatch.setattr(train_mod, "FULL_BATCH_CHUNK_BYTES", 500 * 8)
    prep = prepare.prepare(config_from_dict(cfg))
    assert prep.stepper.chunk_rows == 500
    losses = [float(prep.stepper.step()) for _ in range(cfg["epochs"])]
    return (list(prep.model.values().values()), losses), whole


@pytest.mark.parametrize(
    "over",
    [
        {"optimizer": {"name": "Adam", "lr": 0.01}},
        {"optimizer": {"name": "SGD", "lr": 1e-7}, "loss": "huber"},
        {"optimizer": {"name": "LBFGS", "lr": 0.1}, "epochs": 3},
        {
            "model": {
                "expr": MODEL,
                "params": {
                    **START,
                    "a": {"value": 80, "min": 0, "max": 200},
                    "d": {"value": 100, "vary": False},
                },
            }
        },
        {"model": {"basis": ["1", "x", "exp(-x/50)"], "init": [0, 0, 1]}, "loss": "l1"},
    ],
    ids=["adam", "sgd-huber", "lbfgs", "bounds-fixed", "basis-l1"],
)
def test_full_batch_in_chunks_takes_the_same_steps(monkeypatch, over):
    (p_chunk, l_chunk), (p_whole, l_whole) = _chunked_and_whole(monkeypatch, config(2100, **over))
    # The same gradient summed in another order: equal to rounding, step after step.
    np.testing.assert_allclose(l_chunk, l_whole, rtol=1e-10)
    np.testing.assert_allclose(p_chunk, p_whole, rtol=1e-9)


def test_full_batch_in_chunks_with_sigma_weights(monkeypatch, tmp_path):
    xs = np.linspace(0, 250, 1500)
    ys = 90 * np.exp(-0.01 * xs) + 100 * np.exp(-((xs - 110) ** 2) / 25**2)
    sig = 1 + xs / 100
    path = tmp_path / "w.csv"
    path.write_text(
        "x,y,s\n"
        + "".join(
            f"{a!r},{b!r},{c!r}\n"
            for a, b, c in zip(xs.tolist(), ys.tolist(), sig.tolist(), strict=True)
        )
    )
    cfg = config(data={"file": str(path), "columns": {"x": "x", "y": "y", "sigma": "s"}})
    (p_chunk, l_chunk), (p_whole, l_whole) = _chunked_and_whole(monkeypatch, cfg)
    np.testing.assert_allclose(l_chunk, l_whole, rtol=1e-10)
    np.testing.assert_allclose(p_chunk, p_whole, rtol=1e-9)


def test_chunks_only_for_large_full_batches_on_the_cpu():
    from fitcli.train import full_batch_chunk_rows

    cpu = torch.device("cpu")
    rows64 = full_batch_chunk_rows(10**7, torch.float64, cpu)
    assert rows64 is not None and rows64 * 8 == 2 * 2**20
    assert full_batch_chunk_rows(10**7, torch.float32, cpu) == 2 * rows64  # same bytes
    assert full_batch_chunk_rows(rows64, torch.float64, cpu) is None  # one chunk's worth
    assert full_batch_chunk_rows(10**7, torch.float64, torch.device("cuda")) is None
    prep = prepare.prepare(config_from_dict(config(2000, batch_size=100)))
    assert prep.stepper.chunk_rows is None  # mini-batches are small already
