"""The promotion log: one MLflow run per alias move, in the experiment ``<model>-promotions``.

Each event (register, promote, rollback) is a finished run whose name says what moved
("#7 champion: v4 → v5 (promote)"), whose params hold the facts (action, alias, version, previous,
actor, reason, forced, gate verdict, headline metric) and whose description says it in a sentence.
In the MLflow UI the experiment's run list is the log as a sortable table, newest first; the model
page stays free of it. The exact entry (the dict :func:`read` returns) is the run's
``imgflow.entry`` tag, so reading the log back is lossless.

Append-only and race-free: :func:`append` is called only while the caller holds the promotion lock
(:func:`components.registry.registry.promotion_lock`); it numbers the entry one past the highest
``seq`` so far and never rewrites a run. Deleted runs still count (they are read too), so deleting
a run in the UI does not erase or renumber history.

Registries written before this layout kept the log as registered-model tags
(``promotion_log.000001`` -> JSON). :func:`read` reads both; the first :func:`append` under the
lock copies the old entries into runs (keeping their ``seq`` and time) and then removes the tags.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import partial
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, ViewType
from mlflow.exceptions import MlflowException

from components.registry.tracking import Retry

logger = logging.getLogger(__name__)

LEGACY_PREFIX = "promotion_log."
"""Registered-model tag keys of the old log (one JSON entry per tag)."""
MODEL_TAG = "imgflow.promotion_log"
"""Run tag: the registered model a promotion run belongs to."""
SEQ_TAG = "imgflow.seq"
ENTRY_TAG = "imgflow.entry"
_PAGE = 1000


def experiment_name(name: str) -> str:
    """The experiment holding ``name``'s promotion log."""
    return f"{name}-promotions"


def _missing(e: MlflowException) -> bool:
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or e.get_http_status_code() == 404


# --------------------------------------------------------------------------- the experiment


def find_experiment(client: MlflowClient, name: str, retry: Retry) -> str | None:
    """The id of ``<name>-promotions``, or None when it does not exist (nothing logged yet)."""
    exp_name = experiment_name(name)
    exp = retry.call(lambda: client.get_experiment_by_name(exp_name), f"read experiment {exp_name}")
    return None if exp is None else str(exp.experiment_id)


def ensure_experiment(client: MlflowClient, name: str, retry: Retry) -> str:
    """The id of ``<name>-promotions``: created on first use, restored when somebody deleted it."""
    exp_name = experiment_name(name)
    exp = retry.call(lambda: client.get_experiment_by_name(exp_name), f"read experiment {exp_name}")
    if exp is None:
        return retry.call(lambda: _create_experiment(client, name), f"create experiment {exp_name}")
    if exp.lifecycle_stage == "deleted":
        retry.call(lambda: client.restore_experiment(exp.experiment_id), f"restore experiment {exp_name}")
    return str(exp.experiment_id)


def _create_experiment(client: MlflowClient, name: str) -> str:
    exp_name = experiment_name(name)
    note = (
        f"The promotion log of the registered model **{name}**: one run per alias move "
        "(register, promote, rollback), newest first. Written by imgflow under its promotion lock; "
        "read it with `imgflow models history`."
    )
    tags = {"mlflow.note.content": note, MODEL_TAG: name, "mlflow.experimentKind": "custom_model_development"}
    try:
        return str(client.create_experiment(exp_name, tags=tags))
    except MlflowException as e:  # another registration created it a moment ago
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            raise
        return str(exp.experiment_id)


# --------------------------------------------------------------------------- reading


def _legacy_tags(client: MlflowClient, name: str, retry: Retry) -> dict[str, str]:
    def get() -> dict[str, str]:
        try:
            tags = client.get_registered_model(name).tags or {}
        except MlflowException as e:
            if _missing(e):
                return {}
            raise
        return {k: v for k, v in tags.items() if k.startswith(LEGACY_PREFIX)}

    return retry.call(get, f"read registered model {name}")


def _run_entries(client: MlflowClient, exp_id: str, name: str, retry: Retry) -> list[dict[str, Any]]:
    """Every promotion run's entry in ``exp_id`` (deleted runs included), in no particular order."""
    entries: list[dict[str, Any]] = []
    search = partial(client.search_runs, [exp_id], filter_string=f"tags.`{MODEL_TAG}` = '{name}'",
                     run_view_type=ViewType.ALL, max_results=_PAGE)  # fmt: skip
    token: str | None = None
    while True:
        page = retry.call(partial(search, page_token=token), f"read the promotion log of {name}")
        entries += [json.loads(r.data.tags[ENTRY_TAG]) for r in page if ENTRY_TAG in r.data.tags]
        token = page.token
        if not token:
            return entries


def read(client: MlflowClient, name: str, retry: Retry) -> list[dict[str, Any]]:
    """The log, oldest first: the promotion runs plus any entries still in old-style model tags
    (one entry per ``seq``; the run wins when an entry was copied but its tag not yet removed)."""
    by_seq = {int(e["seq"]): e for e in map(json.loads, _legacy_tags(client, name, retry).values())}
    exp_id = find_experiment(client, name, retry)
    if exp_id is not None:
        by_seq.update({int(e["seq"]): e for e in _run_entries(client, exp_id, name, retry)})
    return [by_seq[k] for k in sorted(by_seq)]


