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
forever (one that died on this machine, e.g. ``kill -9``, is seen dead at once and its lock broken
without waiting for the expiry). The log (:mod:`components.registry.promotion_log`) is one MLflow run per entry in the
experiment ``<name>-promotions`` (who, what, when, why, from -> to, gate summary), written only
while holding the lock, never rewritten. Each move writes its log entry first and then sets the
alias; a holder killed between the two leaves the move half done, and the next holder of the lock
completes it (:func:`_complete_moves`), so the aliases always end up where the log says.

:func:`register_version` is what the register stage calls: it registers a version with Markdown
descriptions (:mod:`components.registry.cards`), moves ``candidate``/``challenger``, promotes when
allowed and returns a :class:`Registration`.

A promotion may name the champion it expects to replace (``expected_from``): registration's
automatic promotion passes the champion the model was evaluated against, so when two pipeline
runs finish together only the one that was compared with the current champion wins; the other
stays ``challenger`` and is told to re-evaluate.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.core.errors import ImgflowError, TrackingError
from components.registry import cards, promotion_log, tracking
from components.registry.cards import ModelCard
from components.registry.tracking import Retry

logger = logging.getLogger(__name__)

CANDIDATE, CHALLENGER, CHAMPION = "candidate", "challenger", "champion"
ALIASES = (CANDIDATE, CHALLENGER, CHAMPION)
LOG_PREFIX = promotion_log.LEGACY_PREFIX
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
    """The promotion log, oldest first (empty when the model does not exist); old registries' tag
    entries included (see :mod:`components.registry.promotion_log`)."""
    return promotion_log.read(client or MlflowClient(), name, retry)


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


def _process_space() -> str:
    """Where a PID means one process: this kernel's boot and PID namespace ("" where unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _holder_dead(tags: dict[str, str]) -> bool:
    """The lock's holder ran in this PID space and its process is gone (killed, crashed)."""
    pid, space = tags.get("pid", ""), _process_space()
    if not space or tags.get("pid_space") != space or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    return False


def _break_if_stale(client: MlflowClient, lock: str, retry: Retry) -> None:
    """Delete a lock whose holder's lease ran out or whose holder process is dead, unless it changed
    hands meanwhile."""
    tags = _model_tags(client, lock, retry)
    if tags is None or (float(tags.get("expires", "inf")) > time.time() and not _holder_dead(tags)):
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
    tags = {"token": token, "owner": owner or default_actor(), "expires": f"{time.time() + ttl_s:.3f}",
            "pid": str(os.getpid()), "pid_space": _process_space()}  # fmt: skip
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
        _complete_moves(client, name, retry)
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


