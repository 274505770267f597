"""summary.json, typed: every field a run's summary may hold, with what it means.

`total=False`: a summary is written while the run starts (`writer.base_summary`) and filled in
as it finishes, so a field may be absent (a running run has no error bars yet; only LM runs carry
the `lm_` fields; a run stopped by no signal has no `signal`). Torch-free.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Uncertainty(TypedDict):
    """How the error bars came out (`stats.run_report`)."""

    status: str  # ok, or why the error bars are missing or not to be trusted
    reason: str | None  # the explanation behind that status
    condition_number: float | None  # of the Jacobian at the final parameters


class Resume(TypedDict):
    """One resume of the run (`state.ResumePoint.continued_summary`)."""

    from_epoch: int  # the saved epoch training continued from
    status_before: str | None  # the run's status when it was resumed
    overrides: list[str]  # the key=value overrides given to the resume
    notes: list[str]  # what the resume noticed (e.g. a config changed by the overrides)
    at: str  # when, local time ISO 8601


class Summary(TypedDict, total=False):
    """summary.json of a run directory."""

    fitcli_run: int  # files.RUN_MARKER: marks a fitcli run directory, with its schema version
    fitcli_version: str  # the fitcli that wrote the run
    torch_version: str  # the torch it ran on
    python_version: str  # the Python it ran on
    run_dir: str | None  # the run directory's path (None: a fit in memory, the Python API)
    name: str  # the config's name
    status: str  # running, completed, diverged, interrupted or failed
    exit_code: int | None  # what `fitcli train` exits with for this run (None while running)
    epochs: int  # epochs the config asks for
    epochs_run: int  # epochs trained
    final_loss: float | None  # the loss at the last epoch trained
    loss: str  # the loss function's name (mse, ...)
    loss_options: dict[str, float]  # its options, defaults filled in (f_scale, nu; {}: none)
    optimizer: str  # the optimizer's name, without its options
    params: dict[str, float]  # parameter values, the final ones once finished
    device: str  # the torch device it trained on
    dtype: str  # float32 or float64
    seed: int  # the config's seed
    starts: dict[str, Any]  # the multi-start search: count, losses, best, reached_best, start
    n_points: int  # observations fitted
    columns: dict[str, str]  # a data file's column names by role, x, y (sigma): axis titles
    rows: dict[str, int]  # read, used, omitted_nan, outside_range (nan_policy: omit, range)
    omitted_lines: list[int]  # file lines (1-based) of the rows omitted for NaN or empty cells
    variables: list[str]  # the independent variables' names (several only)
    components: list[str]  # each component's text (models of 2+ additive terms only)
    tied: dict[str, str]  # each tied parameter's expression (models with ties only)
    data_digest: str  # digest of a data file (only for file data): what resume compares
    data_file: dict[str, Any]  # a large data file not copied: its path and size in bytes
    elapsed_s: float  # wall-clock seconds of training (of the last resume, when resumed)
    started_at: str  # when the run started (its first start, when resumed)
    finished_at: str  # when it finished
    command: list[str]  # the command line that ran it
    process: dict[str, Any]  # the writing process while running (`liveness.identity`)
    reason: str | None  # why training stopped (or why it failed)
    signal: str  # the signal that interrupted it (SIGINT, SIGTERM, SIGHUP)
    resumes: list[Resume]  # every resume, oldest first
    stop_reason: str | None  # LM only: why the optimizer stopped
    lm_iterations: int  # LM only: iterations taken
    lm_evaluations: dict[str, int]  # LM only: evaluations of the model and of the Jacobian
    stderr: dict[str, float | None]  # standard error of each parameter (None: not known)
    covariance_params: list[str]  # the free parameters, in the covariance's order
    covariance: list[list[float]] | None  # covariance matrix of the free parameters
    correlation: list[list[float]] | None  # their correlation matrix
    uncertainty: Uncertainty  # how the error bars came out
    rss: float | None  # residual sum of squares (weighted where the data have sigma)
    r2: float | None  # coefficient of determination
    chi2_reduced: float | None  # reduced chi-square (with sigma)
    aic: float | None  # Akaike information criterion
    bic: float | None  # Bayesian information criterion
    n_params: int  # free parameters fitted
    optimum_loss: float  # basis models with mse: the closed-form least-squares loss
    gap: float | None  # (final_loss - optimum_loss) / optimum_loss
    truth: dict[str, float]  # the parameters of the target, where they are known
    truth_distance: dict[str, float | None]  # (fitted - truth) / stderr per free parameter
    bands: dict[str, Any]  # bands.csv: levels, quantile, dof, files, snapshot; or skipped: why
    intervals: dict[str, Any]  # profile or bootstrap intervals, as intervals.json (or an error)
    converged: bool  # the verdict: stopped by itself with trustworthy error bars (`stats.verdict`)
