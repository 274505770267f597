"""Every shipped config validates and opens with a comment showing how to run it."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from fitcli.config import load_config

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.stem for p in SHIPPED}
    assert "seed" in names and len(names) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    from fitcli.prepare import prepare

    cfg = load_config(path)
    prep = prepare(cfg)
    assert prep.dataset.n >= 2
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert f"fitcli train configs/{path.name}" in path.read_text()


def test_seed_is_the_tutorial():
    cfg = load_config(CONFIGS / "seed.yaml")
    assert cfg.data.target == "1.5*sin(x) + 1.2*cos(x/4)"
    assert (cfg.data.x.start, cfg.data.x.stop, cfg.data.x.num) == (-10, 10, 1000)
    assert cfg.data.noise.std == 1.0
    assert cfg.model.basis == ["x", "sin(x)", "cos(x/4)"]
    assert cfg.loss == "mse" and cfg.epochs == 500 and cfg.snapshots == 10
    assert cfg.optimizer.name == "SGD" and cfg.optimizer.model_extra == {"lr": 0.01}
