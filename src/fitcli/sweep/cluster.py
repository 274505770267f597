"""Dask: the client (connect, probe the scheduler, disconnect), the render tasks that compute and
write runs on a worker and send the files back, and installing them in the sweep directory.
The client side is torch-free: the modules that import torch are imported inside the functions
that run on a worker."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli.rundir import files
from fitcli.sweep.batch import Task, make_tasks, run_task
from fitcli.sweep.plan import SWEEP_FILE, Plan, SweepError
from fitcli.sweep.replay import Trace, write_run
from fitcli.sweep.table import SHARED_JS, run_dir_name

# --------------------------------------------------------------------------------------------
# Rendered runs: run directories written where they are computed, sent back as bytes (Dask)
# --------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A run computed and written on a Dask worker: its summary and its run directory's files.

    `files` maps POSIX paths relative to the run directory to their bytes (a path ending in "/"
    to None: a directory), without the shared plotly.js, which the client links as a local
    sweep does. `summary["run_dir"]` names the worker's scratch folder until the client puts the
    real one in (`install_rendered`).
    """

    trace: Trace  # index, error and timings only: the tensors stay on the worker
    summary: dict | None = None
    files: dict[str, bytes | None] = field(default_factory=dict)


def read_tree(run_dir: Path, skip: Iterable[str] = ()) -> dict[str, bytes | None]:
    """A directory's files as {relative POSIX path: bytes}, its subdirectories as {"sub/": None}."""
    out: dict[str, bytes | None] = {}
    skip = set(skip)
    for top, dirs, names in os.walk(run_dir):
        rel_top = Path(top).relative_to(run_dir).as_posix()
        prefix = "" if rel_top == "." else rel_top + "/"
        dirs.sort()
        for d in dirs:
            out[f"{prefix}{d}/"] = None
        for name in sorted(names):
            rel = prefix + name
            if rel not in skip:
                with open(os.path.join(top, name), "rb") as fh:
                    out[rel] = fh.read()
    return out


def render_task(task: Task, plotlyjs: str) -> list[Rendered]:
    """Compute a task's runs (`run_task`) and render them (`render_traces`): one Dask task."""
    plan = Plan.from_doc(task.plan, SWEEP_FILE)
    preps = {}
    # Imported here: what a worker imports first, paid once per worker process.
    from fitcli.prepare import prepare  # lazy: imports torch

    for i in task.indices:
        with contextlib.suppress(Exception):  # run_task reports it
            preps[i] = prepare(plan.cfg(plan.runs[i]))
    traces = run_task(task, None, preps)
    return render_traces(task.plan, traces, task.indices, plotlyjs, preps)


def render_traces(
    plan_doc: dict,
    traces: Sequence[Trace],
    indices: Sequence[int],
    plotlyjs: str,
    preps: dict | None = None,
) -> list[Rendered]:
    """Write the run directory of each trace among `indices` into a scratch folder of this
    process, the same replay as `write_run`; hand back the files and delete the folder.

    What Dask workers execute: they compute and write in parallel, the client only puts bytes
    in place, and no filesystem is shared. `preps` holds runs' prepared state left untouched
    by a batch computed in this task; other runs are prepared again.
    """
    plan = Plan.from_doc(plan_doc, SWEEP_FILE)
    wanted = set(indices)
    skip = [files.PLOTLY_JS] if plotlyjs == "directory" else []
    out = []
    with tempfile.TemporaryDirectory(prefix="fitcli-render-", dir=_scratch_root()) as scratch:
        for trace in traces:
            if trace.index not in wanted:
                continue
            light = Trace(
                trace.index,
                wall=trace.wall,
                error=trace.error,
                exit_code=trace.exit_code,
                batched=trace.batched,
            )
            if trace.error is not None:
                out.append(Rendered(light))
                continue
            run = plan.runs[trace.index]
            run_dir = Path(scratch) / run_dir_name(plan, run)
            run_dir.mkdir()
            prep = preps.pop(trace.index, None) if preps and trace.batched > 1 else None
            summary = write_run(plan, run, trace, run_dir, plotlyjs, prep)
            out.append(Rendered(light, summary, read_tree(run_dir, skip)))
            shutil.rmtree(run_dir)
    return out


