"""Promotion a team can audit: registry aliases as stages, a promotion lock, an append-only log.

Aliases (MLflow deprecated stages for them):

- ``candidate``  — the newest registered version (every version passes through it);
- ``challenger`` — the newest version whose evaluation gates passed;
- ``champion``   — the promoted version: what ``models:/<name>@champion`` serves.

Every alias move imgflow makes happens under a **promotion lock** and is appended to the
**promotion log**. The lock is a registered model named ``<name>.promotion-lock``: creating a
registered model is atomic in every MLflow backend (a unique name in the database, behind the
REST server too), so exactly one of several concurrent creators succeeds; the others wait and
retry. The lock carries a token and an expiry, so a holder that died cannot block promotion
forever. The log is one registered-model tag per entry (``promotion_log.000001`` -> JSON: who,
what, when, why, from -> to, gate summary), written only while holding the lock, never rewritten.

A promotion may name the champion it expects to replace (``expected_from``): registration's
automatic promotion passes the champion the model was evaluated against, so when two pipeline
runs finish together only the one that was compared with the current champion wins; the other
stays ``challenger`` and is told to re-evaluate.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.core.errors import ImgflowError, TrackingError
from components.registry.tracking import with_retries

logger = logging.getLogger(__name__)

T = TypeVar("T")
CANDIDATE, CHALLENGER, CHAMPION = "candidate", "challenger", "champion"
ALIASES = (CANDIDATE, CHALLENGER, CHAMPION)
LOG_PREFIX = "promotion_log."
LOCK_SUFFIX = ".promotion-lock"


class PromotionRefusedError(ImgflowError):
    """A promotion the rules forbid (gates failed without --force/--reason, unknown version)."""


class PromotionConflictError(ImgflowError):
    """Another promotion won the race (the champion moved, or the lock stayed taken)."""

    exit_code = 5


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""``expected_from=ANY``: promote whatever the alias points at now."""


@dataclass(frozen=True)
class Retry:
    """How registry calls retry when the tracking server does not answer."""

    attempts: int = 3
    backoff_s: float = 1.0

    def call(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what=what, attempts=self.attempts, backoff_s=self.backoff_s)


def default_actor() -> str:
    """``user@host`` of whoever runs this process (the promotion log's *who*)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _missing(e: MlflowException) -> bool:
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or e.get_http_status_code() == 404


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reads


def _model_tags(client: MlflowClient, name: str, retry: Retry) -> dict[str, str] | None:
    def get() -> dict[str, str] | None:
        try:
            return dict(client.get_registered_model(name).tags or {})
        except MlflowException as e:
            if _missing(e):
                return None
            raise

    return retry.call(get, f"read registered model {name}")


def alias_target(client: MlflowClient, name: str, alias: str, retry: Retry) -> str | None:
    """The version ``alias`` points at, or None (no such model or alias)."""

    def get() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            if _missing(e) or e.error_code == "INVALID_PARAMETER_VALUE":
                return None
            raise

    return retry.call(get, f"read alias {alias} of {name}")


def _version_tags(client: MlflowClient, name: str, version: str, retry: Retry) -> dict[str, str]:
    def get() -> dict[str, str] | None:
        try:
            return dict(client.get_model_version(name, version).tags or {})
        except MlflowException as e:
            if _missing(e):
                return None
            raise

    tags = retry.call(get, f"read {name} version {version}")
    if tags is None:
        raise PromotionRefusedError(f"{name} has no version {version}: see `imgflow models`")
    return tags


def read_log(
    name: str, *, client: MlflowClient | None = None, retry: Retry = Retry()
) -> list[dict[str, Any]]:
    """The promotion log, oldest first (empty when the model does not exist)."""
    tags = _model_tags(client or MlflowClient(), name, retry) or {}
    keys = sorted(k for k in tags if k.startswith(LOG_PREFIX))
    return [json.loads(tags[k]) for k in keys]


def gate_summary(tags: dict[str, str]) -> dict[str, Any]:
    """What a version's tags say about its gates (the log's gate summary)."""
    failed = [g for g in tags.get("failed_gates", "").split(",") if g]
    return {
        "passed": tags.get("gates_passed") == "true",
        "failed": failed,
        "test_accuracy": tags.get("test_accuracy"),
        "test_mAP": tags.get("test_mAP"),
    }


# --------------------------------------------------------------------------- the lock


def _try_create_lock(client: MlflowClient, lock: str, tags: dict[str, str]) -> bool:
    try:
        client.create_registered_model(
            lock, tags=tags, description="imgflow promotion lock: held while an alias moves"
        )
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e):
            return False
        if _missing(e):
            # The holder released the lock while our create was in flight: MLflow's SQL store
            # answers a duplicate insert by looking the model up, and that lookup found nothing.
            # Taken a moment ago, free now: the caller's loop tries again.
            return False
        raise


def _break_if_stale(client: MlflowClient, lock: str, retry: Retry) -> None:
    """Delete a lock whose holder's lease ran out (it died), unless it changed hands meanwhile."""
    tags = _model_tags(client, lock, retry)
    if tags is None or float(tags.get("expires", "inf")) > time.time():
        return
    logger.warning("breaking a stale promotion lock held by %s", tags.get("owner", "?"))
    again = _model_tags(client, lock, retry)
    if again is not None and again.get("token") == tags.get("token"):
        _delete_quietly(client, lock, retry)


