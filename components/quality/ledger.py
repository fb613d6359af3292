"""The issue ledger: what each audit found, per data version, and what changed since the last one.

Keyed by ``(image_id, issue)`` and the data version (the manifest's md5). :func:`update_ledger`
records one audit's issues under its data version and compares them with the most recent
*other* data version in the ledger:

- ``new``: flagged now, not flagged in the previous version;
- ``persisting``: flagged in both (``first_seen`` says since which version);
- ``resolved``: flagged before, not now — ``resolution`` says ``fixed`` (the image is still in the
  data, e.g. its label was corrected) or ``removed`` (the image is gone).

Re-auditing the same data version replaces that version's rows, so reruns do not pile up. Each
recorder owns its issue types (``issue_types``): the audit records label errors, near-duplicates
and outliers; the CLIP baseline records ``clip_disagreement`` (images whose label CLIP confidently
contradicts) under the same data version, and neither wipes or resolves the other's rows.
Files under the ledger folder: ``ledger.parquet`` (every version's rows, resolved ones included),
``issues.csv`` (this version: open and resolved), ``relabel_queue.csv`` (open label errors, worst
first, with the suggested label, and for multi-label data the suspected missing / extra labels:
what a person should look at) and ``diff.json`` (the counts).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.jsonio import atomic_path, remove_stale_temps, write_json

logger = logging.getLogger(__name__)

KEY = ["image_id", "issue"]
LEDGER_COLUMNS: tuple[str, ...] = (
    "data_version", "image_id", "issue", "status", "resolution", "first_seen", "previous_version",
    "split", "label", "suggested_label", "score", "rank", "group", "path", "recorded_at",
    "missing_labels", "extra_labels",
)  # fmt: skip
"""Multi-label data: ``label`` / ``suggested_label`` are ``|``-joined label sets and
``missing_labels`` / ``extra_labels`` the labels suspected absent from / wrongly in the set (empty
for single-label data; absent from ledgers written before multi-label support, read as empty)."""
STATUSES: tuple[str, ...] = ("new", "persisting", "resolved")


@dataclass(frozen=True)
class LedgerDiff:
    data_version: str
    previous_version: str | None
    counts: dict[str, dict[str, int]]
    """issue type -> {new, persisting, resolved} (every status present, zeros included)."""
    totals: dict[str, int]
    """status -> count over all issue types."""
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_ledger(folder: Path) -> pd.DataFrame:
    path = Path(folder) / "ledger.parquet"
    if not path.exists():
        return pd.DataFrame(columns=list(LEDGER_COLUMNS))
    return pd.read_parquet(path)


def _previous_version(ledger: pd.DataFrame, data_version: str) -> str | None:
    """The most recently recorded data version other than ``data_version``."""
    others = ledger[ledger["data_version"] != data_version]
    if others.empty:
        return None
    latest = others.groupby("data_version")["recorded_at"].max().sort_values(kind="stable")
    return str(latest.index[-1])


def compare(
    issues: pd.DataFrame,
    previous: pd.DataFrame,
    *,
    data_version: str,
    previous_version: str | None,
    current_ids: set[str],
) -> pd.DataFrame:
    """This version's ledger rows: every current issue (new / persisting) plus the previous
    version's open issues that are gone (resolved). ``previous``: the previous version's rows."""
    open_before = previous[previous["status"] != "resolved"] if not previous.empty else previous
    before = open_before.set_index(KEY) if not open_before.empty else None
    now = issues.copy()
    keys = list(zip(now["image_id"], now["issue"], strict=True))
    was_open = [before is not None and k in before.index for k in keys]
    now["status"] = ["persisting" if w else "new" for w in was_open]
    now["first_seen"] = [
        before.loc[k, "first_seen"] if w and before is not None else data_version
        for k, w in zip(keys, was_open, strict=True)
    ]
    now["resolution"] = ""
    gone = pd.DataFrame(columns=now.columns)
    if before is not None:
        still = set(keys)
        resolved = open_before[
            [k not in still for k in zip(open_before["image_id"], open_before["issue"], strict=True)]
        ]
        gone = resolved.copy()
        gone["status"] = "resolved"
        gone["resolution"] = ["fixed" if i in current_ids else "removed" for i in gone["image_id"]]
    out = pd.concat([now, gone[now.columns.intersection(gone.columns)]], ignore_index=True)
    out["data_version"] = data_version
    out["previous_version"] = previous_version or ""
    return out


def update_ledger(
    issues: pd.DataFrame,
    *,
    data_version: str,
    current_ids: set[str],
    folder: Path,
    recorded_at: str,
    export_dir: Path | None = None,
    issue_types: Sequence[str] | None = None,
) -> LedgerDiff:
    """Record ``issues`` (columns of :data:`components.quality.label_quality.ISSUE_COLUMNS`) under
    ``data_version`` in ``folder/ledger.parquet``; write this version's exports (``issues.csv``,
    ``relabel_queue.csv``, ``diff.json``) to ``export_dir`` (default ``folder``); return the
    counts. ``current_ids``: every image_id in this data version (to tell ``fixed`` from
    ``removed``). ``issue_types``: the types this recorder owns (default: every type): only their
    rows are replaced and compared with the previous version; other types' rows stay as they are."""
    folder = Path(folder)
    export_dir = Path(export_dir) if export_dir is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    export_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)  # what a killed audit was writing: never read, so just tidied away
    ledger = read_ledger(folder)
    owned = ledger["issue"].isin(list(issue_types)) if issue_types is not None else ledger["issue"].notna()
    prev_version = _previous_version(ledger, data_version)
    previous = ledger[(ledger["data_version"] == prev_version) & owned] if prev_version else ledger.iloc[:0]
    ledger = ledger[~((ledger["data_version"] == data_version) & owned)]  # a rerun replaces its own rows
    rows = compare(
        issues, previous, data_version=data_version, previous_version=prev_version, current_ids=current_ids
    )
    rows["recorded_at"] = recorded_at
    rows = rows.reindex(columns=list(LEDGER_COLUMNS))
    full = pd.concat([ledger.reindex(columns=list(LEDGER_COLUMNS)), rows], ignore_index=True)
    full = full.astype({"score": "float64", "rank": "float64"})
    with atomic_path(folder / "ledger.parquet") as tmp:  # the ledger spans versions: never half written
        full.to_parquet(tmp, index=False)
    files = _export(rows, export_dir)
    counts = {
        issue: {s: int(((rows["issue"] == issue) & (rows["status"] == s)).sum()) for s in STATUSES}
        for issue in sorted(set(rows["issue"]) | set(issues["issue"]))
    }
    totals = {s: int((rows["status"] == s).sum()) for s in STATUSES}
    diff = LedgerDiff(
        data_version, prev_version, counts, totals, {"ledger": str(folder / "ledger.parquet"), **files}
    )
    write_json(export_dir / "diff.json", diff.to_dict(), sort_keys=True)
    logger.info("issue ledger for data version %s (vs %s): %s", data_version, prev_version, totals)
    return diff


