"""``imgflow distill``: train a student with a registered teacher's soft targets, evaluate it and
register it as its own model.

Glue like :mod:`components.pipeline.stages`: the teacher is resolved here (registry URI or local model
folder) and checked against the data before anything is trained or registered; the training is the
train stage's Ray Train run (:func:`components.train.training.train`) with a
:class:`~components.train.recipe.Distillation`; evaluation is the evaluate stage's
:func:`~components.evaluate.stage.evaluate_model`; registration goes to
``distill.registered_name`` (default ``<register.model_name>-student``), so the student has its own
aliases and its own champion, and its versions carry ``imgflow.teacher``.

Files: ``outputs/distill/`` (``model/``, ``run.json``, ``history.json``, ``params.yaml``,
``evaluate/``, ``registration.json``); the teacher's files are kept under
``<state_dir>/distill/teacher`` for the workers and for ``--resume``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from components.core.config import Params
from components.core.errors import DataError, GatesFailedError, TrackingError
from components.core.jsonio import read_json, write_json, write_text_atomic
from components.data.manifest import DatasetInfo, data_version, require_manifest
from components.pipeline.context import StagePaths, connect_tracking, experiment_id
from components.pipeline.records import Evaluation

if TYPE_CHECKING:
    from components.evaluate.champion import Champion
    from components.registry.registry import Registration
    from components.train.ray_adapter import RayOptions

TEACHER_TAG = "imgflow.teacher"
"""Version tag of a distilled model: the teacher's ``<name>/<version>`` (or its URI or folder)."""


@dataclass(frozen=True)
class Teacher:
    """The resolved teacher: its local model folder, what the user named, and what it is in the registry."""

    model_dir: Path
    uri: str
    name: str | None
    version: str | None

    @property
    def label(self) -> str:
        """``<name>/<version>`` for a registered teacher, else its URI (a run or a local folder)."""
        return f"{self.name}/{self.version}" if self.name and self.version else self.uri

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "name": self.name, "version": self.version, "model_dir": str(self.model_dir)}


@dataclass(frozen=True)
class DistillResult:
    """What ``imgflow distill`` did: the student's training run, its evaluation and its registration."""

    teacher: Teacher
    student: str
    run_id: str
    model_dir: Path
    epochs: int
    seconds: float
    final: dict[str, float]
    evaluation: Evaluation
    registration: Registration

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.to_dict(),
            "student": self.student,
            "run_id": self.run_id,
            "model_dir": str(self.model_dir),
            "epochs": self.epochs,
            "seconds": self.seconds,
            "final": dict(self.final),
            "evaluation": self.evaluation.to_dict(),
            "registration": self.registration.to_dict(),
        }


def student_params(params: Params, student: str) -> Params:
    """The params of the student's run: ``train.model`` is the student, ``register.model_name`` its own
    registered model (so evaluate's champion comparison and registration concern the student's line)."""
    name = params.distill.registered_name or f"{params.register_.model_name}-student"
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"model": student}),
            "register_": params.register_.model_copy(update={"model_name": name}),
        }
    )