SCRATCH_SHM_FREE = 1 << 28  # bytes free in /dev/shm for a worker to write run directories there


def _scratch_root() -> str | None:
    """Where a worker writes run directories for a moment before sending them: memory
    (/dev/shm) where it has room to spare (a run directory is a few MB, 50 with --plotlyjs
    embed; one at a time), else the temporary folder: faster than a disk folder (BENCHMARKS.md,
    Sweeps)."""
    try:
        st = os.statvfs("/dev/shm")
    except (AttributeError, OSError):  # not Linux, or no /dev/shm
        return None
    room = st.f_bavail * st.f_frsize >= SCRATCH_SHM_FREE
    return "/dev/shm" if room and os.access("/dev/shm", os.W_OK | os.X_OK) else None


def shared_plotly_js(sweep_dir: Path) -> Path:
    """The sweep's one copy of plotly.js that its run directories link to (made if missing)."""
    shared = sweep_dir / SHARED_JS
    if not shared.exists():
        files.atomic_write(shared, files.plotly_js_source().read_bytes())
    return shared


def install_rendered(rendered: Rendered, target: Path, plotlyjs: str) -> dict:
    """Put a rendered run directory in place at `target`, whole or not at all; its summary."""
    assert rendered.summary is not None
    # The summary as `fitcli train` writes it into `target`: the worker wrote its scratch path.
    summary = {**rendered.summary, "run_dir": str(target)}
    contents = {**rendered.files, files.SUMMARY: files.dumps_json(summary).encode("utf-8")}
    links = {}
    if plotlyjs == "directory":
        links[files.PLOTLY_JS] = shared_plotly_js(target.parent)
    files.install_run_dir(target, contents, links, own=True)
    return summary


DASK_HINT = (
    "--scheduler needs Dask distributed, an optional extra: pip install 'fitcli[dask]' "
    "(or pip install 'dask[distributed]')"
)


CONNECT_TIMEOUT_S = 10.0  # to reach a scheduler and hear its handshake