# --------------------------------------------------------------------------- writing (under the lock)


def append(client: MlflowClient, name: str, entry: dict[str, Any], retry: Retry) -> dict[str, Any]:
    """Add ``entry`` as the next ``seq`` and return it with its ``seq`` (caller holds the lock)."""
    exp_id = ensure_experiment(client, name, retry)
    _migrate_legacy(client, name, exp_id, retry)
    seq = max((int(e["seq"]) for e in read(client, name, retry)), default=0) + 1
    entry = {"seq": seq, **entry}
    _write_run(client, name, exp_id, entry, retry)
    return entry


def _migrate_legacy(client: MlflowClient, name: str, exp_id: str, retry: Retry) -> None:
    """Copy old tag entries into runs (those not copied yet), then remove the tags."""
    legacy = _legacy_tags(client, name, retry)
    if not legacy:
        return
    done = {int(e["seq"]) for e in _run_entries(client, exp_id, name, retry)}
    for value in legacy.values():
        entry = json.loads(value)
        if int(entry["seq"]) not in done:
            _write_run(client, name, exp_id, entry, retry)
    for key in legacy:
        retry.call(partial(client.delete_registered_model_tag, name, key), f"remove tag {key}")
    logger.info("moved %d promotion-log entries of %s into experiment %s", len(legacy), name, exp_id)


def _write_run(client: MlflowClient, name: str, exp_id: str, entry: dict[str, Any], retry: Retry) -> None:
    """One finished run for ``entry``: tags (the exact entry among them) at creation, so the run is
    a complete log entry from its first moment; then the params that make the UI table readable."""
    tags = {
        MODEL_TAG: name,
        SEQ_TAG: f"{int(entry['seq']):06d}",
        ENTRY_TAG: json.dumps(entry, sort_keys=True),
        "mlflow.user": str(entry.get("who") or "unknown"),
        "mlflow.note.content": describe(name, entry),
    }
    run = retry.call(
        lambda: client.create_run(exp_id, start_time=_start_time(entry), tags=tags,
                                  run_name=run_name(entry)),
        f"log promotion {entry['seq']} of {name}",
    )  # fmt: skip
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in sorted(event_params(entry).items())]
    retry.call(lambda: client.log_batch(run_id, params=params), f"log promotion {entry['seq']} params")
    # update_run, not set_terminated: the latter prints two "View run at" lines per call on a server
    retry.call(lambda: client.update_run(run_id, status="FINISHED"), f"finish promotion {entry['seq']}")


def _start_time(entry: dict[str, Any]) -> int | None:
    """The run's start (ms) from the entry's ``when`` (whole seconds), plus ``seq`` milliseconds:
    events of the same second then sort in log order in the UI's run list."""
    try:
        when = datetime.fromisoformat(entry["when"]) if entry.get("when") else None
    except ValueError:
        when = None
    return None if when is None else int(when.timestamp()) * 1000 + int(entry["seq"]) % 1000


# --------------------------------------------------------------------------- what the UI shows


def _version(v: Any) -> str:
    return f"v{v}" if v not in (None, "") else "none"


def run_name(entry: dict[str, Any]) -> str:
    """``#7 champion: v4 → v5 (promote, forced)``: the run list's first column."""
    how = entry["action"] + (", forced" if entry.get("forced") else "")
    return (
        f"#{entry['seq']} {entry['alias']}: {_version(entry.get('from'))} → {_version(entry['to'])} ({how})"
    )


def event_params(entry: dict[str, Any]) -> dict[str, str]:
    """The entry as flat run params (columns of the run table)."""
    gates = entry.get("gates") or {}
    params = {
        "seq": str(entry["seq"]),
        "action": str(entry["action"]),
        "alias": str(entry["alias"]),
        "version": str(entry["to"]),
        "previous": str(entry.get("from") or "none"),
        "actor": str(entry.get("who") or "unknown"),
        "reason": str(entry.get("why") or "-")[:500],
        "forced": str(bool(entry.get("forced"))).lower(),
        "gates_passed": str(bool(gates.get("passed"))).lower(),
        "failed_gates": ",".join(gates.get("failed") or []) or "none",
    }
    params.update({k: str(gates[k]) for k in ("test_accuracy", "test_mAP") if gates.get(k) is not None})
    return params


def describe(name: str, entry: dict[str, Any]) -> str:
    """The run's Markdown description: the move in one sentence, then the gate verdict."""
    gates = entry.get("gates") or {}
    to = entry["to"]
    moved = (
        f"**{entry['alias']}** of `{name}` moved from {_version(entry.get('from'))} to "
        f"[version {to}](#/models/{name}/versions/{to}) ({entry['action']}) by `{entry.get('who')}` "
        f"at {entry.get('when')}."
    )
    why = f"\n\nReason: {entry['why']}" if entry.get("why") else ""
    forced = "\n\n**Forced**: the gates of this version did not pass." if entry.get("forced") else ""
    failed = ", ".join(f"`{g}`" for g in gates.get("failed") or [])
    verdict = "PASSED" if gates.get("passed") else f"FAILED ({failed or 'no gate verdict'})"
    return f"{moved}{why}{forced}\n\nGates of version {to}: **{verdict}**."