def _delete_quietly(client: MlflowClient, lock: str, retry: Retry) -> None:
    def delete() -> None:
        try:
            client.delete_registered_model(lock)
        except MlflowException as e:
            if not _missing(e):
                raise

    retry.call(delete, f"release {lock}")


@contextmanager
def promotion_lock(
    name: str,
    *,
    client: MlflowClient | None = None,
    owner: str | None = None,
    ttl_s: float = 120.0,
    timeout_s: float = 60.0,
    retry: Retry = Retry(),
) -> Iterator[str]:
    """Hold ``<name>.promotion-lock`` (yields the token); wait up to ``timeout_s`` for it.

    Raises PromotionConflictError when it stays taken, TrackingError when the server is down.
    """
    client = client or MlflowClient()
    lock, token = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    tags = {"token": token, "owner": owner or default_actor(), "expires": f"{time.time() + ttl_s:.3f}"}
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while not retry.call(lambda: _try_create_lock(client, lock, tags), f"take {lock}"):
        _break_if_stale(client, lock, retry)
        if time.monotonic() > deadline:
            raise PromotionConflictError(
                f"{lock} stayed taken for {timeout_s:.0f}s (another promotion is running); try again"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    try:
        yield token
    finally:
        held = _model_tags(client, lock, retry)
        if held is not None and held.get("token") == token:
            _delete_quietly(client, lock, retry)


def _assert_held(client: MlflowClient, name: str, token: str, retry: Retry) -> None:
    """Fencing: refuse to write when the lease expired and another process took the lock."""
    held = _model_tags(client, f"{name}{LOCK_SUFFIX}", retry)
    if held is None or held.get("token") != token:
        raise PromotionConflictError(f"lost the promotion lock of {name} (lease expired); try again")


# --------------------------------------------------------------------------- alias moves


def _append_log(client: MlflowClient, name: str, entry: dict[str, Any], retry: Retry) -> dict[str, Any]:
    """Add ``entry`` as the next ``promotion_log.NNNNNN`` tag (caller holds the lock)."""
    seq = len(read_log(name, client=client, retry=retry)) + 1
    entry = {"seq": seq, **entry}
    key = f"{LOG_PREFIX}{seq:06d}"
    retry.call(lambda: client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True)), key)
    return entry


