"""The run directory: the one owner of what a run directory holds and how it is written and read.

- `files`: file names, atomic writes, the checked opener (`read_run_file`), and claiming,
  creating and installing run directories (torch-free).
- `reader`: `read_run`, which reads and validates every file of a run directory into a `Run`
  (with its `Snapshot`s), and `summary_problem`, the check a listed summary.json must pass
  (torch-free).
- `summary`: `Summary`, summary.json typed, every field with its meaning (torch-free).
- `state`: the state.json codec: tensors and Python values as plain JSON, saved and loaded
  checked (torch-free at import). Resuming from it is `fitcli.resume`'s.
- `writer`: `RunWriter`, which writes a run directory as it trains, and the summary builders
  (`base_summary`); imports torch, so it is not imported here.

Callers import the modules (`from fitcli.rundir import files`, then `files.atomic_write`), so a
test that patches `files.X` reaches every caller; the package re-exports the reader's names.
"""

from fitcli.rundir.reader import Run, Snapshot, read_run, summary_problem
from fitcli.rundir.summary import Summary

__all__ = ["Run", "Snapshot", "Summary", "read_run", "summary_problem"]
