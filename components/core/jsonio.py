"""The one way imgflow writes and reads its JSON files (results, reports, verdicts, run records).

NaN policy: a float that is not finite (NaN, +/-Infinity) is written as ``null``. Such values are
not JSON (``json.dumps`` would emit the bare tokens ``NaN``/``Infinity``, which ``dvc metrics
show``, ``jq`` and browsers reject), and in imgflow they only ever mean "undefined here" — the
average precision of a label with no positive test image, the recall of an empty class, the ROC
AUC of a class the model never ranks against another. ``null`` says exactly that, and a stage never
fails after an hour of training because one per-class figure is undefined. Readers therefore treat
``None`` as "not defined".

Writes are atomic (a temporary file in the same folder, then a rename): a reader — DVC, the next
stage, a person with the file open — never sees half a file, also when the writer is killed.
:func:`atomic_path` (and :func:`write_text_atomic`) do the same for any other file (CSV, Parquet, HTML);
:func:`atomic_group` replaces several files as one (a redo journal completes a commit that a
``kill -9`` cut between two renames, see :func:`complete_commits`). Temporary files carry their
writer's PID, so :func:`remove_stale_temps` can delete those of dead writers and nothing ever reads
one as data. Atomic against a crashed process, not a lost power supply (no fsync: that would cost
every small write and the kernel keeps what a killed process wrote).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from components.core.errors import DataError


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats -> None; numpy scalars and arrays, paths,
    dates, enums, tuples and sets, and records with ``to_dict()`` (or dataclasses) converted.
    Anything else is a TypeError naming its type (a silent ``str(obj)`` would hide a bug)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    return _convert_object(obj)


def _convert_object(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: convert it first ({obj!r:.80})")


def _key(k: Any) -> Any:
    """JSON keys are strings: numpy scalars become their Python value (json.dumps then writes it)."""
    return k.item() if isinstance(k, np.generic) else k


def dumps(obj: Any, *, sort_keys: bool = False) -> str:
    """The JSON text :func:`write_json` writes (indented, one trailing newline)."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` to ``path`` atomically (parent folders created); returns ``path``.

    ``sort_keys``: for files whose bytes should not depend on the order a dict was built in.
    """
    path = Path(path)
    text = dumps(obj, sort_keys=sort_keys)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same file system, so a rename is atomic):
    ``.<name>.<pid>.<random>.tmp`` — hidden, and naming the writer for :func:`remove_stale_temps`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to (by any library: ``to_parquet``,
    ``savefig``...); on success it replaces ``path`` in one rename, on an error it is deleted and
    ``path`` keeps its old content. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created like any file (the usual permissions; mkstemp would make it owner-only).
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- several files as one

COMMIT_SUFFIX = ".commit.json"


@contextmanager
def atomic_group(targets: Sequence[Path], *, journal: Path) -> Iterator[list[Path]]:
    """Replace several files as one: yields a temporary path per target (write each completely);
    when the block ends without an error, a journal naming every (temporary, target) pair is
    written (atomically), then each temporary file is renamed onto its target, then the journal is
    deleted. A ``kill -9`` between two renames leaves the journal: :func:`complete_commits` on the
    journal's folder finishes the renames, so readers never combine an old file with a new one.
    ``journal``: ``<folder>/.<what>.commit.json`` (the name must end in ``.commit.json``).
    On an error the temporary files are deleted and the targets keep their old content."""
    if not journal.name.endswith(COMMIT_SUFFIX):
        raise ValueError(f"a commit journal's name ends in {COMMIT_SUFFIX!r}: {journal}")
    temps = [temp_path(Path(t)) for t in targets]
    for t in targets:
        Path(t).parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
        missing = [str(t) for t in temps if not t.exists()]
        if missing:
            raise FileNotFoundError(f"atomic_group: nothing was written to {missing}")
        pairs = [[str(tmp.resolve()), str(Path(t).resolve())] for tmp, t in zip(temps, targets, strict=True)]
        write_json(journal, {"replace": pairs})
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    _replay(journal, pairs)


def _replay(journal: Path, pairs: Sequence[Sequence[str]]) -> None:
    """Rename each temporary file that is still there onto its target, then drop the journal
    (idempotent: a rename done before the crash is simply not repeated)."""
    for tmp, target in pairs:
        if Path(tmp).exists():
            os.replace(tmp, target)
    journal.unlink(missing_ok=True)


def complete_commits(folder: Path) -> list[Path]:
    """Finish every :func:`atomic_group` commit a killed process left half done in ``folder``;
    returns the journals replayed. Call it before reading the folder's files (the project lock
    does, for the data folder)."""
    done = []
    for journal in sorted(Path(folder).glob(f".*{COMMIT_SUFFIX}")):
        try:
            pairs = json.loads(journal.read_text(encoding="utf-8"))["replace"]
        except (OSError, ValueError, KeyError, TypeError):
            # Journals are written atomically: one that does not parse is not ours to trust.
            continue
        _replay(journal, pairs)
        done.append(journal)
    return done


def remove_stale_temps(folder: Path, *, pattern: str = f".*{TEMP_SUFFIX}") -> int:
    """Delete temporary files in ``folder`` (matching ``pattern``) whose writer (the PID in the
    name, see :func:`temp_path`) is no longer running; returns how many. Files named by an
    unfinished commit journal are kept: :func:`complete_commits` needs them."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if pattern.startswith(".") and not any(name.startswith(".") for name in os.listdir(folder)):
        return 0  # no hidden file, so neither a temporary file nor a journal: one listing, not two globs
    pending = {tmp for j in folder.glob(f".*{COMMIT_SUFFIX}") for tmp, _ in _journal_pairs(j)}
    removed = 0
    for tmp in folder.glob(pattern):
        pid = _writer_pid(tmp.name)
        if pid is not None and not _alive(pid) and str(tmp.resolve()) not in pending:
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _journal_pairs(journal: Path) -> list[tuple[str, str]]:
    try:
        return [(str(a), str(b)) for a, b in json.loads(journal.read_text(encoding="utf-8"))["replace"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _writer_pid(name: str) -> int | None:
    """The PID in ``.<name>.<pid>.<random>.tmp`` (None when the name has none)."""
    parts = name.removesuffix(TEMP_SUFFIX).split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process: alive
    return True


def read_json(path: Path, *, hint: str) -> Any:
    """The parsed content of ``path``; a DataError naming the file and ``hint`` (what to run,
    e.g. "run `imgflow train` first") when it is missing or not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {hint}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): {hint}") from None
