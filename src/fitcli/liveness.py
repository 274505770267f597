"""Whether the process that is writing a run directory still lives.

A run's summary.json says `running` from its start until its end is written. A process gone
without a word (SIGKILL, the OOM killer, power loss) leaves it so, and "running" would then be
a claim the directory cannot back. So while a run is running its summary records who writes it,
`process: {pid, host, started, boot_id}`, and `status_of` turns a `running` that no process
backs into `stale`. `fitcli runs`, `fitcli plot` and `fitcli train --resume` all ask it.

`started` tells a reused pid from the writer: it is the process's start time in clock ticks
after boot (field 22 of /proc/<pid>/stat on Linux), with `boot_id` (/proc/sys/kernel/random/
boot_id) naming the boot, since ticks restart at every boot. Both are what the kernel holds for
the process, unaffected by changes of the wall clock. Where /proc is missing (macOS, Windows),
both are null and a live pid counts as the writer. A run written on another host cannot be
checked from here: its liveness is `unknown`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from fitcli.errors import RunStatus

ALIVE, GONE, UNKNOWN = "alive", "gone", "unknown"
STALE = RunStatus.STALE  # what `status_of` shows for a running run whose process is gone
UNVERIFIED = RunStatus.UNKNOWN  # ... and for one written on another host (cannot be checked)
_PROC = Path("/proc")


def _start_ticks(pid: int) -> int | None:
    """Clock ticks after boot at which `pid` started, or None without /proc or that process."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip() or None
    except OSError:
        return None


def host() -> str:
    return socket.gethostname()


def identity() -> dict[str, Any]:
    """This process as summary.json records its writer."""
    pid = os.getpid()
    return {"pid": pid, "host": host(), "started": _start_ticks(pid), "boot_id": _boot_id()}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def liveness(record: Any) -> str:
    """`alive`, `gone` or `unknown` for a summary's `process` record."""
    if not isinstance(record, dict):
        return UNKNOWN  # written before fitcli recorded its writer, or garbled
    pid, where = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(where, str):
        return UNKNOWN
    if where != host():
        return UNKNOWN
    started, boot = record.get("started"), record.get("boot_id")
    if isinstance(boot, str) and _boot_id() not in (None, boot):
        return GONE  # the machine has rebooted since
    now = _start_ticks(pid) if isinstance(started, int) else None
    if now is not None:
        return ALIVE if now == started else GONE  # another start time: the pid was reused
    return ALIVE if _pid_exists(pid) else GONE  # no /proc, or none to read for this pid


def status_of(summary: dict) -> str:
    """A run's status as far as is known: the recorded one, except that a `running` run whose
    writer is gone is `stale` (it will never finish; `fitcli train --resume` continues it), and
    one whose writer ran on another host is `unknown` (running or stale: only that host can tell).
    A running run with no `process` record (written before fitcli recorded it) keeps `running`."""
    status = str(summary.get("status", "unknown"))
    if status != RunStatus.RUNNING:
        return status
    record = summary.get("process")
    state = liveness(record)
    if state == GONE:
        return STALE
    if state == UNKNOWN and isinstance(record, dict) and record.get("host") != host():
        return UNVERIFIED
    return status


def describe(record: Any) -> str:
    """`process 1234 on host` for messages."""
    if not isinstance(record, dict):
        return "an unrecorded process"
    return f"process {record.get('pid')} on {record.get('host')}"