def _export(rows: pd.DataFrame, folder: Path) -> dict[str, str]:
    issues_csv, queue_csv = folder / "issues.csv", folder / "relabel_queue.csv"
    with atomic_path(issues_csv) as tmp:
        rows.to_csv(tmp, index=False)
    queue = rows[(rows["issue"] == "label_error") & (rows["status"] != "resolved")].sort_values(
        "score", kind="stable"
    )
    requests = label_requests(rows)
    if not requests.empty:  # active learning's picks follow the label errors, best first
        queue = pd.concat([queue, requests.assign(score=float("nan"))], ignore_index=True)
    with atomic_path(queue_csv) as tmp:
        _queue_table(queue).to_csv(tmp, index=False)
    return {"issues": str(issues_csv), "relabel_queue": str(queue_csv)}


LABEL_REQUEST = "label_request"
"""The issue type of an unlabelled pool image active learning asks a person to label (``imgflow
label-next``): in the queue with ``split`` :data:`UNLABELLED_SPLIT`, no given label, the suggested
label the model predicts, no label-quality score (the ledger's ``score`` is the strategy's)."""
UNLABELLED_SPLIT = "unlabelled"


def label_requests(rows: pd.DataFrame) -> pd.DataFrame:
    """The open label requests among ledger ``rows``, in rank order."""
    open_ = rows[(rows["issue"] == LABEL_REQUEST) & (rows["status"] != "resolved")]
    return open_.sort_values("rank", kind="stable")


def _queue_table(queue: pd.DataFrame) -> pd.DataFrame:
    cols = ["image_id", "path", "split", "label", "suggested_label", "score", "status", "first_seen"]
    cols += ["missing_labels", "extra_labels"]
    table = queue.reindex(columns=cols).fillna({"missing_labels": "", "extra_labels": ""})
    return table.rename(columns={"label": "given_label", "score": "label_quality"})


def append_label_requests(queue_csv: Path, rows: pd.DataFrame) -> int:
    """Put the open label requests among ``rows`` at the end of an existing relabel queue CSV (the
    audit's), replacing the requests an earlier round appended there; atomic. The label errors and the
    columns stay as they are. Returns the requests written (0 when there is no queue file)."""
    if not Path(queue_csv).exists():
        return 0
    current = pd.read_csv(queue_csv, keep_default_na=False, dtype=str)
    kept = current[current["split"] != UNLABELLED_SPLIT]
    requests = _queue_table(label_requests(rows).assign(score=float("nan")))
    table = pd.concat([kept, requests.reindex(columns=current.columns).fillna("")], ignore_index=True)
    with atomic_path(Path(queue_csv)) as tmp:
        table.to_csv(tmp, index=False)
    return len(requests)