def resolve_teacher(params: Params, uri: str, *, dst: Path) -> Teacher:
    """The teacher's model folder: a local folder holding model.json as is, else the registry/run URI
    downloaded into ``dst`` (replaced). A URI that does not resolve is a DataError naming it."""
    from components.model.checkpoint import SPEC_FILE
    from components.registry import tracking

    if (Path(uri) / SPEC_FILE).is_file():
        return Teacher(model_dir=Path(uri).resolve(), uri=uri, name=None, version=None)
    if not uri.startswith(("models:/", "runs:/")):
        raise DataError(
            f"teacher {uri!r} is neither a model folder (with model.json) nor a registry URI "
            "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model)"
        )
    connect_tracking(params)
    try:
        resolved = tracking.resolve_model_version(uri)
    except TrackingError as e:  # a missing model or alias is a refusal, named as such
        raise DataError(f"teacher {uri!r} does not resolve in the registry: {_first_line(e)}") from e
    if dst.exists():
        shutil.rmtree(dst)
    model_dir = tracking.download_model_dir(uri, dst)
    name, version = (resolved[0], resolved[1]) if resolved else (None, None)
    return Teacher(model_dir=model_dir, uri=uri, name=name, version=version)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def run_distill(
    params: Params,
    *,
    teacher_uri: str,
    student: str,
    progress: bool = True,
    resume: bool = False,
    ray_options: RayOptions | None = None,
    raise_on_gate_failure: bool = True,
) -> DistillResult:
    """Distil ``teacher_uri`` into a ``student`` (timm name) on the ingested data; evaluate and register it.

    The teacher is checked against the data (classes, channels, task) before Ray starts, so a wrong
    teacher leaves the registry and the MLflow store unchanged. ``resume``: continue the last
    ``imgflow distill`` run from its checkpoint (the teacher kept from that run is used again).
    Gates failed: the student is registered as ``candidate`` only, then GatesFailedError (exit 3), or,
    with ``raise_on_gate_failure=False``, the result says so.
    """
    from components.train.distill import check_teacher
    from components.train.recipe import Distillation, resolve_in_chans

    _check_student(student)
    sp = student_params(params, student)
    paths, out = StagePaths(sp), StagePaths(sp).out("distill")
    require_manifest(paths.data)
    info = DatasetInfo.load(paths.data.dataset)
    previous = _previous_run(out) if resume else None
    teacher_home = paths.state / "distill" / "teacher"
    if previous:
        teacher = Teacher(**{**previous["teacher"], "model_dir": Path(previous["teacher"]["model_dir"])})
    else:
        teacher = resolve_teacher(sp, teacher_uri, dst=teacher_home)
    check_teacher(teacher.model_dir, classes=info.classes, in_chans=resolve_in_chans(sp.train, paths.data),
                  task=info.task)  # fmt: skip
    distill = Distillation(teacher.model_dir, sp.distill.temperature, sp.distill.alpha)
    run, ray_run = _start_run(sp, out, teacher, student, previous)
    trained = _train_student(sp, out, run, ray_run, distill, progress=progress, ray_options=ray_options)
    evaluation, champion = _evaluate_student(sp, out, run["run_id"], teacher)
    registration = _register_student(sp, out, run, teacher, champion)
    result = DistillResult(
        teacher=teacher, student=student, run_id=run["run_id"], model_dir=out / "model",
        epochs=len(trained.history), seconds=trained.seconds,
        final={k: float(v) for k, v in trained.final.items() if k.startswith(("val_", "train_")) and k != "train_images_per_s"},
        evaluation=evaluation, registration=registration,
    )  # fmt: skip
    write_json(out / "registration.json", registration, sort_keys=True)
    if not registration.gates_passed and raise_on_gate_failure:
        raise GatesFailedError(registration.failure_message())
    return result


def _check_student(student: str) -> None:
    """A ConfigError now for a student timm does not know, rather than a failure inside every Ray worker."""
    from components.core.errors import ConfigError
    from components.model.models import list_classifiers

    if student not in list_classifiers(student):
        raise ConfigError(f"unknown student model {student!r}: not in timm's registry (timm.list_models())")


def _previous_run(out: Path) -> dict[str, Any] | None:
    run_file = out / "run.json"
    return read_json(run_file, hint="run `imgflow distill` first") if run_file.exists() else None


