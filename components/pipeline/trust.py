"""Glue for the "can this model be trusted here?" commands and checks: data drift and explanations.

- :func:`run_drift` (``imgflow drift <folder|csv|predictions.parquet>``): production images against
  the champion's training data, both embedded by the champion; logged to MLflow.
- :func:`version_drift`: a new data version against the champion's training data, for the retrain
  check and the validation report (the quality package cannot import the model: the result is
  computed here and handed to its report writer).
- :func:`warm_reference`: embeds a registered model's training data once (the embedding store), so
  that the next data version has a reference to be compared with.
- :func:`run_explain` (``imgflow explain``): Grad-CAM overlays of images as PNG files.

The work is in :mod:`components.evaluate.drift`, :mod:`components.evaluate.explain` and
:mod:`components.model.embedding_store`; unreadable images are reported per file, never fatal.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.core.config import Params
from components.core.errors import DataError
from components.core.jsonio import write_json
from components.data.manifest import data_version
from components.pipeline.context import StagePaths, connect_tracking, experiment_id
from components.pipeline.models import resolve_model_uri

if TYPE_CHECKING:
    from components.evaluate.drift import DriftResult
    from components.model.checkpoint import Predictor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unreadable:
    """An input file that could not be used, and why."""

    path: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


@dataclass(frozen=True)
class DriftReport:
    """``imgflow drift``: the test's verdict on a batch of images, or why it was not measured."""

    source: str
    model: str
    images: int
    """Images embedded (readable ones)."""
    listed: int
    """Images the source lists (the test reads a seeded sample of ``drift.max_samples`` of them)."""
    reference: str
    result: DriftResult | None
    unreadable: tuple[Unreadable, ...] = ()
    note: str = ""
    run_id: str | None = None
    report: Path | None = None

    @property
    def drifted(self) -> bool:
        return bool(self.result and self.result.drifted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "model": self.model, "images": self.images, "listed": self.listed,
            "reference": self.reference, "result": self.result.to_dict() if self.result else None,
            "drifted": self.drifted, "unreadable": [u.to_dict() for u in self.unreadable], "note": self.note,
            "run_id": self.run_id, "report": str(self.report) if self.report else None,
        }  # fmt: skip

    def summary(self) -> str:
        """The CLI's human answer."""
        lines = [f"{self.source}: {self.result.summary() if self.result else 'not measured'}"]
        lines.append(f"  model {self.model}; reference: {self.reference}")
        if self.note:
            lines.append(f"  note: {self.note}")
        lines += [f"  unreadable: {u.path}: {u.error}" for u in self.unreadable]
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs


def list_sources(source: Path) -> list[Path]:
    """Image files of a folder or CSV (``components.serve.predict.list_inputs``), or the ``path`` column
    of a predictions Parquet file written by ``imgflow predict``."""
    from components.serve.predict import list_inputs

    source = Path(source)
    if source.suffix.lower() == ".parquet" and source.is_file():
        import pandas as pd

        try:
            paths = pd.read_parquet(source, columns=["path"])["path"].astype(str)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{source} is not a predictions file with a 'path' column ({e})") from e
        if paths.empty:
            raise DataError(f"{source} lists no images")
        return [Path(p) for p in paths]
    return list_inputs(source)


def preprocess_each(predictor: Predictor, files: list[Path]) -> tuple[Any, list[Path], list[Unreadable]]:
    """(N, C, H, W) tensor of the readable files, those files, and one record per unreadable file."""
    import torch

    tensors, kept, bad = [], [], []
    for f in files:
        try:
            tensors.append(predictor.preprocess([f.read_bytes()])[0])
            kept.append(f)
        except (DataError, OSError) as e:
            bad.append(Unreadable(str(f), str(e)))
    shape = tuple(predictor.spec.data_config["input_size"])
    return (torch.stack(tensors) if tensors else torch.zeros((0, *shape))), kept, bad


def _sample(files: list[Path], n: int, seed: int) -> list[Path]:
    if len(files) <= n:
        return files
    keep = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
    return [files[i] for i in keep]


# --------------------------------------------------------------------------- model + reference


@dataclass(frozen=True)
class _Model:
    uri: str
    model_dir: Path
    data_version: str | None
    """The data version it was trained on (registry tags), None when unknown (a local folder)."""
    label: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def _resolve_model(params: Params, model: str | None, tmp: Path) -> _Model:
    """The model folder and its training data version (from the registry alias's provenance tags)."""
    from components.model.checkpoint import SPEC_FILE

    uri = resolve_model_uri(params, model)
    if (Path(uri) / SPEC_FILE).exists():
        return _Model(uri, Path(uri), None, label=f"model folder {uri}")
    from components.registry import tracking

    connect_tracking(params)
    model_dir = tracking.download_model_dir(uri, tmp / "model")
    rest = uri.removeprefix("models:/")
    tags: dict[str, str] = {}
    if rest != uri and "@" in rest:
        name, alias = rest.split("@", 1)
        tags = tracking.alias_provenance(name, alias) or {}
    label = f"{uri} (version {tags['version']})" if tags.get("version") else uri
    return _Model(uri, model_dir, tags.get("data_version"), label=label, tags=tags)


