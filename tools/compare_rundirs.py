"""Compare the run directories two versions of fitcli write for the shipped configs.

    python tools/compare_rundirs.py --base 10a9be6            # base commit vs this working tree
    python tools/compare_rundirs.py --base 10a9be6 --allow-new converged,process

Each version (the base commit, exported with `git archive`, and this working tree) trains every
shipped config with `fitcli train --run-dir` and runs one small sweep, each in its own process
with that version's `src/` first on PYTHONPATH. Then every file of every run directory is
compared, apart from what records time, versions and the command line (the summary's
`elapsed_s`, `started_at`, `finished_at`, `command`, `run_dir`, version fields, `process`;
metrics.csv's `elapsed_s` column; state.json's elapsed history; config.yaml's comment lines;
the tree's own path in a data file's absolute path).
Summary keys only in the new version are listed, and are a difference unless `--allow-new`
names them. Exit 0 when the run directories are identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = {
    "run_dir",
    "elapsed_s",
    "started_at",
    "finished_at",
    "command",
    "fitcli_version",
    "torch_version",
    "python_version",
    "process",
}
# A quick sweep over the seed config: batched SGD runs, one run directory each.
SWEEP = ["configs/seed.yaml", "seed=0,1", "epochs=60", "snapshots=3"]


def export(rev: str, dest: Path) -> Path:
    """The tree of `rev` under `dest` (git archive: no worktree is registered)."""
    archive = dest / "base.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def fitcli(tree: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "COLUMNS": "120"}
    res = subprocess.run(
        [sys.executable, "-m", "fitcli.cli", *args, "--progress", "none"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode not in (0, 3):  # a diverging shipped config is still a run to compare
        raise SystemExit(f"{tree}: fitcli {' '.join(args)} exited {res.returncode}:\n{res.stderr}")


def make_runs(tree: Path, out: Path) -> dict[str, Path]:
    """Run directories by label: one per shipped config, one per run of the sweep."""
    runs: dict[str, Path] = {}
    for cfg in sorted((tree / "configs").glob("*.yaml")):
        target = out / f"train-{cfg.stem}"
        fitcli(tree, "train", str(cfg.relative_to(tree)), "--run-dir", str(target))
        runs[f"train {cfg.name}"] = target
    fitcli(tree, "sweep", *SWEEP, "--out", str(out / "sweep"))
    (sweep_dir,) = (out / "sweep").iterdir()
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        runs[f"sweep {run.name}"] = run
    return runs


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def normalised(path: Path, rel: str, tree: Path) -> object:
    # A data file's absolute path names the tree it was run from.
    data = path.read_bytes().replace(str(tree).encode(), b"<TREE>")
    if rel == "summary.json":
        return {k: v for k, v in json.loads(data).items() if k not in VOLATILE}
    if rel == "config.yaml":
        return b"\n".join(ln for ln in data.split(b"\n") if not ln.startswith(b"#"))
    if rel == "metrics.csv":
        header = data.split(b"\n", 1)[0].split(b",")
        drop = header.index(b"elapsed_s") if b"elapsed_s" in header else -1
        return b"\n".join(
            b",".join(c for i, c in enumerate(ln.split(b",")) if i != drop)
            for ln in data.split(b"\n")
        )
    if rel == "state.json":
        doc = json.loads(data)
        doc.get("history", {}).pop("elapsed", None)
        return doc
    return data


def compare(
    label: str, a: Path, b: Path, trees: tuple[Path, Path], allow_new: set[str]
) -> list[str]:
    problems = []
    fa, fb = files(a), files(b)
    if fa != fb:
        problems.append(
            f"{label}: files only in base {sorted(set(fa) - set(fb))}, "
            f"only in new {sorted(set(fb) - set(fa))}"
        )
    for rel in sorted(set(fa) & set(fb)):
        na, nb = normalised(a / rel, rel, trees[0]), normalised(b / rel, rel, trees[1])
        if rel == "summary.json":
            assert isinstance(na, dict) and isinstance(nb, dict)
            new = sorted(set(nb) - set(na))
            if new:
                print(f"{label}: summary.json keys only in new: {new}")
            gone = sorted(set(na) - set(nb))
            if gone:
                problems.append(f"{label}: summary.json lost keys {gone}")
            for k in new:
                if k not in allow_new:
                    problems.append(f"{label}: summary.json new key {k!r} (not allowed)")
            for k in sorted(set(na) & set(nb)):
                if na[k] != nb[k]:
                    problems.append(f"{label}: summary.json {k}: {na[k]!r} -> {nb[k]!r}")
        elif na != nb:
            problems.append(f"{label}: {rel} differs")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare against")
    ap.add_argument("--allow-new", default="", help="comma-separated new summary keys to accept")
    ap.add_argument("--keep", type=Path, help="write the run directories here (else a temp dir)")
    args = ap.parse_args()
    allow = {k for k in args.allow_new.split(",") if k}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base_tree = export(args.base, Path(tmp))
        base = make_runs(base_tree, work / "base")
        new = make_runs(ROOT, work / "new")
        problems = []
        if sorted(base) != sorted(new):
            problems.append(f"runs differ: base {sorted(base)}, new {sorted(new)}")
        for label in sorted(set(base) & set(new)):
            problems += compare(label, base[label], new[label], (base_tree, ROOT), allow)
    for p in problems:
        print(p)
    print(f"{len(base)} run directories compared: " + ("identical" if not problems else "DIFFER"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