def _move(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    *,
    action: str,
    actor: str,
    reason: str | None,
    gates: dict[str, Any],
    retry: Retry,
    forced: bool = False,
) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` and log it; None when it already points there."""
    previous = alias_target(client, name, alias, retry)
    if previous == version:
        return None
    retry.call(lambda: client.set_registered_model_alias(name, alias, version), f"set alias {alias}")
    entry = {"action": action, "alias": alias, "from": previous, "to": version, "who": actor,
             "when": _now(), "why": reason, "forced": forced, "gates": gates}  # fmt: skip
    return _append_log(client, name, entry, retry)


def record_registration(
    name: str,
    version: str,
    *,
    gates_passed: bool,
    actor: str | None = None,
    lock_timeout_s: float = 60.0,
    retry: Retry = Retry(),
) -> list[dict[str, Any]]:
    """Move ``candidate`` (and ``challenger`` when the gates passed) forward to a new version.

    They only ever move forward: a registration that finishes after a newer one leaves them alone.
    Returns the log entries written.
    """
    client = MlflowClient()
    actor = actor or default_actor()
    tags = _version_tags(client, name, version, retry)
    moves = [CANDIDATE] + ([CHALLENGER] if gates_passed else [])
    entries = []
    with promotion_lock(name, client=client, owner=actor, timeout_s=lock_timeout_s, retry=retry) as token:
        for alias in moves:
            current = alias_target(client, name, alias, retry)
            if current is not None and int(current) >= int(version):
                continue
            _assert_held(client, name, token, retry)
            entry = _move(client, name, alias, version, action="register", actor=actor,
                          reason="registered" + (", gates passed" if gates_passed else ", gates FAILED"),
                          gates=gate_summary(tags), retry=retry)  # fmt: skip
            entries += [entry] if entry else []
    return entries


def promote(
    name: str,
    version: str,
    *,
    to: str = CHAMPION,
    force: bool = False,
    reason: str | None = None,
    expected_from: Any = ANY,
    actor: str | None = None,
    lock_timeout_s: float = 60.0,
    retry: Retry = Retry(),
) -> dict[str, Any]:
    """Point alias ``to`` (``challenger`` or ``champion``) at ``version``, under the lock, logged.

    Refuses a version whose gates did not pass unless ``force`` and a ``reason`` are given.
    ``expected_from``: the version the alias must point at now (None: no champion yet), else
    PromotionConflictError — compare-and-set for callers that decided on a stale view.
    Returns the log entry (``changed: False`` when the alias already pointed there).
    """
    version = str(version)
    if to not in (CHALLENGER, CHAMPION):
        raise PromotionRefusedError(f"cannot promote to {to!r}: use {CHALLENGER!r} or {CHAMPION!r}")
    if force and not (reason and reason.strip()):
        raise PromotionRefusedError("--force needs --reason: the promotion log records why")
    client = MlflowClient()
    actor = actor or default_actor()
    tags = _version_tags(client, name, version, retry)
    gates = gate_summary(tags)
    if not gates["passed"] and not force:
        failed = ", ".join(gates["failed"]) or "unknown (no gate verdict tag)"
        raise PromotionRefusedError(
            f"{name} version {version} did not pass its gates (failed: {failed}); "
            f"promote it anyway only with --force --reason '...'"
        )
    with promotion_lock(name, client=client, owner=actor, timeout_s=lock_timeout_s, retry=retry) as token:
        current = alias_target(client, name, to, retry)
        if expected_from is not ANY and current != (None if expected_from is None else str(expected_from)):
            raise PromotionConflictError(
                f"{to} of {name} is version {current}, not {expected_from} as this promotion "
                f"expected (another promotion won); re-evaluate version {version} against it"
            )
        _assert_held(client, name, token, retry)
        entry = _move(client, name, to, version, action="promote", actor=actor, reason=reason,
                      gates=gates, retry=retry, forced=force and not gates["passed"])  # fmt: skip
    if entry is None:
        return {"alias": to, "from": version, "to": version, "changed": False}
    logger.info("%s: %s %s -> %s", name, to, entry["from"], version)
    return {**entry, "changed": True}


def champion_lineage(log: list[dict[str, Any]]) -> list[str]:
    """Champion versions as a stack (oldest first): promotions push, rollbacks pop."""
    stack: list[str] = []
    for e in log:
        if e.get("alias") != CHAMPION:
            continue
        if e["action"] == "rollback":
            if stack:
                stack.pop()
            continue
        if not stack and e.get("from"):
            stack.append(str(e["from"]))
        stack.append(str(e["to"]))
    return stack


def rollback(
    name: str,
    *,
    reason: str | None = None,
    actor: str | None = None,
    lock_timeout_s: float = 60.0,
    retry: Retry = Retry(),
) -> dict[str, Any]:
    """Move ``champion`` back to the previous champion (repeatable: each call goes one further back)."""
    client = MlflowClient()
    actor = actor or default_actor()
    with promotion_lock(name, client=client, owner=actor, timeout_s=lock_timeout_s, retry=retry) as token:
        lineage = champion_lineage(read_log(name, client=client, retry=retry))
        current = alias_target(client, name, CHAMPION, retry)
        if len(lineage) < 2 or lineage[-1] != current:
            raise PromotionRefusedError(
                f"no previous champion of {name} to roll back to (champion: {current or 'none'}); "
                "see `imgflow models history`"
            )
        target = lineage[-2]
        tags = _version_tags(client, name, target, retry)
        _assert_held(client, name, token, retry)
        entry = _move(client, name, CHAMPION, target, action="rollback", actor=actor,
                      reason=reason or "rollback", gates=gate_summary(tags), retry=retry)  # fmt: skip
    if entry is None:
        raise TrackingError(f"rollback of {name} did not move the champion from {current}")
    logger.info("%s: champion rolled back %s -> %s", name, entry["from"], target)
    return {**entry, "changed": True}


def aliases(name: str, *, retry: Retry = Retry()) -> dict[str, str | None]:
    """Where each stage alias points now."""
    client = MlflowClient()
    return {a: alias_target(client, name, a, retry) for a in ALIASES}
