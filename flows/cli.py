"""``imgflow`` command line. Heavy libraries are imported inside commands so ``--help`` is instant.

Exit codes: 0 ok, 1 unexpected error, 2 bad input/params (message says what to fix),
3 the model failed its gates, 4 the data failed validation, 5 a promotion lost the registry's
promotion lock, 6 another imgflow run holds this project's lock (``--wait`` to wait for it),
7 the disk filled up while writing (the message names where).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="imgflow",
    help=(
        "Raw labelled images -> validated data -> Ray-trained timm model -> gated, registered MLflow model.\n\n"
        "Stages: ingest, validate, audit, baseline (CLIP), train, evaluate, register; `pipeline` runs them all as one Prefect flow. "
        "`tune` sweeps train params with Ray Tune; `make-composites` builds a multi-label dataset. "
        "Parameters come from params.yaml (one section per stage); override any with --set section.key=value."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="Parameter file (one section per stage).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a parameter, e.g. --set train.epochs=3 (repeatable; value parsed as YAML)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Show every log line and warning (Prefect, MLflow, Ray, the stages' detail)."
    ),
]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0,
        help="When another imgflow run holds this project's lock, wait up to SECONDS for it "
        "(default 0: exit at once with code 6, naming the run).",
        metavar="SECONDS",
    ),
]

ENV_DEFAULTS = {
    # Ray reads this at import: a single-node runtime binds 127.0.0.1 only.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts workers at niceness 15 by default: on a shared box the training workers then
    # lose the CPU to everything else. Training workers are the work: run them at normal priority.
    "RAY_worker_niceness": "0",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

QUIET_ENV = {
    # Prefect's console shows warnings and errors only; its run logs still reach the API (the UI).
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Child processes (Ray workers, Prefect's temporary server) print no Python warnings.
    "PYTHONWARNINGS": "ignore",
}
"""Environment of the default (quiet) console; ``-v`` leaves it alone."""

CONSOLE_LOGGER = "imgflow.console"
"""The one line per stage (written by ``tasks.stages.report``)."""


def _setup() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from rich.console import Console
    from rich.logging import RichHandler

    # The root handler prints every library's log records (Prefect keeps it rather than installing
    # its own console handler); ``_console`` sets what passes it.
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])


class _StderrLines(logging.Handler):
    """Each record as one plain line on the current ``sys.stderr`` (looked up per line: rich's live
    progress display redirects it and keeps the line above its bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _RunLogsOnlyErrors(logging.Filter):
    """Quiet console: Prefect's flow- and task-run records below ERROR stay in the Prefect UI (the
    tasks echo each stage's result to ``imgflow.console``; "Finished in state Completed()" is noise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(RUN_LOGGERS)


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _console(verbose: bool) -> None:
    """What the terminal shows. By default: one line per stage, progress bars, the final summary,
    warnings and errors — no library's INFO lines nor Python warnings from libraries.
    ``verbose``: everything, as the libraries log it (and the stages' INFO detail)."""
    console = logging.getLogger(CONSOLE_LOGGER)
    if not console.handlers:
        console.addHandler(_StderrLines())
        console.setLevel(logging.INFO)
        console.propagate = False
    logging.getLogger("components").setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.NOTSET if verbose else logging.WARNING)
        if not verbose and not any(isinstance(f, _RunLogsOnlyErrors) for f in handler.filters):
            handler.addFilter(_RunLogsOnlyErrors())
    if verbose:
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # when mlflow was imported before the env was set
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"(components|tasks|flows)(\.|$)")