def _start_run(
    params: Params, out: Path, teacher: Teacher, student: str, previous: dict[str, Any] | None
) -> tuple[dict[str, Any], str]:
    """The student's MLflow run (a new one, or the previous one on ``--resume``) and its Ray run name;
    ``out/run.json`` records both, the teacher and the provenance tags."""
    from components.core.provenance import git_commit
    from components.registry import tracking

    out.mkdir(parents=True, exist_ok=True)
    uri = connect_tracking(params)
    write_text_atomic(out / "params.yaml", yaml.safe_dump(params.to_dict(), sort_keys=False))
    if previous:
        return previous, str(previous["ray_run_name"])
    ray_run = f"distill-{params.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {
        "data_version": data_version(StagePaths(params).data.manifest),
        "git_commit": git_commit(),
        "params_hash": params.fingerprint(),
        "model": student,
        "dataset_source": params.ingest.source,
        "imgflow.kind": "distilled",
        TEACHER_TAG: teacher.label,
        "imgflow.teacher_uri": teacher.uri,
    }
    ref = tracking.start_run(experiment_id(params), run_name=ray_run, params=params.to_dict(), tags=tags,
                             tracking_uri=uri)  # fmt: skip
    run = {**ref.to_dict(), **tags, "ray_run_name": ray_run, "teacher": teacher.to_dict()}
    write_json(out / "run.json", run, sort_keys=True)
    return run, ray_run


def _train_student(
    params: Params,
    out: Path,
    run: dict[str, Any],
    ray_run: str,
    distill: Any,
    *,
    progress: bool,
    ray_options: RayOptions | None,
) -> Any:
    """The train stage's Ray Train run with the teacher in every worker; history, curves and the
    checkpoint logged to the student's MLflow run."""
    from components.evaluate.plots import plot_training_curves
    from components.registry import tracking
    from components.train.training import train

    paths = StagePaths(params)
    try:
        result = train(
            params.train, data=paths.data, out_dir=out, storage_path=paths.state / "ray_results",
            run_name=ray_run, seed=params.project.seed, weights_dir=paths.state / "weights",
            show_progress=progress, ray_options=ray_options, distill=distill,
        )  # fmt: skip
    except BaseException:
        tracking.end_run(run["run_id"], status="FAILED")
        raise
    curves = plot_training_curves(result.history, out / "training_curves.png")
    tracking.log_history(run["run_id"], result.history)
    tracking.log_metrics(run["run_id"], {"train_seconds": result.seconds})
    tracking.log_artifacts(
        run["run_id"], [out / "params.yaml", out / "history.json", curves], artifact_path="train"
    )
    tracking.log_artifacts(run["run_id"], [result.model_dir], artifact_path="checkpoint")
    return result


def _evaluate_student(
    params: Params, out: Path, run_id: str, teacher: Teacher
) -> tuple[Evaluation, Champion | None]:
    """The evaluate stage on the student, compared with its own line's champion (if any); logged to its run."""
    from components.evaluate.stage import evaluate_model
    from components.pipeline.evaluation import find_champion, log_evaluation

    context = {"model": str(out / "model"), "training run": run_id, "teacher": teacher.label,
               "data version": data_version(StagePaths(params).data.manifest)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imgflow-distill-eval-") as tmp:
        champion = find_champion(params, Path(tmp), own_version=None)
        evaluated = evaluate_model(params, out / "model", out_dir=out / "evaluate", run_id=run_id, context=context,
                                   champion=champion)  # fmt: skip
    log_evaluation(evaluated, run_id)
    return Evaluation.from_dict(evaluated.result), champion


def _register_student(
    params: Params, out: Path, run: dict[str, Any], teacher: Teacher, champion: Champion | None
) -> Registration:
    """Register the student (with the temperature and trust files evaluate fitted) as a new version of
    its own model, tagged with its teacher; promoted like ``imgflow register`` when its gates passed."""
    from components.pipeline.stages import register_evaluated
    from components.registry.registry import ANY

    teacher_tags = {
        TEACHER_TAG: teacher.label,
        "imgflow.teacher_uri": teacher.uri,
        "imgflow.kind": "distilled",
    }
    reg, _ = register_evaluated(
        params, model_src=out / "model", eval_dir=out / "evaluate", run=run,
        expected_from=ANY if champion is None else champion.version, extra_tags=teacher_tags,
        hint="run `imgflow distill` again",
    )  # fmt: skip
    return reg