def reference_embeddings(
    params: Params, model_dir: Path, trained_on: str | None
) -> tuple[np.ndarray, str, str]:
    """The train split of the model's training data version, embedded at ``drift.layer`` (embedding
    store), with a description and a note. When that version is no longer embedded (it was never
    computed before the data changed), the current data version's train split stands in, said in
    the note."""
    from components.model.embedding_store import embed_project, load_cached, model_hash

    paths = StagePaths(params)
    layer = params.drift.layer
    if trained_on:
        cached = load_cached(
            paths.data.root, data_version_=trained_on, model_hash_=model_hash(model_dir), layer=layer
        )
        if cached is not None:
            return cached.split("train"), f"its training data ({trained_on}, train split)", ""
    current = embed_project(params, model_dir, layer=layer)
    note = ""
    if trained_on and trained_on != current.data_version:
        note = (f"the model's training data {trained_on} is not in the embedding store: compared with the "
                f"current data version {current.data_version} instead")  # fmt: skip
    return current.split("train"), f"data version {current.data_version} (train split)", note


# --------------------------------------------------------------------------- imgflow drift


def run_drift(params: Params, source: Path, *, model: str | None = None) -> DriftReport:
    """``imgflow drift``: are these images from the distribution the model was trained on?"""
    from components.evaluate.drift import drift_test
    from components.model.checkpoint import Predictor
    from components.model.embedding_store import embed_tensors

    cfg = params.drift
    listed = list_sources(source)
    files = _sample(listed, cfg.max_samples, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="imgflow-drift-") as tmp:
        resolved = _resolve_model(params, model, Path(tmp))
        predictor = Predictor.from_dir(resolved.model_dir)
        x, kept, bad = preprocess_each(predictor, files)
        reference, ref_label, note = reference_embeddings(params, resolved.model_dir, resolved.data_version)
    result = None
    if len(kept) < 2:
        note = "; ".join(
            filter(None, [note, f"only {len(kept)} readable image(s): a two-sample test needs 2"])
        )
    else:
        current = embed_tensors(predictor.model, x, layer=cfg.layer, batch_size=params.evaluate.batch_size)
        result = drift_test(
            reference, current, alpha=cfg.alpha, permutations=cfg.permutations, max_samples=cfg.max_samples,
            seed=cfg.seed, layer=cfg.layer, reference_name=ref_label, current_name=str(source),
        )  # fmt: skip
    report = DriftReport(source=str(source), model=resolved.label, images=len(kept), listed=len(listed),
                         reference=ref_label, result=result, unreadable=tuple(bad), note=note)  # fmt: skip
    return _record_drift(params, report)


def _record_drift(params: Params, report: DriftReport) -> DriftReport:
    """Write ``outputs/drift/report.json`` and log one finished MLflow run (metrics, verdict, the file)."""
    from dataclasses import replace

    from components.core.provenance import git_commit
    from components.registry import tracking

    out = write_json(StagePaths(params).out("drift") / "report.json", report, sort_keys=True)
    uri = connect_tracking(params)
    result = report.result
    metrics = {"drift_images": float(report.images), "drift_unreadable": float(len(report.unreadable))}
    if result is not None:
        metrics.update(
            drift_mmd2=result.statistic, drift_p_value=result.p_value, drifted=float(result.drifted)
        )
        if result.classifier_auc is not None:
            metrics["drift_classifier_auc"] = result.classifier_auc
    tags = {"imgflow.kind": "drift", "drift_source": report.source[:500], "drift_model": report.model[:500],
            "drift_verdict": result.verdict if result else "not measured", "git_commit": git_commit()}  # fmt: skip
    run = tracking.log_result_run(
        experiment_id(params), run_name="drift", params={"drift": params.drift.model_dump()}, tags=tags,
        tracking_uri=uri, metrics=metrics, artifacts=[out], artifact_path="drift", note=report.note or None,
    )  # fmt: skip
    return replace(report, run_id=run.run_id, report=out)


# --------------------------------------------------------------------------- data versions


def version_drift(
    params: Params, champion: dict[str, str] | None, *, log: bool = False
) -> dict[str, Any] | None:
    """The current data version (train split) against the champion's training data, both embedded by
    the champion: the test's ``to_dict()`` plus ``status: measured``, or ``status: not measured`` with
    the reason. None when there is nothing to compare (drift off, no champion, same data version)."""
    cfg, paths = params.drift, StagePaths(params)
    if not cfg.enabled or not champion or not champion.get("data_version"):
        return None
    current_version = data_version(paths.data.manifest)
    if champion["data_version"] == current_version:
        return None
    # Imported only when there is something to compare: torch and timm cost a no-op run ~4 s.
    from components.evaluate.drift import drift_test
    from components.model.embedding_store import embed_project, load_cached, model_hash

    name = params.register_.model_name
    with tempfile.TemporaryDirectory(prefix="imgflow-drift-") as tmp:
        from components.registry import tracking

        model_dir = tracking.download_model_dir(f"models:/{name}@champion", Path(tmp) / "model")
        mhash = model_hash(model_dir)
        reference = load_cached(paths.data.root, data_version_=champion["data_version"], model_hash_=mhash,
                                layer=cfg.layer)  # fmt: skip
        if reference is None:
            return {"status": "not measured", "reason": f"the champion's training data {champion['data_version']} "
                    "is not in the embedding store (it is embedded when a model is registered)"}  # fmt: skip
        current = embed_project(params, model_dir, layer=cfg.layer)
    result = drift_test(
        reference.split("train"), current.split("train"), alpha=cfg.alpha, permutations=cfg.permutations,
        max_samples=cfg.max_samples, seed=cfg.seed, layer=cfg.layer,
        reference_name=f"champion v{champion.get('version', '?')} training data {champion['data_version']}",
        current_name=f"data version {current_version}",
    )  # fmt: skip
    if log:
        _log_version_drift(params, result, data_version_=current_version)
    return {"status": "measured", **result.to_dict()}