def _emit(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """The command's result: JSON of its record's ``to_dict()`` on stdout, or ``human(result)``."""
    if as_json:
        from components.core.jsonio import dumps

        typer.echo(dumps(result, sort_keys=True).rstrip("\n"))
    else:
        typer.echo(human(result))


def _run(fn: Callable[[], Any], *, as_json: bool = False, verbose: bool = False) -> Any:
    """Run a command body; project errors become a clear message and their exit code.

    With ``--json`` everything the body prints (libraries' chatter included) goes to stderr, so
    stdout holds only the JSON result.
    """
    from components.core.errors import ImgflowError

    _console(verbose)
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            return fn()
    except ImgflowError as e:
        typer.secho(f"imgflow: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(e.exit_code) from None
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        typer.secho(f"imgflow: {_disk_full_message(full)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(DISK_FULL_EXIT) from None


DISK_FULL_EXIT = 7
_PROJECT_DIRS: list[Path] = []
"""The folders the running command writes (set when its params are resolved): where to look for the
full disk when the error names no file."""


def _disk_full(error: BaseException) -> OSError | None:
    """The "no space left" (ENOSPC, or EDQUOT: over quota) OSError in ``error`` or what caused it;
    one made up from the text when a library re-raised it as its own error (a Ray worker's failure,
    safetensors' "os error 28")."""
    import errno
    import re

    chain, e = list[BaseException](), error
    while e is not None and e not in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(re.search(r"No space left on device|\[Errno 28\]|os error 28", str(e)) for e in chain):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _disk_full_message(error: OSError) -> str:
    """``disk full: <path> (<free> free)`` and what to do: the file the error names, else the project
    folder (or the temp folder) with the least free space."""
    import shutil
    import tempfile

    def free(path: Path) -> int:
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    if error.filename:
        where = Path(os.fsdecode(error.filename))
    else:
        where = min([*_PROJECT_DIRS, Path(tempfile.gettempdir())], key=free)
    return (
        f"disk full: {where.resolve()} ({free(where) // 1024} KiB free): {error.strerror}. The files in place "
        "before this run are kept; free space there and run the command again."
    )


def _params(params: Path, overrides: list[str] | None) -> Any:
    """The resolved params, with what the environment supplies (``$MLFLOW_TRACKING_URI``)."""
    from components.core.config import load_params
    from flows.environment import prefect_environment, with_environment

    p = with_environment(load_params(params, overrides or []))
    _PROJECT_DIRS[:] = [p.project.data_dir, p.project.output_dir, p.project.state_dir]
    if "prefect" not in sys.modules:  # Prefect reads its settings once, at import
        os.environ.update(prefect_environment(p))
    return p


def _locked(
    command: str, params: Path, overrides: list[str] | None, wait: float, body: Callable[[Any], Any]
) -> Callable[[], Any]:
    """A command body that runs ``body(resolved params)`` holding the project lock: one writer per
    project folder (:mod:`components.core.lock`); another run's lock is waited for up to ``wait``
    seconds, then exit code 6 names it. Commits a killed run left half done are completed first."""

    def run() -> Any:
        from components.core.lock import project_lock

        p = _params(params, overrides)
        with project_lock(p.project.state_dir, command=command, wait_s=wait, complete=[p.project.data_dir]):
            return body(p)

    return run


def _ray_options(*, verbose: bool = False) -> Any:
    """Which Ray to use and what it shows: RAY_ADDRESS, IMGFLOW_RAY_DASHBOARD, IMGFLOW_WORKER_EVENTS."""
    from flows.environment import ray_options

    return ray_options(verbose=verbose)


@app.command()
def ingest(
    source: Annotated[
        str | None,
        typer.Option(
            help="fashion-mnist | imagefolder:<dir> | csv:<file> | s3://bucket/prefix (an image folder in "
            "object storage; endpoint and credentials from the AWS_* variables) (default: ingest.source)."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Read a source into the content-addressed store, manifest (data version) and quarantine list."""
    from components.pipeline.stages import run_ingest

    overrides = list(set_ or []) + ([f"ingest.source={source}"] if source else [])
    body = _locked("ingest", params, overrides, wait, lambda p: run_ingest(p, progress=not as_json))
    result = _run(body, as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        lines = [
            f"ingested {r.ingested} of {r.seen} images from {r.source}; quarantined {r.quarantined}",
            f"  task: {r.task}{' (detected from the label sets)' if r.task_detected else ''}",
        ]
        lines += [f"  {reason}: {n}" for reason, n in sorted(r.reasons.items())]
        lines += [f"  {split}: {n} images" for split, n in sorted((r.images or {}).items())]
        lines += [f"manifest {r.manifest} (data version {r.data_version})", f"quarantine list {r.quarantine}"]
        return "\n".join(lines)

    _emit(result, as_json, human)


@app.command("make-composites")
def make_composites(
    out: Annotated[Path, typer.Argument(help="Folder to write images/<split>/*.png and labels.csv into.")],
    train: Annotated[int, typer.Option(help="Canvases drawn from the official train images.")] = 6000,
    test: Annotated[int, typer.Option(help="Canvases drawn from the official test images.")] = 1000,
    two_item_fraction: Annotated[float, typer.Option(help="Share of canvases holding two items.")] = 0.7,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
    fashion_mnist_dir: Annotated[
        Path, typer.Option(help="Folder with the four Fashion-MNIST *-ubyte.gz files.")
    ] = Path("/usr/share/datasets/fashion-mnist"),
    params: Annotated[
        Path, typer.Option("--params", help="Base params file for OUT/params.yaml (absent: defaults).")
    ] = Path("params.yaml"),
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build a real multi-label dataset: 56x56 canvases with one or two Fashion-MNIST items (distinct
    classes), labelled with every item, e.g. ``Bag|Sneaker``. Writes ``OUT/labels.csv``
    (path,labels,split; test canvases hold only official test images) and ``OUT/params.yaml`` (the
    base params with the composites' source, data/output folders, 56-pixel input and model name), so
    ``imgflow pipeline --params OUT/params.yaml`` runs the multi-label pipeline from this folder."""
    from rich.progress import Progress

    from components.data.composites import make_composites as build
    from components.data.composites import write_composite_params

    def body() -> dict[str, Any]:
        with Progress(disable=as_json, transient=True) as bar:
            task = bar.add_task("composites", total=train + test)
            csv_path = build(out, fashion_mnist_dir=fashion_mnist_dir, per_split={"train": train, "test": test},
                             two_item_fraction=two_item_fraction, seed=seed,
                             on_progress=lambda n: bar.advance(task, n))  # fmt: skip
        params_path = write_composite_params(params, out)
        return {"csv": str(csv_path), "train": train, "test": test, "params": str(params_path)}

    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: (
        f"wrote {r['train'] + r['test']} canvases; labels {r['csv']}\n"
        f"run the multi-label pipeline on them: imgflow pipeline --params {r['params']}"
    ))  # fmt: skip


@app.command()
def validate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Great Expectations suite over the manifest; exit code 4 and a report when it fails."""
    from components.pipeline.stages import run_validate

    result = _run(_locked("validate", params, set_, wait, run_validate), as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        warned = f" with {len(r.warnings)} warning(s): {', '.join(r.warnings)}" if r.warnings else ""
        return f"data validation passed{warned}; data contract: {r.contract}; report {r.report_html}"

    _emit(result, as_json, human)


contract_app = typer.Typer(
    help="The data contract (validate.contract, data_contract.yaml): classes, shares and image-property "
    "distributions of the first accepted data version, which later versions are validated against.",
    no_args_is_help=True,
)
app.add_typer(contract_app, name="contract")


@contract_app.command("accept")
def contract_accept(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Re-infer the data contract from the current data version (e.g. to accept a new class or a new
    normal), keeping its checks: (tolerances); review the diff and commit it, then run `imgflow validate`."""
    from components.pipeline.stages import run_contract_accept

    body = _locked("contract", params, set_, wait, run_contract_accept)
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: (
        f"wrote {r['contract']} from data version {r['data_version']} ({r['images']} images, "
        f"{len(r['classes'])} classes); review the diff, commit it, then run `imgflow validate`"
    ))  # fmt: skip


@contract_app.command("show")
def contract_show(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check the data contract file (an unknown key or a malformed value is exit code 2) and print it."""

    from components.pipeline.stages import run_contract_show

    def body() -> Any:
        return run_contract_show(_params(params, set_))

    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: (
        f"{r['contract']}: {len(r['classes'])} classes ({', '.join(r['classes'])}), inferred from "
        f"{r['inferred_from']}; checks {r['checks']}"
    ))  # fmt: skip


@app.command()
def audit(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Label-quality audit: suspected label errors (cleanlab), near-duplicate sets, outliers; the
    issue ledger compares them with the previous data version (new / persisting / resolved)."""
    from components.pipeline.stages import run_audit

    body = _locked("audit", params, set_, wait, lambda p: run_audit(p, progress=not as_json))
    result = _run(body, as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        ledger = r.ledger
        lines = [f"audited {r.audited} images (data version {r.data_version})"]
        lines += [f"  {issue}: {n}" for issue, n in r.issues.items()]
        lines.append(f"vs previous version {ledger.previous_version or '(none)'}: {ledger.totals}")
        lines += [f"relabel queue {ledger.files['relabel_queue']}", f"report {r.report_html}"]
        return "\n".join(lines)

    _emit(result, as_json, human)


@app.command("label-next")
def label_next(
    budget: Annotated[int, typer.Option("--budget", min=1, help="How many images to ask a person to label.")],
    strategy: Annotated[
        str,
        typer.Option(
            help="auto (replay the strategies on the labelled history against a random control and pick the "
            "best, saying why) | margin | entropy | least_confident | bald | typical (k-means cold start) | random."
        ),
    ] = "auto",
    pool: Annotated[
        Path | None,
        typer.Option(help="Folder of unlabelled images (default: ingest.unlabelled)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Model folder whose features score the pool (default: the registry's champion; "
            "without one, downsampled pixels)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: project.seed).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Active learning: rank the unlabelled pool, write the queue (outputs/label-next/queue.csv), a CSV to
    fill in (labels.csv) and the picks into the issue ledger and relabel queue."""
    from components.pipeline.labelling import run_label_next

    def body(p: Any) -> Any:
        return run_label_next(p, budget=budget, strategy=strategy, pool=pool, model=model, seed=seed)

    result = _run(_locked("label-next", params, set_, wait, body), as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        lines = [f"strategy {r.strategy}: {r.reason}"]
        if r.replay:
            lines.append("replay (mean probe accuracy over the simulated rounds):")
            lines += [f"  {row['strategy']:<16} {row['mean_accuracy']:.4f}  {row['gain_vs_random_pt']:+.2f} pt vs random"
                      for row in r.replay]  # fmt: skip
        if r.note:
            lines.append(f"note: {r.note}")
        lines.append(f"picked {r.picked} of {r.candidates} unlabelled images ({r.dropped_duplicates} near-duplicates "
                     f"skipped); features: {r.features}")  # fmt: skip
        lines += [
            f"  {q['rank']:>3} {q['image_id'][:12]} {q['score']:.4f} {q['prediction']}" for q in r.queue[:10]
        ]
        lines += [
            f"queue {r.files['queue']}",
            f"fill in {r.files['labels_csv']}, then: imgflow label-import <it>",
        ]
        return "\n".join(lines)

    _emit(result, as_json, human)


@app.command("label-import")
def label_import(
    labels_csv: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns image_id,label (as label-next writes it; blank labels are skipped)."
        ),
    ],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Import a labeller's answers: the whole CSV is checked first (unknown ids or classes, duplicate or
    conflicting rows: exit 2, nothing imported); the images join the train split as a new data version."""
    from components.pipeline.labelling import run_label_import

    def body(p: Any) -> Any:
        return run_label_import(p, labels_csv, progress=not as_json)

    result = _run(_locked("label-import", params, set_, wait, body), as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        per_class = ", ".join(f"{c} {n}" for c, n in r.per_class.items())
        return (f"imported {r.imported} labels ({per_class}); {r.skipped_blank} blank rows skipped\n"
                f"data version {r.data_version_before} -> {r.data_version} ({r.ingested} images)")  # fmt: skip

    _emit(result, as_json, human)


def _baseline_line(r: Any) -> str:
    """One line for a :class:`~components.pipeline.records.BaselineResult`."""
    from components.baseline.records import summary_line

    return summary_line(r.summary)


@app.command()
def baseline(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Zero-shot and linear-probe CLIP baselines (open_clip) on the test split, each an MLflow run.

    Weights: a pretrained tag (downloaded when online) or a local checkpoint (baseline.pretrained);
    with none to be had the baseline is recorded as skipped (exit code 0).
    """
    from components.pipeline.stages import run_baseline
    from flows.environment import behind_proxy

    body = _locked(
        "baseline",
        params,
        set_,
        wait,
        lambda p: run_baseline(p, behind_proxy=behind_proxy(), ray_options=_ray_options()),
    )
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"CLIP baseline {_baseline_line(r)}\nresults in {r.out_dir}")


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the last (stopped) run from its checkpoint.")
    ] = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the timm model with Ray Train (local Ray on 127.0.0.1, or $RAY_ADDRESS); log to MLflow."""
    from components.pipeline.stages import run_train

    def body(p: Any) -> Any:
        return run_train(p, progress=not as_json, resume=resume, ray_options=_ray_options(verbose=verbose))

    result = _run(_locked("train", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"trained: val_accuracy {r.val_accuracy:.4f}; MLflow run {r.run_id}")


@app.command()
def pretrain(
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="Self-supervised method: simclr | byol (default: ssl.method in params)."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Images to pretrain on, labels ignored: an ingested data folder (its train split) or any "
            "folder of image files (unlabelled extras). Default: the project's data version, train split.",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Epochs (default: ssl.epochs).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Self-supervised pretraining of train.model's backbone (SimCLR or BYOL) on Ray Train, labels ignored; the
    backbone, its data hash and loss curve go to an MLflow run. Start supervised training from it with
    --set train.init=ssl:<run id> (linear probe first, then fine-tune)."""
    from components.pipeline.pretraining import run_pretrain

    def body(p: Any) -> Any:
        if method is not None:
            p = p.model_copy(update={"ssl": p.ssl.model_copy(update={"method": method})})
        return run_pretrain(
            p, data=data, epochs=epochs, progress=not as_json, ray_options=_ray_options(verbose=verbose)
        )

    result = _run(_locked("pretrain", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"pretrained {r.model} ({r.method}) on {r.images} images, {r.epochs} epochs "
          f"in {r.seconds:.0f}s: loss {r.losses[0]:.3f} -> {r.final_loss:.3f}; data hash {r.data_hash}\n"
          f"MLflow run {r.run_id}: use --set train.init=ssl:{r.run_id}")  # fmt: skip


@app.command("label-efficiency")
def label_efficiency(
    ssl_run: Annotated[
        str | None,
        typer.Option(
            "--ssl-run", help="The pretraining's MLflow run id (default: the last `imgflow pretrain`)."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Label-efficiency report: test accuracy with 1% / 10% / 100% of the train labels (3 seeded subsets) for
    the SSL backbone's linear probe, raw pixels, a random-init backbone and imgflow's recipe from scratch;
    written to <output_dir>/label_efficiency, logged to MLflow, added to the gate report if one exists."""
    from components.pipeline.pretraining import run_label_efficiency

    def body(p: Any) -> Any:
        return run_label_efficiency(p, ssl_run=ssl_run)

    result = _run(_locked("label-efficiency", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, _label_efficiency_summary)


def _label_efficiency_summary(r: Any) -> str:
    lines = [
        f"{m:<12} " + "  ".join(f"{p} {100 * v:5.1f}" for p, v in by.items())
        for m, by in r.report["summary"].items()
    ]
    return "\n".join([*lines, f"report: {r.markdown_path}; MLflow run {r.run_id}"])


def _distill_summary(r: Any) -> str:
    reg, ev = r.registration, r.evaluation
    return (
        f"distilled {r.teacher.label} -> {r.student}: test accuracy {ev.accuracy:.4f} after {r.epochs} epochs\n"
        f"registered {reg.name} version {reg.version} as {', '.join(reg.aliases)} "
        f"(tag imgflow.teacher={r.teacher.label}); MLflow run {r.run_id}\ngate report: {ev.report_html}"
    )


@app.command()
def distill(
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            help="The teacher: models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a "
            "local model folder (holding model.json). It must know the data's classes, in the same order.",
        ),
    ],
    student: Annotated[
        str,
        typer.Option("--student", help="The student's timm model name (e.g. imgflow_cnn, resnet18)."),
    ],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the last (stopped) distill run from its checkpoint.")
    ] = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Knowledge distillation: train --student on Ray Train with the teacher's soft targets (distill.temperature,
    distill.alpha; every train.* param applies), evaluate it and register it as its own model
    (distill.registered_name, default <register.model_name>-student), tagged imgflow.teacher. Exit code 3
    when its gates failed (registered as candidate only)."""
    from components.pipeline.distillation import run_distill

    def body(p: Any) -> Any:
        return run_distill(
            p, teacher_uri=teacher, student=student, progress=not as_json, resume=resume,
            ray_options=_ray_options(verbose=verbose), raise_on_gate_failure=False,
        )  # fmt: skip

    result = _run(_locked("distill", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, _distill_summary)
    if not result.registration.gates_passed:
        typer.secho(f"imgflow: {result.registration.failure_message()}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3)


def _tune_summary(r: dict[str, Any]) -> str:
    best, metric = r["best"], r["metric"]
    lines = [
        f"best of {len(r['trials'])} trials: {metric} {best[metric]:.4f} ({r['mode']}), trial {best['trial']} "
        f"(MLflow run {best['run_id']}, parent run {r['run_id']})"
    ]
    lines += [
        f"  train.{k} = {v:.4g}" if isinstance(v, float) else f"  train.{k} = {v}"
        for k, v in best["train"].items()
    ]
    if r["trials_failed"]:
        lines.append(f"{r['trials_failed']} trial(s) failed: see {r['trials_csv']}")
    lines += [
        f"best params  {r['best_params']}",
        f"trials       {r['trials_csv']} (plot {r['plot']})",
        f"train with   imgflow train --params {r['best_params']}",
    ]
    return "\n".join(lines)


@app.command()
def tune(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", min=1, help="Trials to run (default: tune.num_samples).")
    ] = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Hyper-parameter sweep with Ray Tune; writes the best config as a params file.

    Each trial trains tune.epochs epochs exactly as `imgflow train` does (Ray
    Train, same data and seed) with train values drawn from tune.search_space,
    e.g. lr: {loguniform: [0.001, 0.01]}, batch_size: {choice: [128, 256]}
    (choice | grid | uniform | loguniform | randint). Trials are ranked by
    tune.metric (default val_loss) at their last epoch; tune.scheduler: asha
    stops trailing trials early.

    MLflow: a parent run "tune" and one child run per trial (its train params
    and per-epoch metrics; the best one tagged best_trial=true).

    Files: tune.out (default outputs/tune/best_params.yaml: the full params
    with the best values), trials.csv, trials.json and trials.png beside it.
    Then: imgflow train --params outputs/tune/best_params.yaml
    """
    from components.pipeline.tuning import run_tune

    def body(p: Any) -> Any:
        return run_tune(
            p, num_samples=num_samples, progress=not as_json, ray_options=_ray_options(verbose=verbose)
        )

    result = _run(_locked("tune", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, _tune_summary)


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Evaluate a registered model instead of outputs/train/model: models:/<name>@<alias>, "
            "models:/<name>/<version> or runs:/<run id>/model. Its report goes to "
            "outputs/evaluate/models/<name@alias>/ (the pipeline's outputs/evaluate is left alone).",
        ),
    ] = None,
    few_shot: Annotated[
        bool,
        typer.Option(
            "--few-shot",
            help="Episodic few-shot evaluation instead of the gate report: N-way episodes over the test "
            "split, the model's stored layer vs raw pixels and a random-init backbone on the same seeded "
            "episodes (ProtoNet and SimpleShot). Model: --model, else the champion.",
        ),
    ] = False,
    n_way: Annotated[int, typer.Option("--n-way", min=2, help="With --few-shot: classes per episode.")] = 5,
    shots: Annotated[
        str, typer.Option("--k", help="With --few-shot: support images per class, comma-separated (1,5,10).")
    ] = "1,5,10",
    episodes: Annotated[
        int,
        typer.Option("--episodes", min=1, help="With --few-shot: episodes (seeded, shared by all methods)."),
    ] = 300,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Gate report: test metrics, confusion matrix, calibration, robustness (11 corruption families x 5
    severities), slices, champion comparison, CLIP baselines and gates (written to outputs/evaluate,
    logged to MLflow). With --few-shot: an episodic few-shot table instead."""
    from components.pipeline.notify import headline_text
    from components.pipeline.stages import run_evaluate

    if few_shot:
        _evaluate_few_shot(params, set_, model, n_way=n_way, shots=shots, episodes=episodes, wait=wait,
                           as_json=as_json, verbose=verbose)  # fmt: skip
        return
    body = _locked(
        "evaluate", params, set_, wait, lambda p: run_evaluate(p, model_uri=model, progress=not as_json)
    )
    result = _run(body, as_json=as_json, verbose=verbose)

    def human(r: Any) -> str:
        return (
            f"{headline_text(r)}, temperature {r.temperature:.3f}\n"
            f"{r.gates.summary_text()}\ngate report: {r.report_html}"
        )

    _emit(result, as_json, human)


def _evaluate_few_shot(
    params: Path, set_: list[str] | None, model: str | None, *, n_way: int, shots: str, episodes: int,
    wait: float, as_json: bool, verbose: bool,
) -> None:  # fmt: skip
    """``imgflow evaluate --few-shot``: the table of :func:`components.pipeline.classes.run_fewshot_evaluation`."""
    from components.pipeline.classes import run_fewshot_evaluation

    def body(p: Any) -> Any:
        from components.core.errors import ConfigError

        try:
            ks = tuple(int(k) for k in shots.split(","))
        except ValueError:
            raise ConfigError(f"--k {shots!r}: give shot counts such as 1,5,10") from None
        return run_fewshot_evaluation(p, model=model, n_way=n_way, ks=ks, episodes=episodes)

    result = _run(_locked("evaluate", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"{r['n_way']}-way few-shot, {r['episodes']} episodes, {r['model']} "
          f"({r['layer']}), {r['images']} test images\n{r['table']}")  # fmt: skip


@app.command()
def register(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register the model: alias candidate; challenger and (register.auto_promote) champion only if the
    gates passed, else exit code 3. Alias moves are serialized and logged (`imgflow models history`)."""
    from components.pipeline.stages import run_register

    body = _locked("register", params, set_, wait, lambda p: run_register(p, raise_on_gate_failure=False))
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"registered {r.name} version {r.version} as {', '.join(r.aliases)}")
    if not result.gates_passed:
        typer.secho(f"imgflow: {result.failure_message()}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3)


def _pipeline_summary(r: Any) -> str:
    """The end of ``imgflow pipeline``: where the run, the model and the UI are."""
    from components.pipeline.notify import headline_text

    ing, reg, tr, ev = r.ingest, r.register, r.train, r.evaluate
    uri = tr.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" if uri.startswith("sqlite") else uri
    return "\n".join(
        [
            f"data version   {ing.data_version} ({ing.ingested} images)",
            f"MLflow run     {tr.run_id}",
            *([f"CLIP baseline  {_baseline_line(r.baseline)}"] if r.baseline is not None else []),
            f"{headline_text(ev):<23}  (gates {'passed' if ev.gates_passed else 'FAILED'})",
            f"registered     {reg.name} version {reg.version}, aliases: {', '.join(reg.aliases)}",
            f"load it with   mlflow.pyfunc.load_model('models:/{reg.name}@{reg.aliases[-1]}')",
            f"MLflow UI      {ui}",
        ]
    )


@app.command()
def pipeline(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retrain even when the champion already comes from this data version and these params.",
        ),
    ] = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run ingest -> retrain check -> validate -> train (the label audit and the CLIP baseline beside it)
    -> evaluate -> register as one Prefect flow.

    After ingest the run stops with "up to date" (exit code 0) when the registry's champion was trained
    on the same data version (manifest md5) with the same training params; --force retrains anyway.
    Runs without a Prefect server (ephemeral) or against the one $PREFECT_API_URL names.

    The console shows one line per stage, progress bars and the summary; -v shows every library's
    log lines and warnings too.
    """
    _run(lambda: _params(params, set_), verbose=verbose)  # fail fast on bad params, before Prefect starts
    from flows.prefect_home import adopt_temporary_server, seed_home, start_temporary_server

    seed_home()  # a project's first run: its new Prefect home's database is made from the shipped schema
    early = start_temporary_server()  # Prefect's temporary server boots while this process imports

    def body(_p: Any) -> Any:
        from flows.pipeline import pipeline as pipeline_flow

        adopt_temporary_server(early)

        # The flow takes the project lock too (scheduled runs); here it is taken first, so a
        # locked project is reported before Prefect starts, and the flow re-enters it.
        try:
            return pipeline_flow(
                params_path=str(params),
                overrides=list(set_ or []),
                force=force,
                progress=not as_json,
                verbose=verbose,
            )
        except Exception as e:
            _raise_if_prefect_down(e)
            raise

    result = _run(_locked("pipeline", params, set_, wait, body), as_json=as_json, verbose=verbose)
    if result.register is None:  # up to date: nothing was trained
        _emit(result, as_json, lambda r: f"up to date: {r.freshness.reason} (use --force to retrain)")
        return
    _emit(result, as_json, _pipeline_summary)
    if not result.register.gates_passed:
        typer.secho(f"imgflow: {result.register.failure_message()}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3)


def _raise_if_prefect_down(error: BaseException) -> None:
    """ImgflowError naming the Prefect API when ``error`` is a failure to reach it: at the start of a
    run, or mid-run once the client's own retries (``PREFECT_CLIENT_MAX_RETRIES``, backoff 2, 4, 8 ...
    seconds) are spent."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from components.core.errors import ImgflowError

    api = str(PREFECT_API_URL.value() or "").rstrip("/")
    if not api:
        return  # ephemeral: no server of the user's to be down
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # the engine may raise it while handling another error
        if isinstance(e, RuntimeError) and str(e).startswith("Failed to reach API"):
            when = "is not answering"
            break
        if isinstance(e, httpx.TransportError | httpx.HTTPStatusError) and _request_url(e).startswith(api):
            when = f"stopped answering during the run ({type(e).__name__}: {e})"
            break
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    else:
        return
    raise ImgflowError(
        f"the Prefect API at {api} {when}. Outputs of the stages that finished are kept; start the server "
        "(or unset PREFECT_API_URL to run without one) and run `imgflow pipeline` again."
    ) from error


def _request_url(error: Any) -> str:
    """The URL of the request an httpx error belongs to ('' when it has none)."""
    try:
        return str(error.request.url)
    except RuntimeError:  # httpx raises when the error carries no request
        return ""


@app.command()
def deploy(
    cron: Annotated[
        str, typer.Option(help="Cron schedule (5 fields), e.g. '0 3 * * 1' = Mondays 03:00.")
    ] = "0 3 * * 1",
    name: Annotated[
        str, typer.Option(help="Deployment name (the flow is imgflow-pipeline).")
    ] = "weekly-retrain",
    work_pool: Annotated[
        str, typer.Option("--work-pool", help="Process work pool (created if missing).")
    ] = "imgflow-process",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Scheduled runs retrain even when nothing changed.")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Create (or update) a Prefect deployment of the pipeline with a cron schedule on the Prefect
    server at $PREFECT_API_URL, for this project folder (the current directory).

    A process worker runs the scheduled runs: `prefect worker start --pool <work-pool>` (where imgflow
    is installed and this folder is reachable). Each run retrains only when the data or the training
    params changed since the champion. prefect.yaml declares the same deployment for `prefect deploy`.
    """
    from components.core.errors import ConfigError

    _run(lambda: _params(params, set_), verbose=verbose)  # fail fast on bad params

    def body() -> dict[str, Any]:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError(
                "imgflow deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api; "
                "`make ui` starts one)"
            )
        from flows.deploy import deploy_pipeline

        return deploy_pipeline(
            cron=cron, name=name, work_pool=work_pool, project_dir=Path.cwd(), params_path=str(params),
            overrides=list(set_ or []), force=force, timezone=timezone, env=ENV_DEFAULTS,
        )  # fmt: skip

    def human(r: dict[str, Any]) -> str:
        return (
            f"deployment {r['name']} ({r['deployment_id']}): cron '{r['cron']}' {r['timezone']}, "
            f"work pool {r['work_pool']}\nstart a worker:  {r['worker']}\nrun it now:      {r['run_now']}"
        )

    _emit(_run(body, as_json=as_json, verbose=verbose), as_json, human)


models_app = typer.Typer(
    help="Registered versions with aliases (candidate, challenger, champion), key test metrics and gate "
    "results; `imgflow models history` shows the promotion log.",
    no_args_is_help=False,
)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Registered versions with aliases, key test metrics and gate results."""
    from components.pipeline.models import list_models

    if ctx.invoked_subcommand is not None:
        return

    rows = _run(lambda: list_models(_params(params, set_)), as_json=as_json, verbose=verbose)

    def human(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "no registered versions yet: run `imgflow pipeline`"
        lines = [f"{'version':>7}  {'aliases':<22} {'acc/mAP':>8}  gates   data_version"]
        for v in rs:
            acc = v["metrics"].get("test_accuracy", v["metrics"].get("test_mAP"))
            lines.append(
                f"{v['version']:>7}  {','.join(v['aliases']) or '-':<22} {'-' if acc is None else f'{acc:.4f}':>8}  "
                f"{'pass' if v['gates_passed'] else 'FAIL':<6}  {v['tags'].get('data_version', '')}"
            )
        return "\n".join(lines)

    _emit(rows, as_json, human)


@models_app.command("history")
def models_history(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The append-only promotion log: every alias move with who, when, why, from -> to and the gates."""
    from components.pipeline.models import promotion_history

    rows = _run(lambda: promotion_history(_params(params, set_)), as_json=as_json, verbose=verbose)

    def human(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "no promotions yet"
        lines = [f"{'#':>4}  {'when':<25} {'action':<9} {'alias':<10} {'from':>4} -> {'to':<4} who / why"]
        for e in rs:
            forced = " FORCED" if e.get("forced") else ""
            lines.append(
                f"{e['seq']:>4}  {e['when']:<25} {e['action']:<9} {e['alias']:<10} {e['from'] or '-':>4} -> "
                f"{e['to']:<4} {e['who']}: {e.get('why') or ''}{forced}"
            )
        return "\n".join(lines)

    _emit(rows, as_json, human)


classes_app = typer.Typer(
    help="Classes from a few images without retraining: `add` a folder of support images (one sub-folder "
    "per class) as a new registered version, `list` a model's classes, `remove` an added class.",
    no_args_is_help=True,
)
app.add_typer(classes_app, name="classes")
ClassesModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="models:/<name>@<alias> or models:/<name>/<version> (default: the champion)."
    ),
]


def _classes_line(r: Any) -> str:
    gates = "gates passed" if r.gates_passed else f"gates FAILED ({r.tags.get('failed_gates', '')})"
    return (f"registered {r.name} version {r.version} ({', '.join(r.aliases) or 'no alias'}) from version "
            f"{r.base_version}: added classes {', '.join(r.added) or 'none'}; base answers kept "
            f"{r.base_agreement:.1%}, {gates}")  # fmt: skip


@classes_app.command("add")
def classes_add(
    folder: Annotated[Path, typer.Argument(help="A folder with one sub-folder of images per new class.")],
    k: Annotated[int, typer.Option("--k", min=1, help="The fewest support images a class may have.")] = 5,
    model: ClassesModelOpt = None,
    layer: Annotated[
        str,
        typer.Option(
            "--layer",
            help="Feature layer of the prototypes: prev_stage_3x3 (the stage before the last, pooled "
            "3x3; +16 points over pooled_last on unseen Fashion-MNIST classes) | pooled_last | pre_logits.",
        ),
    ] = "prev_stage_3x3",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add each sub-folder of FOLDER as a class of a new registered version, without retraining.

    SimpleShot prototypes on the stored layer, centred on the mean of the class means (base and new);
    the previous version is unchanged. A bad support set (fewer than --k images, a name the model has, an undecodable file)
    is exit code 2 with nothing registered."""
    from components.pipeline.classes import run_classes_add

    body = _locked(
        "classes", params, set_, wait, lambda p: run_classes_add(p, folder, k=k, model=model, layer=layer)
    )
    _emit(_run(body, as_json=as_json, verbose=verbose), as_json, _classes_line)


@classes_app.command("list")
def classes_list(
    model: ClassesModelOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """A model's trained classes and the classes added from support images (with their support size)."""
    from components.pipeline.classes import run_classes_list

    result = _run(
        lambda: run_classes_list(_params(params, set_), model=model), as_json=as_json, verbose=verbose
    )
    _emit(result, as_json, lambda r: f"{r['model']}\ntrained: {', '.join(r['trained'])}\nadded:   "
          + (", ".join(f"{a['name']} ({a.get('images', '?')} images)" for a in r["added"]) or "none"))  # fmt: skip


@classes_app.command("remove")
def classes_remove(
    name: Annotated[str, typer.Argument(help="An added class (trained classes need retraining).")],
    model: ClassesModelOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register a new version without added class NAME (the version it came from is unchanged)."""
    from components.pipeline.classes import run_classes_remove

    body = _locked("classes", params, set_, wait, lambda p: run_classes_remove(p, name, model=model))
    _emit(_run(body, as_json=as_json, verbose=verbose), as_json, _classes_line)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered version to promote (see `imgflow models`).")],
    to: Annotated[str, typer.Option("--to", help="Alias to move: champion or challenger.")] = "champion",
    force: Annotated[
        bool, typer.Option("--force", help="Promote although its gates failed (needs --reason).")
    ] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why; kept in the promotion log.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Point an alias (default champion) at a version, under the promotion lock, logged.

    A version whose gates failed is refused unless --force --reason "...". Exit code 5 when another
    promotion holds the lock too long.
    """
    from components.pipeline.models import run_promote

    body = _locked("promote", params, set_, wait,
                   lambda p: run_promote(p, version, to=to, force=force, reason=reason))  # fmt: skip
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"{r.alias}: version {r.from_version or '-'} -> {r.to_version}"
          + ("" if r.changed else " (already there)"))  # fmt: skip


@app.command()
def rollback(
    reason: Annotated[str | None, typer.Option("--reason", help="Why; kept in the promotion log.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Move champion back to the previous champion (each call goes one step further back)."""
    from components.pipeline.models import run_rollback

    body = _locked("rollback", params, set_, wait, lambda p: run_rollback(p, reason=reason))
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"champion: version {r.from_version} -> {r.to_version} (rolled back)")


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model or "
            "a local model folder (default: serve.model, else models:/<register.model_name>@champion).",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Interface to bind (default serve.host: 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default serve.port).")] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve from a Ray Serve deployment (same HTTP protocol, requests batched per replica) "
            "on a local Ray runtime, or on the cluster $RAY_ADDRESS names.",
        ),
    ] = False,
    replicas: Annotated[
        int | None,
        typer.Option("--replicas", min=1, help="With --ray: this many replicas, 1 CPU each (default 1)."),
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(
            "--autoscale",
            metavar="MIN,MAX",
            help="With --ray: between MIN and MAX replicas, Serve adding one as requests queue up.",
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-body-bytes",
            help="Refuse larger request bodies with 413, never holding them "
            "(default serve.max_body_bytes: 100 MB).",
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            "--request-timeout",
            metavar="SECONDS",
            help="Answer 504 to a request not done within this (default serve.request_timeout_s: 30).",
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            "--max-concurrency",
            help="Requests scored at once; one more waits serve.queue_timeout_s for a slot, then gets "
            "503 + Retry-After (default serve.max_concurrency: 8).",
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve predictions over HTTP: POST /invocations (MLflow scoring JSON, base64 images),
    POST /predict (multipart image files), GET /health. Answers top-k labels with calibrated
    probabilities; bad input gets a 4xx with a message. With serve.token or $IMGFLOW_SERVE_TOKEN
    set, POST requests need 'Authorization: Bearer <token>' (401 otherwise; /health stays open)."""
    from components.pipeline.models import run_serve, run_serve_ray
    from flows.environment import serve_token

    limits = {"max_body_bytes": max_body_bytes, "request_timeout_s": request_timeout,
              "max_concurrency": max_concurrency}  # fmt: skip
    overrides = [*(set_ or []), *(f"serve.{k}={v}" for k, v in limits.items() if v is not None)]

    def body() -> None:
        p = _params(params, overrides)
        token = serve_token(p)
        if ray:
            run_serve_ray(p, model=model, host=host, port=port, replicas=replicas, autoscale=autoscale,
                          token=token, ray_options=_ray_options(verbose=verbose))  # fmt: skip
            return
        if replicas is not None or autoscale is not None:
            from components.core.errors import ConfigError

            raise ConfigError("--replicas and --autoscale need --ray (one uvicorn process serves without it)")
        run_serve(p, model=model, host=host, port=port, token=token)

    _run(body, verbose=verbose)


@app.command()
def predict(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of images (searched recursively), a CSV with a 'path' column (paths "
            "relative to the CSV), or an object-store URI such as s3://bucket/prefix (needs Ray)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Parquet file to write (rows in input order). With Ray, a path not ending in .parquet "
            "is a folder of Parquet files written by the workers.",
        ),
    ] = Path("predictions.parquet"),
    model: Annotated[
        str | None,
        typer.Option("--model", help="Registry/run URI or local model folder (default: the champion)."),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--no-ray",
            help="Score with Ray Data: tasks decode, an actor pool holds the model (GPU actors when the "
            "cluster has GPUs), on the cluster $RAY_ADDRESS names or a local runtime. Default: Ray when "
            "$RAY_ADDRESS is set, the source is a URI, or it holds at least ray.min_images images.",
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            "--actors", min=1, help="Model actors of the Ray job (default ray.actors; implies --ray)."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Batch inference: the predicted label set (multi-label models: every label at or above its tuned
    threshold), label, score, top-k and calibrated probabilities per image into Parquet,
    streamed batch by batch (predict.batch_size, predict.workers) so memory stays flat. An image
    that cannot be decoded gets its error in the `error` column. --ray: the same columns from Ray Data."""
    from components.pipeline.models import run_predict

    use_ray = True if actors is not None and ray is None else ray
    result = _run(
        lambda: run_predict(
            _params(params, set_),
            source,
            out=out,
            model=model,
            progress=not as_json,
            ray=use_ray,
            actors=actors,
            ray_options=_ray_options(verbose=verbose),
        ),
        as_json=as_json,
        verbose=verbose,
    )
    _emit(result, as_json, lambda r: f"predicted {r.images} images ({r.failed} unreadable) with "
          f"{r.model} in {r.seconds:.1f}s ({r.images_per_s:.0f} img/s) -> {r.out}")  # fmt: skip


@app.command()
def export(
    format_: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    model: Annotated[
        str | None,
        typer.Option("--model", help="Registry/run URI or local model folder (default: the champion)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output file (default outputs/export/model.onnx).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images", help="Folder or CSV of real images for the parity check (default: test split)."
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="int8: also write <out stem>.int8.onnx (ONNX Runtime static quantization, QDQ, per-channel, "
            "calibrated on val images); attached only if its test accuracy is within "
            "gates.max_int8_accuracy_drop of the fp32 file (else exit 3).",
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export the model to ONNX (probabilities with the fitted temperature), check parity with
    PyTorch on real images (max abs difference <= 1e-4) and attach the file to the registered version."""
    from components.core.errors import ConfigError
    from components.pipeline.models import run_export

    def body(p: Any) -> Any:
        if format_ != "onnx":
            raise ConfigError(f"unknown export format {format_!r}: only 'onnx' is supported")
        return run_export(p, model=model, out=out, images=images, quantize=quantize)

    result = _run(_locked("export", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: f"exported {r.model} -> {r.onnx}; parity: max abs diff "
          f"{r.parity.max_abs_diff:.2e} on {r.parity.images} images"
          + (_int8_line(r.int8) if r.int8 else "")
          + (f"; attached to version {r.attached_to['version']}" if r.attached_to else ""))  # fmt: skip


def _int8_line(int8: Any) -> str:
    acc, q = int8["accuracy"], int8["quantized"]
    return (f"; int8 -> {int8['onnx']} ({q['size_ratio']:.1f}x smaller): test accuracy "
            f"{acc['int8_accuracy']:.4f} vs fp32 {acc['fp32_accuracy']:.4f} on {acc['images']} images")  # fmt: skip


@app.command()
def variants(
    model: Annotated[
        str | None,
        typer.Option("--model", help="Registry/run URI or local model folder (default: the champion)."),
    ] = None,
    max_images: Annotated[
        int | None,
        typer.Option("--max-images", min=1, help="Seeded sample of the test split (default: all of it)."),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", min=3, help="Timed calls per variant and batch size (1 and 64).")
    ] = 30,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for every runtime (default: PyTorch's default)."),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Another model as a row of the same table (repeatable): e.g. the distilled student "
            "models:/<name>-student@champion, an ensemble's folder. Same classes required.",
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare the deployment variants of a model in one run on this CPU: fp32 PyTorch, fp32 ONNX,
    int8 ONNX, flip-TTA, and any --compare model (a distilled student, an ensemble); test accuracy, NLL, ECE, OOD AUROC (when the model ships a detector), file size
    and p50/p95 latency for 1 image and a batch of 64. Writes outputs/variants/variants.json and the gate
    report's "Deployment variants" section."""
    from components.evaluate.variants import format_table
    from components.pipeline.models import run_variants

    def body(p: Any) -> Any:  # under the project lock: it rewrites the gate report
        return run_variants(
            p, model=model, max_images=max_images, repeats=repeats, threads=threads, compare=compare or ()
        )

    result = _run(_locked("variants", params, set_, wait, body), as_json=as_json, verbose=verbose)
    _emit(result, as_json, format_table)


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Registry/run URI or local model folder (default: the champion)."),
]


@app.command()
def drift(
    source: Annotated[
        Path,
        typer.Argument(
            help="Production images: a folder (searched recursively), a CSV with a 'path' column, "
            "or a predictions .parquet written by `imgflow predict`."
        ),
    ],
    model: ModelOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Data drift: are these images from the distribution the model was trained on? A two-sample test
    (MMD, permutation p-value at drift.alpha) on the model's embeddings (drift.layer) against its
    training data; a seeded sample of drift.max_samples images is read. Unreadable files are listed
    and skipped. Writes outputs/drift/report.json and logs an MLflow run."""
    from components.pipeline.trust import run_drift

    body = _locked("drift", params, set_, wait, lambda p: run_drift(p, source, model=model))
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: r.summary())


@app.command()
def explain(
    images: Annotated[
        list[Path], typer.Argument(help="Image files to explain (unreadable ones are reported).")
    ],
    model: ModelOpt = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the overlays (<image name>.gradcam.png).")
    ] = Path("outputs/explain"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Grad-CAM heat maps: for each image, where the model looked for its top class, as a PNG overlay
    (image | heat map over it). CNNs: the last conv layer; ViTs: the last block's patch tokens on the
    model's patch grid."""
    from components.pipeline.trust import run_explain

    body = _locked("explain", params, set_, wait, lambda p: run_explain(p, images, model=model, out=out))
    result = _run(body, as_json=as_json, verbose=verbose)
    _emit(result, as_json, lambda r: r.summary())


def main() -> None:
    # Registered first, so it runs last of the exit handlers: the interpreter's final garbage collections
    # then skip every object alive at exit (they stay in memory until the process is gone) instead of
    # walking the ~1M objects torch, Prefect, MLflow and Ray leave (2.6-2.9 s -> 0.3-0.4 s of exit on
    # 2 cores). Everything else about exit is unchanged: the other handlers run (the temporary server's
    # stop, logging's flush), and objects freed by reference counting are finalised as before; only
    # objects in reference cycles are not finalised, which Python never promises at exit.
    atexit.register(gc.freeze)
    _setup()
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
