"""fitcli train against the tutorial's plain script, side by side in one run.

    .venv/bin/python benchmarks/train_speed.py [--reps 7] [--write]

Measures (ratios are what to read; this machine is noisy):
1. whole-process wall time of `fitcli train configs/seed.yaml` vs `benchmarks/tutorial_baseline.py`
   (target: at most 0.6x);
2. bytes written per run (target: at most 1/8 of the baseline's);
3. time per epoch of fitcli's training loop vs a bare loop doing the same math in the same
   process (target: at most 1.15x);
4. `fitcli --help` and `fitcli --version` vs `python -c "import torch"` (target: at most 0.25x).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, ROOT, alternate, dir_bytes, machine, median, record  # noqa: E402

PY = sys.executable
FITCLI = str(BIN / "fitcli")
SEED = str(ROOT / "configs" / "seed.yaml")


def whole_process(reps: int, tmp: Path) -> dict:
    cmds = {
        "baseline": [PY, str(ROOT / "benchmarks" / "tutorial_baseline.py"), str(tmp / "base")],
        "fitcli": [FITCLI, "train", SEED, "--progress", "none", "--out", str(tmp / "runs")],
    }
    times = alternate(cmds, reps)
    base_bytes = dir_bytes(tmp / "base")
    run = next((tmp / "runs").iterdir())
    ours_bytes = dir_bytes(run)
    return {"times": times, "base_bytes": base_bytes, "ours_bytes": ours_bytes}


def loop_timing(epochs: int, reps: int) -> dict:
    """Same process, same data and math: fitcli.train.train with its stepper vs a bare loop."""
    from fitcli.torchboot import import_torch

    torch = import_torch()
    import torch.nn.functional as F

    from fitcli.config import load_config
    from fitcli.experiment import prepare
    from fitcli.train import train

    cfg = load_config(SEED, [f"epochs={epochs}"])

    def ours() -> float:
        prep = prepare(cfg)
        t = time.perf_counter()
        train(
            prep.model,
            prep.stepper,
            epochs=epochs,
            evaluate_loss=prep.evaluate_loss,
            snapshots_at=[],
            on_epoch=lambda e, loss: False,
        )
        return (time.perf_counter() - t) / epochs

    def bare(matmul: bool = False) -> float:
        # The same math as fitcli's basis model: yhat = sum_k theta_k * b_k(x) over the cached
        # design matrix, by broadcast-multiply and row sum (what `model.rows_dot` does); with
        # matmul=True, the textbook `phi @ theta` instead (torch.mv), for reference.
        prep = prepare(cfg)
        phi = prep.model.design(prep.x)
        phi_t = phi.T.contiguous()
        y = prep.y
        theta = torch.nn.Parameter(prep.model.raw.detach().clone())
        opt = torch.optim.SGD([theta], lr=0.01)
        t = time.perf_counter()
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            yhat = phi @ theta if matmul else (phi_t * theta[:, None]).sum(-2)
            loss = F.mse_loss(yhat, y)
            loss.backward()
            opt.step()
        loss.item()
        return (time.perf_counter() - t) / epochs

    ours(), bare(), bare(True)  # warm up
    o, b, m = [], [], []
    for _ in range(reps):
        o.append(ours())
        b.append(bare())
        m.append(bare(True))
    return {"ours": o, "bare": b, "bare_mv": m}


def startup(reps: int) -> dict:
    cmds = {
        "import torch": [PY, "-c", "import torch"],
        "fitcli --help": [FITCLI, "--help"],
        "fitcli --version": [FITCLI, "--version"],
    }
    return alternate(cmds, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=5000)
    ap.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fitcli-bench-"))
    try:
        wp = whole_process(args.reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lt = loop_timing(args.epochs, args.reps)
    st = startup(args.reps)

    base_t, ours_t = median(wp["times"]["baseline"]), median(wp["times"]["fitcli"])
    bare_e, ours_e, mv_e = median(lt["bare"]), median(lt["ours"]), median(lt["bare_mv"])
    torch_t = median(st["import torch"])
    help_t, ver_t = median(st["fitcli --help"]), median(st["fitcli --version"])
    rows = [
        (
            "whole process, seed config",
            f"{base_t:.2f} s (tutorial script)",
            f"{ours_t:.2f} s",
            ours_t / base_t,
            "<= 0.60",
        ),
        (
            "bytes written per run",
            f"{wp['base_bytes'] / 1e6:.1f} MB",
            f"{wp['ours_bytes'] / 1e6:.2f} MB",
            wp["ours_bytes"] / wp["base_bytes"],
            "<= 0.125",
        ),
        (
            f"time per epoch ({args.epochs} epochs)",
            f"{bare_e * 1e6:.1f} µs (bare loop)",
            f"{ours_e * 1e6:.1f} µs",
            ours_e / bare_e,
            "<= 1.15",
        ),
        (
            "time per epoch, bare loop with `phi @ theta`",
            f"{mv_e * 1e6:.1f} µs (torch.mv)",
            f"{ours_e * 1e6:.1f} µs",
            ours_e / mv_e,
            "(reference)",
        ),
        (
            "`fitcli --help`",
            f"{torch_t:.2f} s (`import torch`)",
            f"{help_t:.3f} s",
            help_t / torch_t,
            "<= 0.25",
        ),
        (
            "`fitcli --version`",
            f"{torch_t:.2f} s (`import torch`)",
            f"{ver_t:.3f} s",
            ver_t / torch_t,
            "<= 0.25",
        ),
    ]
    lines = [
        "## fitcli train",
        "",
        f"Command: `.venv/bin/python benchmarks/train_speed.py --reps {args.reps} --write` "
        f"(medians of {args.reps} interleaved repetitions; {machine()}).",
        "",
        "| measure | baseline | fitcli | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for name, base, ours, ratio, target in rows:
        lines.append(f"| {name} | {base} | {ours} | {ratio:.3f} | {target} |")
    lines += [
        "",
        "The baseline is `benchmarks/tutorial_baseline.py`: the tutorial's numpy/torch data, "
        "a bare SGD loop and 11 plotly figures written with `write_html` and plotly.js "
        "embedded in each. "
        "fitcli writes plotly.js once per run directory and snapshots as compact figure dicts; it "
        "defers `torch._dynamo` (which every `torch.optim` step imports, about as costly as "
        "importing torch, for wrappers that do nothing outside `torch.compile`; see "
        "`src/fitcli/torchboot.py`). The per-epoch comparison runs `fitcli.train.train` with its "
        "stepper (loss read back every epoch for divergence detection, history, callback) against "
        "a bare `zero_grad / mse_loss(yhat) / backward / step` loop on the same tensors, where "
        "yhat is the same broadcast-multiply-and-row-sum over the cached design matrix that "
        "fitcli's basis model uses (it matches batched sweeps to the last bit, and on 2 busy "
        "cores beats `torch.mv`, whose threaded backward contends for them; the `phi @ theta` "
        "row shows that textbook loop for reference).",
    ]
    text = "\n".join(lines)
    print(text)
    print(
        "\nraw:",
        {
            "whole": wp["times"],
            "loop_us": {k: [v * 1e6 for v in vs] for k, vs in lt.items()},
            "startup": st,
        },
    )
    if args.write:
        record("train", text)


if __name__ == "__main__":
    main()