def _log_version_drift(params: Params, result: DriftResult, *, data_version_: str) -> None:
    """One finished MLflow run per measured data-version drift (``imgflow.kind: drift``)."""
    from components.core.provenance import git_commit
    from components.registry import tracking

    metrics = {
        "drift_mmd2": result.statistic,
        "drift_p_value": result.p_value,
        "drifted": float(result.drifted),
    }
    if result.classifier_auc is not None:
        metrics["drift_classifier_auc"] = result.classifier_auc
    tags = {"imgflow.kind": "drift", "drift_source": result.current, "drift_reference": result.reference,
            "drift_verdict": result.verdict, "data_version": data_version_, "git_commit": git_commit()}  # fmt: skip
    tracking.log_result_run(
        experiment_id(params), run_name="drift-data-version", params={"drift": params.drift.model_dump()},
        tags=tags, tracking_uri=connect_tracking(params), metrics=metrics,
    )  # fmt: skip


def warm_reference(params: Params, model_dir: Path) -> None:
    """Embed the current data version under a just-registered model (one pass, cached), so that a later
    data version can be tested against the data this model was trained on. A failure is logged, not
    raised: drift is evidence, the registration stands."""
    from components.model.embedding_store import embed_project

    if not params.drift.enabled:
        return
    try:
        embed_project(params, model_dir, layer=params.drift.layer)
    except (DataError, OSError) as e:
        logger.warning("could not embed the training data for later drift checks: %s", e)


# --------------------------------------------------------------------------- imgflow explain


@dataclass(frozen=True)
class ExplainResult:
    """``imgflow explain``: one overlay PNG per readable image, one record per unreadable one."""

    model: str
    out_dir: Path
    layer: str
    written: tuple[dict[str, Any], ...]
    """``{"image", "overlay", "predicted", "confidence"}`` per explained image."""
    unreadable: tuple[Unreadable, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "out_dir": str(self.out_dir), "layer": self.layer,
                "written": list(self.written), "unreadable": [u.to_dict() for u in self.unreadable]}  # fmt: skip

    def summary(self) -> str:
        lines = [
            f"{len(self.written)} overlay(s) in {self.out_dir} (Grad-CAM at {self.layer} of {self.model})"
        ]
        lines += [
            f"  {w['image']}: {w['predicted']} ({w['confidence']:.0%}) -> {w['overlay']}"
            for w in self.written
        ]
        lines += [f"  unreadable: {u.path}: {u.error}" for u in self.unreadable]
        return "\n".join(lines)


def run_explain(params: Params, images: list[Path], *, model: str | None = None, out: Path) -> ExplainResult:
    """``imgflow explain``: Grad-CAM of each image's top class, written as ``<out>/<name>.gradcam.png``."""
    from components.evaluate.explain import cam_layer, grad_cam, overlay, to_display
    from components.model.checkpoint import Predictor

    if not images:
        raise DataError("no images given: imgflow explain IMAGE [IMAGE ...]")
    with tempfile.TemporaryDirectory(prefix="imgflow-explain-") as tmp:
        resolved = _resolve_model(params, model, Path(tmp))
        predictor = Predictor.from_dir(resolved.model_dir)
    x, kept, bad = preprocess_each(predictor, [Path(p) for p in images])
    written: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    cfg = predictor.spec.data_config
    for start in range(0, len(kept), 64):
        batch, files = x[start : start + 64], kept[start : start + 64]
        cams, classes, probs = grad_cam(predictor.model, batch)
        for f, cam, img, k, p in zip(files, cams, to_display(batch, cfg["mean"], cfg["std"]), classes, probs,
                                     strict=True):  # fmt: skip
            # Two inputs of one name (from different folders) get distinct overlays.
            target = out / f"{f.stem}.gradcam.png"
            if any(w["overlay"] == str(target) for w in written):
                target = out / f"{f.stem}.{len(written)}.gradcam.png"
            overlay(img, cam).save(target)
            written.append({"image": str(f), "overlay": str(target),
                            "predicted": predictor.spec.classes[int(k)], "confidence": float(p)})  # fmt: skip
    return ExplainResult(model=resolved.label, out_dir=out, layer=cam_layer(predictor.model).name,
                         written=tuple(written), unreadable=tuple(bad))  # fmt: skip
