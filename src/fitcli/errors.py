"""The exception family: each class carries the exit code the CLI maps it to."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class RunStatus(StrEnum):
    """A run's status, as summary.json, runs.csv and `fitcli runs` show it (a str: it is
    written and compared as its value)."""

    RUNNING = "running"  # training; summary.json from the start until the end is written
    COMPLETED = "completed"  # all epochs, or the optimizer stopped by itself (LM)
    DIVERGED = "diverged"  # the loss became NaN or infinite; the last finite parameters kept
    INTERRUPTED = "interrupted"  # stopped by a signal (Ctrl-C, SIGTERM, SIGHUP) or --fail-fast
    FAILED = "failed"  # an error stopped it (the optimizer, I/O, a bug); the reason says which
    PENDING = "pending"  # a sweep's run that has not started (runs.csv only)
    STALE = "stale"  # running, but its process on this host is gone (`liveness`)
    UNKNOWN = "unknown"  # running, written on another host: its process cannot be checked


class ExitCode(IntEnum):
    """Process exit codes: a contract documented in the README."""

    COMPLETED = 0
    FAILED = 1
    INVALID_INPUT = 2
    DIVERGED = 3
    NOT_CONVERGED = 4  # with --strict: completed, but the fit did not converge
    HANGUP = 129  # 128 + SIGHUP: the terminal or session went away
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
    TERMINATED = 143  # 128 + SIGTERM: a batch scheduler, `timeout`, `kill`


# The signals that stop a run as Ctrl-C does (after the current epoch; a second one at once),
# each with the exit code that says which one it was, as a shell reports a death by it.
STOP_SIGNALS: dict[str, ExitCode] = {
    "SIGINT": ExitCode.INTERRUPTED,
    "SIGTERM": ExitCode.TERMINATED,
    "SIGHUP": ExitCode.HANGUP,
}

_EXIT_FOR_STATUS = {
    RunStatus.COMPLETED: ExitCode.COMPLETED,
    RunStatus.DIVERGED: ExitCode.DIVERGED,
    RunStatus.FAILED: ExitCode.FAILED,
}


def exit_code_for(status: str, signal: str | None = None) -> ExitCode:
    """The one mapping of a run's (or sweep's) status to its exit code: an interrupted one by
    the signal that stopped it (none known, e.g. --fail-fast: as Ctrl-C)."""
    if status == RunStatus.INTERRUPTED:
        return STOP_SIGNALS.get(signal or "SIGINT", ExitCode.INTERRUPTED)
    return _EXIT_FOR_STATUS[RunStatus(status)]


class GroupStatus(StrEnum):
    """One group's status in a grouped fit (groups.csv's `status` column)."""

    CONVERGED = "converged"  # LM stopped by one of its convergence tests
    COMPLETED = "completed"  # ran all its epochs without converging (gradient optimizers, or
    # LM at its iteration limit): not a failure, as for a single run
    FAILED = "failed"  # non-finite, singular or too few points; see its reason


def grouped_run_status(statuses: list[str]) -> RunStatus:
    """A grouped run's status from its groups': failed if any group failed (exit 1, as a
    sweep with a failed run), else completed (exit 0)."""
    if any(s == GroupStatus.FAILED for s in statuses):
        return RunStatus.FAILED
    return RunStatus.COMPLETED


class Interrupted(KeyboardInterrupt):
    """A second stop signal: the command ends at once (exit by `exit_code_for`)."""

    def __init__(self, signal: str = "SIGINT") -> None:
        super().__init__(signal)
        self.signal = signal


def strict_exit_code(code: int, converged: bool | None, strict: bool) -> int:
    """The exit code of a command whose runs ended with `code` (exit_code_for): with `strict`,
    runs that all completed (code 0) but did not all converge (`converged` False) exit
    NOT_CONVERGED (4), so that a script can tell a fit that is not at its minimum."""
    if strict and code == ExitCode.COMPLETED and converged is False:
        return int(ExitCode.NOT_CONVERGED)
    return int(code)


class FitcliError(Exception):
    """Base of every error fitcli reports to the user as a clean message."""

    exit_code: ExitCode = ExitCode.FAILED


class InputError(FitcliError):
    """Invalid input: usage, config, expression or data (exit 2)."""

    exit_code = ExitCode.INVALID_INPUT


class ConfigError(InputError):
    """The config file or an override is invalid; the message names every problem at once."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        if len(self.problems) == 1:
            text = f"{head}: {self.problems[0]}"
        else:
            text = (
                head
                + f" ({len(self.problems)} problems):\n"
                + "\n".join(f"  - {p}" for p in self.problems)
            )
        super().__init__(text)


class ExpressionError(InputError):
    """An expression is not allowed or cannot be parsed; points at the offending column."""

    def __init__(self, message: str, source: str, col: int | None = None) -> None:
        self.message = message
        self.source = source
        self.col = col
        text = f"{message} in expression {source!r}"
        if col is not None:
            text += f" at column {col + 1}\n    {source}\n    {' ' * col}^"
        super().__init__(text)


class DataError(InputError):
    """The data file or synthetic data is invalid (exit 2)."""


class DeviceError(InputError):
    """The requested device does not exist here (exit 2)."""


class RunDirError(FitcliError):
    """The run directory cannot be created or written (exit 1)."""


class RunDirExistsError(RunDirError, InputError):
    """The exact --run-dir asked for already exists (a usage error, exit 2)."""

    exit_code = ExitCode.INVALID_INPUT


class ResumeError(InputError):
    """A run directory cannot be resumed (exit 2)."""


class RunFileError(InputError):
    """A file of a run directory is missing, truncated, garbled or not a regular file (exit 2)."""


class NotRunDirError(InputError):
    """An existing folder is not a fitcli run directory holding only fitcli's files, so it is
    never replaced, even with --overwrite (exit 2)."""


class BrowserNotFoundError(InputError):
    """Static figures need a Chrome or Chromium and none is installed (exit 2); never
    downloaded."""


class FigureExportError(FitcliError):
    """The browser could not draw a static figure (exit 1)."""
