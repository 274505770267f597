"""Running a sweep on this machine: in this process, with forked writer processes for a batch's
run directories, or with `--workers N` worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fitcli.errors import (
    RunStatus,
    exit_code_for,
)
from fitcli.sweep.batch import Task, make_tasks, run_task
from fitcli.sweep.replay import Trace, claim_and_write

MAX_WRITERS = 4  # processes writing a batch's run directories (see `writer_processes`)


def _run_here(plan, cfgs, indices, accept, stop, accept_batch=None) -> None:
    for task in make_tasks(plan, cfgs, indices, 1):
        if stop():
            break
        # Imported after the check: torch takes seconds to import, and a Ctrl-C meanwhile must
        # still find the runs started, so that they are written and marked interrupted.
        from fitcli.prepare import prepare  # lazy: imports torch

        preps = {}
        for i in task.indices:
            with contextlib.suppress(Exception):  # run_task reports it
                preps[i] = prepare(cfgs[i])
        traces = run_task(task, stop, preps)
        # A batch leaves its runs' prepared state untouched: the writer reuses it.
        pairs = [(t, preps.pop(t.index, None) if t.batched > 1 else None) for t in traces]
        if accept_batch is not None and _forking_pays([p for _, p in pairs]):
            accept_batch(pairs)
            continue
        for trace, prep in pairs:
            accept(trace, prep)


def writer_processes() -> int:
    """How many processes write a batch's run directories: FITCLI_SWEEP_WRITERS, else one per
    CPU this process may use, at most MAX_WRITERS."""
    env = os.environ.get("FITCLI_SWEEP_WRITERS", "").strip()
    if env.isdigit():
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WRITERS))


def _forking_pays(preps: Sequence[Any]) -> bool:
    """Fork writers for a batch of at least 2 runs per writer, on Linux (fork is safe there for a
    process that uses torch on one thread), with every run below ROW_EXACT_LIMIT points: a
    writer then never enters a parallel region (OpenMP does not survive fork)."""
    from fitcli.model import ROW_EXACT_LIMIT  # lazy: imports torch

    n = writer_processes()
    if n < 2 or len(preps) < 2 * n or not sys.platform.startswith("linux"):
        return False
    return all(p is not None and p.dataset.n < ROW_EXACT_LIMIT for p in preps)


# What forked writers write: set by `_write_forked` just before it forks, read by the children.
_FORKED_JOBS: list[tuple] = []
# Set (shared memory, read without a lock) by the parent just before it ends the writers with
# Pool.terminate's SIGTERM; a SIGTERM without it came from outside (a scheduler signalling the
# whole process group) and is the parent's to act on.
_WRITERS_STOP: Any = None


def _stopped_by_parent(signum: int, frame: Any) -> None:
    if _WRITERS_STOP is not None and not _WRITERS_STOP.value:
        return  # not from the parent: the writer goes on, its run comes back
    raise KeyboardInterrupt  # the run being written is marked interrupted, then the writer ends


def _writer_init() -> None:
    import torch  # lazy: torch-free Dask client, fast CLI start-up

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C does
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and a closed terminal
    signal.signal(signal.SIGTERM, _stopped_by_parent)  # Pool.terminate: a second Ctrl-C, a fault
    torch.set_num_threads(1)
    # The parent's progress thread may have held stderr's lock when it forked: never touch it.
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life


def _write_job(k: int) -> tuple[int, dict | None, Exception | None]:
    try:
        return k, claim_and_write(*_FORKED_JOBS[k]), None
    except Exception as exc:  # re-raised by the parent; KeyboardInterrupt ends this process
        return k, None, exc


def _write_forked(jobs: list[tuple], done: Callable[[int, dict], None]) -> None:
    """`claim_and_write(*job)` for every job in forked processes; `done(k, summary)` here."""
    global _FORKED_JOBS, _WRITERS_STOP
    if not jobs:
        return
    _FORKED_JOBS = jobs
    try:
        ctx = multiprocessing.get_context("fork")
        _WRITERS_STOP = ctx.RawValue("b", 0)
        n = min(writer_processes(), len(jobs))
        pool = ctx.Pool(n, initializer=_writer_init)
        finished = False
        try:
            for k, summary, exc in pool.imap_unordered(_write_job, range(len(jobs))):
                if exc is not None:
                    raise exc
                assert summary is not None  # a job returns its summary or its exception
                done(k, summary)
            finished = True
        finally:
            if finished:
                # Every job is written: the writers end on their own. Pool.terminate (what
                # `with Pool` does) would take the task queue's lock for good and signal them,
                # and a writer the signal reaches just before it waits on that lock never ends
                # (a sweep hung so, one in about twenty, on a busy machine).
                pool.close()
                pool.join()
            else:
                _WRITERS_STOP.value = 1
                pool.terminate()  # a fault or Ctrl-C: stop the writers now
    finally:
        _FORKED_JOBS, _WRITERS_STOP = [], None


# In a worker process of `--workers N`: the parent's stop event and its pid (`_pool_init`).
_WORKER_STOP: Any = None
_WORKER_PARENT: int | None = None


def _pool_init(halt: Any = None, parent: int | None = None) -> None:
    global _WORKER_STOP, _WORKER_PARENT
    # The parent decides what a stop signal does (a scheduler's SIGTERM reaches the whole
    # process group): it sets `halt`, and the worker's runs stop at the end of their epoch.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _WORKER_STOP, _WORKER_PARENT = halt, parent


def _worker_stop() -> bool:
    """Stop when the parent says so, or has died (SIGKILL): an orphan computes for no one."""
    halted = _WORKER_STOP is not None and _WORKER_STOP.is_set()
    return halted or (_WORKER_PARENT is not None and os.getppid() != _WORKER_PARENT)


def _worker_task(task: Task) -> list[Trace]:
    """`run_task` in a worker process, stopped by the parent's stop event."""
    traces = run_task(task, _worker_stop)
    if _WORKER_PARENT is not None and os.getppid() != _WORKER_PARENT:
        os._exit(1)  # orphaned: no one reads the result, nor ends this process
    return traces


