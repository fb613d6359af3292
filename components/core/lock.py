"""One writer per project: the project lock.

Every command that writes ``data/``, ``outputs/``, the issue ledger or the registry's aliases holds
``<state_dir>/project.lock`` while it runs (the CLI takes it per command, the pipeline flow once for
the whole run), so two runs in one project folder never interleave their writes. A second run
waits up to ``wait_s`` seconds, then raises :class:`ProjectLockedError` (exit code
:data:`LOCKED_EXIT_CODE`) naming the holder: PID, host, command and start time, read from the
sidecar ``<state_dir>/project.lock.json`` the holder writes once it has the lock.

The lock is an OS lock (``flock`` through the ``filelock`` package) on an open file: the kernel
releases it when the holding process dies, ``kill -9`` included, so a crashed run never blocks
the next one. Its sidecar may then be left behind; it is only ever read to name a *live* holder
and is overwritten by the next one. File systems without ``flock`` are refused rather than given
a lock file that a crash would leave locked for ever.

Re-entrant within a process (any thread): the pipeline flow holds it and the stages it runs take
it again without waiting for themselves.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.core.errors import ConfigError, ImgflowError
from components.core.jsonio import complete_commits, write_json

LOCK_FILE = "project.lock"
HOLDER_FILE = "project.lock.json"
LOCKED_EXIT_CODE = 6
"""Exit code of a command that found the project locked by another run (after ``--wait``)."""
_POLL_S = 0.1


class ProjectLockedError(ImgflowError):
    """Another imgflow run holds the project lock (one writer per project folder)."""

    exit_code = LOCKED_EXIT_CODE


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: what the sidecar says."""

    pid: int
    host: str
    command: str
    started_at: str

    def describe(self) -> str:
        return f"`imgflow {self.command}` (PID {self.pid} on {self.host}, started {self.started_at})"

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "command": self.command, "started_at": self.started_at}


class _Held:
    """This process's hold on one lock file: the filelock object and how many times it was entered."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.depth = 1


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def read_holder(state_dir: Path) -> Holder | None:
    """What the sidecar in ``state_dir`` says about the holder (None: none written, or unreadable)."""
    try:
        raw = json.loads((Path(state_dir) / HOLDER_FILE).read_text(encoding="utf-8"))
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw["command"]), str(raw["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds(state_dir: Path) -> bool:
    """True when this process holds the project lock of ``state_dir``."""
    with _guard:
        return _key(state_dir) in _held


@contextmanager
def project_lock(
    state_dir: Path, *, command: str, wait_s: float = 0.0, complete: Sequence[Path] = ()
) -> Iterator[Holder | None]:
    """Hold the project lock of ``state_dir`` for the block (created when missing).

    ``wait_s``: how long to wait for another run to finish (0: fail at once). Raises
    ProjectLockedError naming the holder when it stays taken; re-entering in the process that
    holds it does not wait. ``complete``: folders whose commits a killed run left half done
    (:func:`components.core.jsonio.atomic_group`) are completed as soon as the lock is taken, so the
    command reads whole file sets. Yields this process's :class:`Holder` (None when re-entered).
    """
    if wait_s < 0:
        raise ConfigError(f"--wait {wait_s:g}: must be >= 0 seconds")
    state_dir = Path(state_dir)
    key = _key(state_dir)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry.depth += 1
    if entry is not None:
        try:
            yield None
        finally:
            _leave(key)
        return
    entry = _acquire(state_dir, wait_s=wait_s, command=command)
    holder = Holder(
        os.getpid(), socket.gethostname(), command, datetime.now(UTC).isoformat(timespec="seconds")
    )
    try:
        write_json(state_dir / HOLDER_FILE, holder.to_dict())
        with _guard:
            _held[key] = entry
        for folder in complete:
            complete_commits(folder)
        yield holder
    finally:
        with _guard:
            held_here = _held.get(key) is entry
        if held_here:
            _leave(key)
        else:  # the sidecar write failed before the entry was registered
            entry.lock.release(force=True)


def _key(state_dir: Path) -> str:
    return str((Path(state_dir) / LOCK_FILE).resolve())


def _acquire(state_dir: Path, *, wait_s: float, command: str) -> _Held:
    """The OS lock, polled until ``wait_s`` has passed (then ProjectLockedError)."""
    from filelock import FileLock, Timeout

    state_dir.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the hold belongs to the process (our own depth count makes it re-entrant
    # across threads); fallback_to_soft=False: a soft lock would outlive a killed holder.
    lock = FileLock(str(state_dir / LOCK_FILE), thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=wait_s, poll_interval=_POLL_S)
    except Timeout:
        raise ProjectLockedError(_locked_message(state_dir, wait_s=wait_s, command=command)) from None
    except OSError as e:
        raise ConfigError(
            f"cannot lock {state_dir / LOCK_FILE} ({e}): imgflow needs a file system with flock for "
            "project.state_dir (a local disk); set project.state_dir to a folder on one"
        ) from None
    return _Held(lock)


def _leave(key: str) -> None:
    """One exit of the block: the last one removes the sidecar, then releases the OS lock."""
    with _guard:
        entry = _held[key]
        entry.depth -= 1
        if entry.depth > 0:
            return
        del _held[key]
    sidecar = Path(key).with_name(HOLDER_FILE)
    holder = read_holder(sidecar.parent)
    if holder is not None and holder.pid == os.getpid():
        sidecar.unlink(missing_ok=True)
    entry.lock.release(force=True)


def _locked_message(state_dir: Path, *, wait_s: float, command: str) -> str:
    holder = read_holder(state_dir)
    who = holder.describe() if holder is not None else "another imgflow run (it is just starting)"
    waited = f" after waiting {wait_s:g}s" if wait_s > 0 else ""
    return (
        f"the project is locked by {who}{waited}: one writer per project folder "
        f"({state_dir / LOCK_FILE}). Wait for it to finish, or run `imgflow {command} --wait SECONDS` "
        "to wait for it; a killed run's lock is released by the OS, so nothing needs deleting"
    )
