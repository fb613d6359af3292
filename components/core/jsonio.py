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
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import uuid
from collections.abc import Mapping
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
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same file system, so the rename is atomic), opened like
    # any file so it gets the usual permissions (mkstemp would make it owner-only).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