async def _handshake(address: str) -> None:
    """Connect to `address` and read its Dask handshake. Dask's `connect` gives up connecting
    after CONNECT_TIMEOUT_S (OSError); the second more are for the handshake (TimeoutError)."""
    from distributed.comm import connect as comm_connect  # lazy: Dask is an optional extra

    comm = await asyncio.wait_for(
        comm_connect(address, timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S + 1
    )
    await comm.close()


def probe_scheduler(address: str) -> None:
    """A SweepError (exit 2) unless a Dask scheduler answers at a tcp:// `address` in time.

    Dask's own client waits for the handshake without a time limit and decodes whatever comes
    as frame lengths: a port that is silent hangs it for ever, one that sends anything else
    makes it allocate exabytes. So the handshake is heard here first, bounded in time, and any
    failure is a message. (tls:// and other protocols go to the client directly.)
    """
    from distributed.comm.addressing import parse_address  # lazy: Dask is an optional extra

    if parse_address(address)[0] != "tcp":
        return
    try:
        asyncio.run(_handshake(address))
    except TimeoutError:  # before OSError, its base class
        raise SweepError(
            f"{address} is not a Dask scheduler: it accepted the connection but sent no Dask "
            f"handshake within {CONNECT_TIMEOUT_S + 1:g} s"
        ) from None
    except OSError as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever garbage did to the decoder
        raise SweepError(
            f"{address} is not a Dask scheduler: what it sent is not a Dask handshake "
            f"({type(exc).__name__})"
        ) from None


def connect(address: str) -> Any:
    """A Dask client for `address` (`local` starts a two-worker LocalCluster). The command line
    connects before it creates the sweep directory, so an unreachable scheduler leaves nothing."""
    try:
        from dask.distributed import Client, LocalCluster  # lazy: Dask is an optional extra
    except ImportError:
        raise SweepError(DASK_HINT) from None
    if address == "local":
        # The workers run `dask_setup` below as they start (Dask's preload).
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, preload=["fitcli.sweep"]
        )
        client = Client(cluster)
        setattr(client, "_fitcli_cluster", cluster)  # noqa: B010 (closed with the client below)
        return client
    probe_scheduler(address)
    try:
        return Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except OSError as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def dask_setup(worker: Any) -> None:
    """Preload of the local cluster's worker processes (`connect("local")`).

    A Ctrl-C at the terminal reaches them too: they ignore it, and this process decides what it
    does (cancel, write the table, close the cluster). And they end at once when their work is
    done: a Python process that has imported torch takes about 0.4 s to tear its modules down,
    which closing the cluster waits for, at the end of every sweep.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit.register(_exit_now)
    # torch now, as the cluster starts: both workers import it at once, and the first task on
    # each (the client's checks against torch, a batch) does not wait a second for it.
    import fitcli.experiment  # noqa: F401


def _exit_now() -> None:
    # Runs as the worker process exits, after the worker has closed (its directory removed) and
    # multiprocessing has run its own exit function; it skips the teardown of modules and the
    # exit handlers registered before it (Dask's, for clients and clusters a worker has none of).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def dask_available() -> bool:
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return False
    return True


# Runs per Dask render task: a worker computes its share of a batch as one tensor program
# (`run_task`), then renders it in parts of this many runs (`render_traces`), each sent back as
# soon as it is written, so the client writes while the workers still work.
DASK_RENDER_RUNS = 10


def _submit_dask(
    client: Any, plan: Plan, cfgs: dict, indices: Sequence[int], plotlyjs: str
) -> dict[Any, list[int]]:
    """Submit the sweep: {future: the runs it hands back}. A batch's computed traces are held
    by the cluster for its render tasks only: released once they are done or cancelled."""
    n = max(1, len(client.scheduler_info().get("workers", {})))
    parts: dict[Any, list[int]] = {}
    for task in make_tasks(plan, cfgs, indices, n):
        if not task.batch:
            parts[client.submit(render_task, task, plotlyjs, pure=False)] = task.indices
            continue
        traces = client.submit(run_task, task, pure=False)
        for lo in range(0, len(task.indices), DASK_RENDER_RUNS):
            part = task.indices[lo : lo + DASK_RENDER_RUNS]
            fut = client.submit(render_traces, task.plan, traces, part, plotlyjs, pure=False)
            parts[fut] = part
    return parts


def _run_dask(plan, cfgs, indices, options, accept, stop, unfinished) -> None:
    """Runs computed and written on the workers; `accept` puts each one in place here.
    `unfinished` receives the runs that did not come back."""
    client = options.client or connect(options.scheduler)
    try:
        from dask.distributed import wait  # lazy: Dask is an optional extra

        pending = _submit_dask(client, plan, cfgs, indices, options.plotlyjs)
        try:
            while pending and not stop():
                try:
                    # A timeout, so that a Ctrl-C is seen while every task is still running.
                    done = wait(list(pending), timeout=0.2, return_when="FIRST_COMPLETED").done
                except TimeoutError:
                    continue
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    for rendered in fut.result():
                        accept(rendered)
                    del pending[fut]  # released: the worker frees the files
                    if stop():
                        break
        finally:
            unfinished += [i for part in pending.values() for i in part]
            client.cancel(list(pending))
    finally:
        disconnect(client)


def disconnect(client: Any) -> None:
    """Close a client from `connect`, and the local cluster it started, if any."""
    cluster = getattr(client, "_fitcli_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