def _complete_moves(client: MlflowClient, name: str, retry: Retry) -> None:
    """Under the lock: finish the alias moves a killed holder logged but did not apply.

    :func:`_move` appends the log entry, then sets the alias. An alias that still points at its last
    entry's ``from`` is such a half-done move: it is set to the entry's ``to``. An alias pointing
    elsewhere was moved outside imgflow (the MLflow UI): that is left alone, with a warning."""
    last: dict[str, dict[str, Any]] = {}
    for entry in promotion_log.read(client, name, retry):
        last[str(entry["alias"])] = entry
    for alias, entry in last.items():
        current, to = alias_target(client, name, alias, retry), str(entry["to"])
        if current == to:
            continue
        if current != (str(entry["from"]) if entry.get("from") not in (None, "") else None):
            logger.warning("%s of %s is version %s, the promotion log says %s (moved outside imgflow?)",
                           alias, name, current, to)  # fmt: skip
            continue
        logger.warning("completing an interrupted move of %s: %s -> %s (log entry #%s)", alias, current,
                       to, entry["seq"])  # fmt: skip
        retry.call(partial(client.set_registered_model_alias, name, alias, to), f"set alias {alias}")


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
    entry = {"action": action, "alias": alias, "from": previous, "to": version, "who": actor,
             "when": _now(), "why": reason, "forced": forced, "gates": gates}  # fmt: skip
    # The log first: killed before the alias is set, the next lock holder completes the move
    # (_complete_moves); the other order would leave an alias move nobody logged.
    entry = promotion_log.append(client, name, entry, retry)
    retry.call(lambda: client.set_registered_model_alias(name, alias, version), f"set alias {alias}")
    return entry


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
        expected = None if expected_from is None else str(expected_from)
        if expected_from is not ANY and current not in (expected, version):  # already there: no conflict
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


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """What registering one model version did: the register stage's record (``registration.json``).

    ``aliases``: the aliases on the version afterwards; ``failed_gates``: what each blocking failed
    gate measured; ``promotion_tried``: the gates passed and ``auto_promote`` was on;
    ``promoted``: the version became champion now; ``previous``: what the champion alias pointed at
    before (when promotion was tried); ``conflict``: why another promotion won (the version stays
    challenger and should be re-evaluated against the new champion).
    """

    name: str
    version: str
    model_uri: str
    run_id: str
    aliases: tuple[str, ...]
    gates_passed: bool
    failed_gates: tuple[str, ...] = ()
    promotion_tried: bool = False
    promoted: bool = False
    previous: str | None = None
    conflict: str | None = None

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"

    def failure_message(self) -> str:
        """Why the version was not promoted (for the error and the webhook), when a gate failed."""
        lines = "\n".join(f"  - {m}" for m in self.failed_gates)
        return (
            f"model version {self.version} registered as 'candidate' but NOT promoted to "
            f"'champion': {len(self.failed_gates)} gate(s) failed:\n{lines}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``registration.json`` and the pipeline's result (keys as before the record)."""
        promotion: dict[str, Any] = {"promoted": self.promoted}
        if self.conflict is not None:
            promotion["conflict"] = self.conflict
        elif self.promotion_tried:
            promotion["from"] = self.previous
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "champion_uri": self.champion_uri,
            "promotion": promotion,
            "gates_passed": self.gates_passed,
            "failed_gates": list(self.failed_gates),
        }


def register_version(
    model_uri: str,
    *,
    name: str,
    run_id: str,
    tags: dict[str, str],
    card: ModelCard,
    auto_promote: bool,
    expected_from: Any = ANY,
    actor: str | None = None,
    lock_timeout_s: float = 60.0,
    retry: Retry = Retry(),
) -> Registration:
    """Register ``model_uri`` (logged in training run ``run_id``) as a new version of ``name``.

    The version gets ``tags`` (machine-readable: gate verdict, data version, ...) and a Markdown
    description made from ``card``; the model's description is rewritten for this latest version.
    ``candidate`` (and ``challenger`` when the gates passed) move forward; when the gates passed and
    ``auto_promote`` is on, the version becomes ``champion`` -- unless the champion is no longer
    ``expected_from`` (the version it was evaluated against): then it stays challenger and the
    record's ``conflict`` says why.
    """
    client, actor = MlflowClient(), actor or default_actor()
    log_experiment = promotion_log.ensure_experiment(client, name, retry)
    reg = tracking.register(model_uri, name=name, run_id=run_id, tags=tags, aliases=(),
                            attempts=retry.attempts, backoff_s=retry.backoff_s)  # fmt: skip
    version = reg.version
    run_experiment = tracking.run_experiment_id(run_id, retry=retry)
    tracking.set_descriptions(
        name,
        model=cards.model_description(name, version, card, promotions_experiment_id=log_experiment),
        version=(version, cards.version_description(name, version, card, run_id=run_id,
                                                    experiment_id=run_experiment)),
        retry=retry,
    )  # fmt: skip
    opts: dict[str, Any] = {"actor": actor, "lock_timeout_s": lock_timeout_s, "retry": retry}
    record_registration(name, version, gates_passed=card.gates_passed, **opts)
    tried = card.gates_passed and auto_promote
    promoted, previous, conflict = False, None, None
    if tried:
        try:
            entry = promote(name, version, reason="gates passed at registration", expected_from=expected_from,
                            **opts)  # fmt: skip
            promoted, previous = bool(entry["changed"]), entry["from"]
        except PromotionConflictError as e:
            logger.warning("version %s stays challenger: %s", version, e)
            conflict = str(e)
    now = aliases(name, retry=retry)
    return Registration(
        name=name, version=version, model_uri=model_uri, run_id=run_id,
        aliases=tuple(sorted(a for a, v in now.items() if v == version)), gates_passed=card.gates_passed,
        failed_gates=card.failed_gates, promotion_tried=tried, promoted=promoted, previous=previous,
        conflict=conflict,
    )  # fmt: skip
