"""Active-learning glue: ``imgflow label-next`` (rank the unlabelled pool) and ``imgflow label-import``
(turn a labeller's CSV into a new data version).

``label-next`` scans the pool (:mod:`components.data.pool`), embeds the labelled data version through
the embedding store and the pool under the same model (the ``--model`` folder, else the registry's
champion; with neither, downsampled pixels, said in the output), fits a logistic probe on the labelled
train split, scores the pool with one strategy of :mod:`components.quality.active_learning` (``auto``:
replay the strategies on the labelled history against a random control, pick the best, say why), drops
near-duplicates within the batch and writes ``outputs/label-next/``: ``queue.csv`` (rank, image_id,
score, prediction, strategy), ``labels.csv`` (``image_id,path,label`` for the labeller), ``replay.json``
and ``summary.json``; it records the picks in the issue ledger as ``label_request`` rows (so the next
data version shows them resolved once labelled), appends them to the audit's relabel queue and logs an
MLflow run with the replayed learning curves.

``label-import`` validates the whole CSV before touching anything (unknown ids, unknown classes,
duplicate and conflicting rows, missing columns: one error listing them all, exit 2, nothing imported),
then adds the labels to ``pool/labels.csv`` and re-ingests: the images join the train split with their
ids unchanged, a new data version that ``imgflow pipeline``'s retrain-on-change picks up.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.config import Params
from components.core.errors import ConfigError, DataError, TrackingError
from components.core.jsonio import write_json, write_text_atomic
from components.data.manifest import DatasetInfo, data_version, read_manifest, require_manifest
from components.data.pool import (
    PoolSummary,
    ingest_pool,
    pool_root,
    read_imported,
    read_pool,
    write_imported,
)
from components.pipeline.context import StagePaths, connect_tracking, experiment_id
from components.quality import active_learning as al

logger = logging.getLogger(__name__)

STRATEGY_CHOICES: tuple[str, ...] = (
    "auto",
    "margin",
    "entropy",
    "least_confident",
    "bald",
    "typical",
    "random",
)
BALD_MEMBERS = 5
"""Committee size for ``bald``: bootstrap probes (T = 5)."""
_PIXEL_SIDE = 16
_REPLAY_TRAIN = 2000
_REPLAY_EVAL = 1000
_REPLAY_ROUNDS = 3


@dataclass(frozen=True)
class Features:
    """Labelled train rows and pool rows in one feature space, and where the features came from."""

    train: np.ndarray
    train_labels: np.ndarray
    eval: np.ndarray
    eval_labels: np.ndarray
    pool: np.ndarray
    source: str


@dataclass(frozen=True)
class LabelNextResult:
    """What ``imgflow label-next`` picked and why."""

    strategy: str
    asked: str
    reason: str
    budget: int
    picked: int
    candidates: int
    dropped_duplicates: int
    features: str
    data_version: str
    pool: dict[str, Any]
    files: dict[str, str]
    queue: list[dict[str, Any]]
    replay: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LabelImportResult:
    """What ``imgflow label-import`` added, and the data version it made."""

    imported: int
    skipped_blank: int
    already_imported: int
    per_class: dict[str, int]
    data_version_before: str
    data_version: str
    labels_file: str
    ingested: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ label-next


def run_label_next(
    params: Params,
    *,
    budget: int,
    strategy: str = "auto",
    pool: Path | None = None,
    model: Path | None = None,
    seed: int | None = None,
) -> LabelNextResult:
    """Rank the unlabelled pool and write the queue (see the module docstring)."""
    if budget < 1:
        raise ConfigError(f"--budget {budget}: must be >= 1")
    if strategy not in STRATEGY_CHOICES:
        raise ConfigError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGY_CHOICES)}")
    folder = pool or params.ingest.unlabelled
    if folder is None:
        raise ConfigError("no unlabelled pool: set ingest.unlabelled in params.yaml or pass --pool <folder>")
    paths = StagePaths(params)
    seed = params.project.seed if seed is None else seed
    manifest_path = require_manifest(paths.data)
    version = data_version(manifest_path)
    manifest = read_manifest(manifest_path)
    info = DatasetInfo.load(paths.data.dataset)
    if info.task != "singlelabel":
        raise ConfigError(f"imgflow label-next ranks images for single-label tasks; this data is {info.task}")
    scanned = ingest_pool(Path(folder), data_dir=paths.data.root, max_pixels=params.ingest.max_pixels)
    rows = read_pool(paths.data.root)
    rows = rows[~rows["image_id"].isin(set(manifest["image_id"]))].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"nothing to label: every image of the pool {folder} is already in the data version")
    feats = _features(params, manifest, rows, info.classes, model=model)
    choice = _choose(strategy, feats, budget=budget, seed=seed)
    n_classes = len(info.classes)
    members = BALD_MEMBERS if choice.strategy == "bald" else 1
    probs = al.probe_probs(feats.train, feats.train_labels, feats.pool, n_classes=n_classes, members=members,
                           seed=seed)  # fmt: skip
    scored = al.rank(choice.strategy, budget=budget, pool=feats.pool, probs=probs, seed=seed)
    picked = al.select(scored.scores, budget, features=feats.pool, phashes=list(rows["phash"].fillna("")))
    queue = _queue_rows(rows, picked.rows, scored, probs, info.classes, strategy=choice.strategy)
    out = paths.out("label-next")
    files = _write_outputs(params, out, queue, choice, version=version, root=pool_root(paths.data.root))
    run_id = _log_run(params, choice, version=version, files=files, strategy=strategy, budget=budget)
    return LabelNextResult(
        strategy=choice.strategy, asked=strategy, reason=choice.reason, budget=budget, picked=len(queue),
        candidates=len(rows), dropped_duplicates=len(picked.dropped), features=feats.source,
        data_version=version, pool=PoolSummary.to_dict(scanned), files=files, queue=queue,
        replay=choice.table, note=scored.note, run_id=run_id,
    )  # fmt: skip


def _choose(strategy: str, feats: Features, *, budget: int, seed: int) -> al.Choice:
    """The strategy to use: as asked, or ``auto``'s replay winner (with the replay table)."""
    if strategy != "auto":
        return al.Choice(strategy, f"asked for {strategy} (--strategy)", [], {})
    x, y = _subsample(feats.train, feats.train_labels, _REPLAY_TRAIN, seed)
    xe, ye = _subsample(feats.eval, feats.eval_labels, _REPLAY_EVAL, seed + 1)
    n_classes = len(np.unique(y))
    start = max(n_classes, min(budget, len(x) // 4))
    batch = max(1, min(budget, (len(x) - start) // (_REPLAY_ROUNDS + 1)))
    if len(x) < 2 * n_classes or len(xe) == 0 or len(x) - start < _REPLAY_ROUNDS:
        reason = (f"too few labelled train images ({len(x)}) to replay strategies: starting with typical "
                  "(k-means cold start)")  # fmt: skip
        return al.Choice("typical", reason, [], {})
    curves = al.replay(x, y, xe, ye, start=start, batch=batch, rounds=_REPLAY_ROUNDS, seeds=(seed,))
    return al.choose(curves)


def _subsample(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= n:
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[idx], y[idx]


def _queue_rows(
    rows: pd.DataFrame,
    picked: tuple[int, ...],
    scored: al.Scored,
    probs: np.ndarray,
    classes: tuple[str, ...],
    *,
    strategy: str,
) -> list[dict[str, Any]]:
    mean = probs.mean(axis=2)
    return [
        {"rank": k, "image_id": str(rows.at[i, "image_id"]), "path": str(rows.at[i, "path"]),
         "source_path": str(rows.at[i, "source_path"]), "score": round(float(scored.scores[i]), 6),
         "prediction": classes[int(mean[i].argmax())], "confidence": round(float(mean[i].max()), 4),
         "strategy": strategy}
        for k, i in enumerate(picked, start=1)
    ]  # fmt: skip


def _write_outputs(
    params: Params, out: Path, queue: list[dict[str, Any]], choice: al.Choice, *, version: str, root: Path
) -> dict[str, str]:
    """queue.csv, labels.csv (for the labeller), replay.json, the ledger rows and the audit queue."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(queue, columns=["rank", "image_id", "path", "source_path", "score", "prediction",
                                         "confidence", "strategy"])  # fmt: skip
    write_text_atomic(out / "queue.csv", table.to_csv(index=False, lineterminator="\n"))
    blank = pd.DataFrame({"image_id": table["image_id"], "path": [str(root / p) for p in table["path"]],
                          "label": ""})  # fmt: skip
    write_text_atomic(out / "labels.csv", blank.to_csv(index=False, lineterminator="\n"))
    write_json(out / "replay.json", {"strategy": choice.strategy, "reason": choice.reason,
                                     "table": choice.table, "curves": _curves(choice)})  # fmt: skip
    files = {"queue": str(out / "queue.csv"), "labels_csv": str(out / "labels.csv"),
             "replay": str(out / "replay.json")}  # fmt: skip
    return files | _record(params, table, version=version, out=out)


def _curves(choice: al.Choice) -> dict[str, list[dict[str, Any]]]:
    return {name: [{"seed": s, "labels": list(c.labels), "accuracy": list(c.accuracy)} for s, c in enumerate(cs)]
            for name, cs in choice.curves.items()}  # fmt: skip


def _record(params: Params, table: pd.DataFrame, *, version: str, out: Path) -> dict[str, str]:
    """The picks as ``label_request`` rows in the issue ledger (exports under ``out``), appended to the
    audit's relabel queue when it exists."""
    from components.quality.ledger import (
        LABEL_REQUEST,
        UNLABELLED_SPLIT,
        append_label_requests,
        update_ledger,
    )

    paths = StagePaths(params)
    issues = pd.DataFrame({
        "image_id": table["image_id"], "issue": LABEL_REQUEST, "split": UNLABELLED_SPLIT, "label": "",
        "suggested_label": table["prediction"], "score": table["score"].astype(float),
        "rank": table["rank"].astype(float), "group": "", "path": table["path"], "missing_labels": "",
        "extra_labels": "",
    })  # fmt: skip
    manifest = read_manifest(paths.data.manifest)
    diff = update_ledger(
        issues, data_version=version, current_ids=set(manifest["image_id"]), folder=paths.state / "audit-ledger",
        export_dir=out, recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        issue_types=(LABEL_REQUEST,),
    )  # fmt: skip
    audit_queue = paths.out("audit") / "relabel_queue.csv"
    if append_label_requests(audit_queue, issues.assign(status="new")):
        return {**diff.files, "audit_relabel_queue": str(audit_queue)}
    return dict(diff.files)


def _log_run(
    params: Params, choice: al.Choice, *, version: str, files: dict[str, str], strategy: str, budget: int
) -> str | None:
    """One MLflow run: the replayed learning curve of each strategy (step = labelled images), the pick,
    the queue. None (logged) when the tracking store cannot be reached: the queue is written already."""
    from components.registry import tracking

    try:
        uri = connect_tracking(params)
        run = tracking.start_run(
            experiment_id(params), run_name=f"label-next-{version[:8]}",
            params={"label_next": {"strategy": strategy, "chosen": choice.strategy, "budget": budget}},
            tags={"data_version": version, "stage": "label-next", "reason": choice.reason[:5000]},
            tracking_uri=uri,
        )  # fmt: skip
        for name, curves in choice.curves.items():
            for curve in curves[:1]:
                for n, acc in zip(curve.labels, curve.accuracy, strict=True):
                    tracking.log_metrics(run.run_id, {f"replay_{name}_accuracy": acc}, step=n)
        for row in choice.table:
            tracking.log_metrics(run.run_id, {f"replay_{row['strategy']}_gain_pt": row["gain_vs_random_pt"]})
        tracking.log_artifacts(
            run.run_id, [Path(files["queue"]), Path(files["replay"])], artifact_path="label-next"
        )
        tracking.end_run(run.run_id)
        return run.run_id
    except TrackingError as e:
        logger.warning("label-next: the MLflow run was not logged (%s); the queue is written", e)
        return None


# ------------------------------------------------------------------------------------------ features


def _features(
    params: Params,
    manifest: pd.DataFrame,
    pool: pd.DataFrame,
    classes: tuple[str, ...],
    *,
    model: Path | None,
) -> Features:
    """Labelled and pool features under the model (``--model`` folder, else the champion), else pixels."""
    data_root = StagePaths(params).data.root
    index = {c: i for i, c in enumerate(classes)}
    pool_files = [pool_root(data_root) / p for p in pool["path"]]
    with tempfile.TemporaryDirectory(prefix="imgflow-label-next-") as tmp:
        model_dir, why = _model_dir(params, model, Path(tmp))
        if model_dir is not None:
            cache = pool_root(data_root) / "embeddings"
            vectors, pool_x, source = _embedded(params, model_dir, pool_files, why, cache=cache)
        else:
            vectors = _pixels([data_root / p for p in manifest["path"]])
            pool_x, source = _pixels(pool_files), f"downsampled pixels ({_PIXEL_SIDE}x{_PIXEL_SIDE}): {why}"
    labels = np.array([index.get(lab, -1) for lab in manifest["label"]])
    split = manifest["split"].to_numpy()
    train = (split == "train") & (labels >= 0)
    held = (split == "val") & (labels >= 0)
    if not held.any():
        held = (split == "test") & (labels >= 0)
    if train.sum() < 2 or len(np.unique(labels[train])) < 2:
        raise DataError("label-next needs labelled train images of at least two classes to fit its probe")
    return Features(vectors[train], labels[train], vectors[held], labels[held], pool_x, source)


def _model_dir(params: Params, model: Path | None, tmp: Path) -> tuple[Path | None, str]:
    """(the model folder, what it is) or (None, why there is none)."""
    if model is not None:
        if not (Path(model) / "model.json").exists():
            raise ConfigError(f"--model {model}: not an imgflow model folder (no model.json)")
        return Path(model), f"model folder {model}"
    name = params.register_.model_name
    if params.register_.tracking_uri is None and not (params.project.state_dir / "mlflow.db").exists():
        return None, "no champion yet (no model registry)"
    from components.registry import tracking

    try:
        connect_tracking(params)
        if tracking.alias_provenance(name, tracking.CHAMPION) is None:
            return None, f"no champion of {name} yet"
        return tracking.download_model_dir(f"models:/{name}@champion", tmp / "model"), f"{name}@champion"
    except (TrackingError, DataError) as e:
        return None, f"the champion could not be read ({e})"


def _embedded(
    params: Params, model_dir: Path, pool_files: list[Path], what: str, *, cache: Path
) -> tuple[np.ndarray, np.ndarray, str]:
    """The manifest's features from the embedding store, the pool's under the same model and layer
    (cached under ``pool/embeddings``, by model hash and the pool's ids)."""
    from components.model.checkpoint import load_classifier
    from components.model.embedding_store import embed_files, embed_project, model_hash
    from components.model.features import DEFAULT_LAYER

    batch = params.evaluate.batch_size
    emb = embed_project(params, model_dir, layer=DEFAULT_LAYER)
    key = hashlib.sha256("\n".join(p.name for p in pool_files).encode()).hexdigest()[:16]
    file = cache / f"{model_hash(model_dir)}-{DEFAULT_LAYER}-{key}.npy"
    if file.exists():
        pool_x = np.load(file)
    else:
        net, spec = load_classifier(model_dir)
        pool_x = embed_files(net, spec, pool_files, layer=DEFAULT_LAYER, batch_size=batch)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.stem}.tmp.npy")  # a reader sees the whole array or none
        np.save(tmp, pool_x.astype(np.float32))
        tmp.replace(file)
    return emb.vectors, pool_x, f"{what}, layer {DEFAULT_LAYER} (embedding store)"


def _pixels(files: list[Path]) -> np.ndarray:
    from PIL import Image

    from components.data.image_stats import model_input

    out = np.zeros((len(files), _PIXEL_SIDE * _PIXEL_SIDE), dtype=np.float32)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            small = model_input(im, "L").resize((_PIXEL_SIDE, _PIXEL_SIDE), Image.Resampling.BILINEAR)
        out[i] = np.asarray(small, dtype=np.float32).ravel() / 255.0
    return out


# ------------------------------------------------------------------------------------------ label-import


def read_label_csv(
    path: Path, *, known_ids: set[str], classes: tuple[str, ...]
) -> tuple[dict[str, str], int]:
    """The labels of a labeller's CSV (image_id -> label) and how many rows were left blank.

    The whole file is checked first; every problem (missing columns, unknown ids, unknown classes,
    duplicate rows, conflicting rows) goes into ONE ConfigError listing them, so nothing is imported
    from a file that has any."""
    if not Path(path).is_file():
        raise ConfigError(f"label CSV {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            lines = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(
            f"label CSV {path} cannot be parsed ({e}): expected a UTF-8 CSV with a header"
        ) from e
    missing = [c for c in ("image_id", "label") if c not in header]
    if missing:
        raise ConfigError(f"label CSV {path}: missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'}); "
                          "expected image_id,path,label as `imgflow label-next` writes it")  # fmt: skip
    return _check_rows(lines, path=path, known_ids=known_ids, classes=classes)


def _check_rows(
    lines: list[dict[str, str]], *, path: Path, known_ids: set[str], classes: tuple[str, ...]
) -> tuple[dict[str, str], int]:
    problems: list[str] = []
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    blank = 0
    for n, row in enumerate(lines, start=2):  # line numbers as a spreadsheet shows them
        image_id, label = row.get("image_id", ""), row.get("label", "")
        if not label:
            blank += 1  # not labelled yet: skipped, not an error
            continue
        if image_id not in known_ids:
            problems.append(f"line {n}: unknown image_id {image_id!r} (not in the unlabelled pool)")
        if label not in classes:
            problems.append(f"line {n}: unknown class {label!r} (classes: {', '.join(classes)})")
        if image_id in labels and labels[image_id] != label:
            problems.append(f"line {n}: conflicting labels for {image_id}: {labels[image_id]!r} on line "
                            f"{first_line[image_id]} and {label!r} here")  # fmt: skip
        elif image_id in labels:
            problems.append(f"line {n}: duplicate row for {image_id} (same as line {first_line[image_id]})")
        else:
            labels[image_id], first_line[image_id] = label, n
    if problems:
        shown = "\n  ".join(problems[:50]) + (
            f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        )
        raise ConfigError(
            f"label CSV {path} has {len(problems)} problem(s); nothing was imported:\n  {shown}"
        )
    return labels, blank


def run_label_import(params: Params, labels_csv: Path, *, progress: bool = False) -> LabelImportResult:
    """Validate ``labels_csv``, add its labels to ``pool/labels.csv`` and re-ingest (one new data version).

    The labels file is replaced atomically and put back as it was when the ingest fails, so a failed
    import leaves the data dir as it found it."""
    from components.pipeline.stages import run_ingest

    paths = StagePaths(params)
    root = paths.data.root
    before = data_version(require_manifest(paths.data))
    info = DatasetInfo.load(paths.data.dataset)
    pool = read_pool(root)
    imported = read_imported(root)
    labels, blank = read_label_csv(labels_csv, known_ids=set(pool["image_id"]), classes=tuple(info.classes))
    previous = dict(zip(imported["image_id"], imported["label"], strict=True))
    clashes = [f"{i}: imported before as {previous[i]!r}, now {lab!r}" for i, lab in labels.items()
               if i in previous and previous[i] != lab]  # fmt: skip
    if clashes:
        raise ConfigError(f"label CSV {labels_csv} relabels images imported before; nothing was imported:\n  "
                          + "\n  ".join(clashes[:50]))  # fmt: skip
    fresh = {i: lab for i, lab in labels.items() if i not in previous}
    # an image the data version already holds from ingest.source: a second copy would be quarantined
    # with it as a duplicate (or both as conflicting labels), so it is refused here instead
    present = set(read_manifest(paths.data.manifest)["image_id"])
    held = sorted(i for i in fresh if i in present)
    if held:
        raise ConfigError(f"label CSV {labels_csv} labels images already in the data version (labelled by "
                          f"ingest.source); nothing was imported:\n  " + "\n  ".join(held[:50]))  # fmt: skip
    if not fresh:
        raise ConfigError(f"label CSV {labels_csv} has no new label ({blank} blank row(s), "
                          f"{len(labels)} already imported): nothing to import")  # fmt: skip
    where = dict(zip(pool["image_id"], pool["path"], strict=True))
    added = pd.DataFrame(
        {"path": [where[i] for i in fresh], "label": list(fresh.values()), "image_id": list(fresh)}
    )
    old_text = (root / "pool" / "labels.csv").read_text() if not imported.empty else None
    write_imported(root, pd.concat([imported, added], ignore_index=True))
    try:
        summary = run_ingest(params, progress=progress)
    except BaseException:
        _restore_labels(root, old_text)
        raise
    return LabelImportResult(
        imported=len(fresh), skipped_blank=blank, already_imported=len(labels) - len(fresh),
        per_class=dict(sorted(Counter(fresh.values()).items())), data_version_before=before,
        data_version=summary.data_version, labels_file=str(root / "pool" / "labels.csv"),
        ingested=summary.ingested,
    )  # fmt: skip


def _restore_labels(root: Path, old_text: str | None) -> None:
    target = root / "pool" / "labels.csv"
    if old_text is None:
        target.unlink(missing_ok=True)
    else:
        write_text_atomic(target, old_text)
