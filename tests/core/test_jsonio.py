"""The one JSON writer: NaN as null, numpy and paths converted, atomic writes; reads that say what to run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from components.core.errors import DataError
from components.core.jsonio import read_json, to_jsonable, write_json
from components.data.manifest import DataPaths, require_manifest


def test_non_finite_floats_become_null_and_the_file_is_strict_json(tmp_path: Path) -> None:
    obj = {"ap": math.nan, "auc": np.float32("nan"), "hi": math.inf, "lo": -np.inf, "ok": np.float64(0.25)}
    path = write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # parse_constant is called only for NaN/Infinity tokens: strict JSON never calls it
    assert json.loads(text, parse_constant=pytest.fail) == {"ap": None, "auc": None, "hi": None, "lo": None,
                                                            "ok": 0.25}  # fmt: skip


def test_numpy_paths_tuples_sets_and_records_are_converted() -> None:
    @dataclass(frozen=True)
    class Rec:
        n: int

        def to_dict(self) -> dict:
            return {"n": self.n, "kind": "rec"}

    got = to_jsonable(
        {"i": np.int64(3), "b": np.bool_(True), "a": np.arange(3), "p": Path("a/b.json"), "t": (1, 2),
         "s": {"y", "x"}, "r": Rec(1), np.int32(7): "numpy key"}
    )  # fmt: skip
    assert got == {"i": 3, "b": True, "a": [0, 1, 2], "p": "a/b.json", "t": [1, 2], "s": ["x", "y"],
                   "r": {"n": 1, "kind": "rec"}, 7: "numpy key"}  # fmt: skip
    assert type(got["i"]) is int and type(got["b"]) is bool


def test_an_unknown_object_is_an_error_not_its_repr(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        write_json(tmp_path / "x.json", {"x": object()})
    assert not (tmp_path / "x.json").exists()


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "deep" / "r.json", {"v": 1})
    write_json(path, {"v": 2})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # fails while converting: the old content stays
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert path.read_text().endswith("}\n")


def test_sort_keys_makes_the_bytes_independent_of_insertion_order(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", {"b": 1, "a": 2}, sort_keys=True).read_bytes()
    b = write_json(tmp_path / "b.json", {"a": 2, "b": 1}, sort_keys=True).read_bytes()
    assert a == b


def test_read_json_names_the_file_and_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"run\.json is missing: run `imgflow train` first"):
        read_json(tmp_path / "run.json", hint="run `imgflow train` first")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON .*line 1\): run `imgflow x`"):
        read_json(tmp_path / "bad.json", hint="run `imgflow x`")
    assert read_json(write_json(tmp_path / "ok.json", [1]), hint="-") == [1]


def test_require_manifest_says_to_run_ingest(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path / "data")
    with pytest.raises(DataError, match=r"no manifest at .*manifest\.parquet: run `imgflow ingest` first"):
        require_manifest(paths)
    paths.root.mkdir()
    paths.manifest.write_bytes(b"")
    assert require_manifest(paths) == paths.manifest