class _Worker:
    """One worker process of `--workers N` (an executor of one), one task at a time: when it
    dies, the task it held is the one lost, and a new one takes its place."""

    def __init__(self, ctx: Any, halt: Any) -> None:
        self.pool = ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_pool_init, initargs=(halt, os.getpid())
        )
        self.process: Any = None

    def submit(self, task: Task) -> Any:
        fut = self.pool.submit(_worker_task, task)
        if self.process is None:  # started by the first submit
            procs = getattr(self.pool, "_processes", None) or {}
            self.process = next(iter(procs.values()), None)
        return fut

    def death(self) -> str:
        """Why the process died. The pool reports a broken worker as soon as it sees it gone,
        which can be before the process is reaped and its exit code known: wait for that."""
        code = None
        deadline = time.monotonic() + 5
        while self.process is not None:
            # The pool's own thread may reap it at the same moment: then this join returns at
            # once (ECHILD) before that thread has recorded the exit code; look again shortly.
            with contextlib.suppress(Exception):
                self.process.join(0.1)
            code = self.process.exitcode
            if code is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if code is None:
            return "its worker process died"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"its worker process was killed by {signal.Signals(-code).name}"
        return f"its worker process died (exit code {code})"

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.kill()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_processes(plan, cfgs, indices, options, accept, stop, unfinished) -> None:
    """Tasks computed by worker processes, written here. A stop sets `halt`: tasks not begun
    stay pending, running ones stop at the end of the epoch and come back to be written as
    interrupted. A worker that dies fails its task's runs (with the reason) and is replaced;
    the others go on. A second signal ends the workers at once; `unfinished` receives the
    runs that did not come back."""
    queue = deque(make_tasks(plan, cfgs, indices, options.workers))
    ctx = multiprocessing.get_context("spawn")
    halt = ctx.Event()
    workers: list[_Worker | None] = [None] * min(options.workers, len(queue))
    busy: dict[Any, tuple[int, Task]] = {}  # future -> (worker, task)
    clean = False
    try:
        while queue or busy:
            if stop() and not halt.is_set():
                halt.set()
                queue.clear()  # not begun: their runs stay pending
            held = {k for k, _ in busy.values()}
            for k in range(len(workers)):
                if queue and k not in held:
                    worker = workers[k]
                    if worker is None:
                        worker = workers[k] = _Worker(ctx, halt)
                    task = queue.popleft()
                    busy[worker.submit(task)] = (k, task)
            if not busy:
                break
            finished, _ = wait(list(busy), timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: busy[f][1].indices[0]):
                k, task = busy.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    dead, workers[k] = workers[k], None
                    assert dead is not None  # it ran this task
                    reason = dead.death()
                    dead.close()
                    for i in task.indices:
                        accept(
                            Trace(i, error=reason, exit_code=int(exit_code_for(RunStatus.FAILED)))
                        )
                    continue
                for trace in fut.result():
                    accept(trace)
        clean = True
    finally:
        unfinished += [i for _, task in busy.values() for i in task.indices]
        if not clean:  # a second signal or a fault: end the workers now
            halt.set()
            for w in workers:
                if w is not None:
                    w.kill()
        for w in workers:
            if w is not None:
                w.close()
