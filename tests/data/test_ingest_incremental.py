"""Incremental ingest: unchanged files are taken from the previous ingest's cache without being read, and
the data version is exactly what a full ingest of the same files gives."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.core.errors import DataError
from components.data.ingest import IngestSummary, ingest
from components.data.ingest_cache import CACHE_FILE
from components.data.ingest_stamp import STAMP_FILE
from components.data.manifest import DataPaths
from tests.conftest import FMNIST_DIR, fmnist_arrays
from tests.data.test_ingest import check_invariants, make_imagefolder, needs_fm, png_bytes


@pytest.fixture(scope="module")
def fm() -> tuple[np.ndarray, np.ndarray]:
    return fmnist_arrays("t10k", 2000)


@needs_fm
def test_fashion_mnist_second_ingest_reads_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ingest("fashion-mnist", data_dir=data, max_per_class=15, fashion_mnist_dir=FMNIST_DIR)
    before = pd.read_parquet(DataPaths(data).manifest)
    (data / STAMP_FILE).unlink()  # the per-item cache, not the whole-ingest short-circuit (tested below)
    second = ingest("fashion-mnist", data_dir=data, max_per_class=15, fashion_mnist_dir=FMNIST_DIR)
    assert not second.unchanged
    assert first.reused == 0 and second.reused == second.ingested == first.ingested
    assert second.data_version == first.data_version
    pd.testing.assert_frame_equal(pd.read_parquet(DataPaths(data).manifest), before)
    check_invariants(second, data)


@needs_fm
def test_an_unchanged_fashion_mnist_ingest_answers_from_its_stamp(tmp_path: Path) -> None:
    """Same IDX files, options and outputs: the last summary, nothing listed or rewritten. Another option,
    an edited manifest, a lost stored image or a touched source file: the ordinary ingest, which mends
    the outputs, and the data version is always a full ingest's."""
    folder = tmp_path / "fm"
    shutil.copytree(FMNIST_DIR, folder)
    data = tmp_path / "data"
    manifest = DataPaths(data).manifest

    def run(**options: Any) -> IngestSummary:
        return ingest("fashion-mnist", data_dir=data, max_per_class=5, fashion_mnist_dir=folder, **options)

    first = run()
    written = manifest.stat().st_mtime_ns
    second = run()
    assert second.unchanged and not first.unchanged and second.reused == second.ingested
    assert replace(second, reused=first.reused, unchanged=False) == first
    assert manifest.stat().st_mtime_ns == written  # not rewritten

    reseeded = run(seed=7)
    assert not reseeded.unchanged and reseeded.data_version != first.data_version
    back = run()  # the stamp is seed 7's now
    assert not back.unchanged and back.data_version == first.data_version
    assert run().unchanged

    victim = data / pd.read_parquet(manifest)["path"].iloc[0]
    victim.unlink()
    mended = run()
    assert not mended.unchanged and victim.exists() and mended.data_version == first.data_version

    good = manifest.read_bytes()
    pd.read_parquet(manifest).iloc[1:].to_parquet(manifest)  # a version checked out by hand
    mended = run()
    assert not mended.unchanged and manifest.read_bytes() == good

    labels = folder / "train-labels-idx1-ubyte.gz"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    touched = run()
    assert not touched.unchanged and touched.data_version == first.data_version
    assert run(incremental=False).unchanged is False and not (data / STAMP_FILE).exists()
    check_invariants(touched, data)


def test_changed_and_added_files_are_read_the_rest_reused(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    """One file rewritten with other pixels, one added, one deleted: exactly those are read (the deleted
    one is gone from the manifest), and the manifest equals a full ingest's of the same folder."""
    root = tmp_path / "images"
    written = make_imagefolder(root, fm, per_class=12)  # 36 files
    data = tmp_path / "data"
    ingest(f"imagefolder:{root}", data_dir=data)
    changed, deleted = sorted(written)[0], sorted(written)[1]
    (root / changed).write_bytes(png_bytes(255 - fm[0][1999]))  # new bytes, new mtime
    os.utime(root / changed, ns=(1, 1))  # and an mtime older than before: still a different fingerprint
    (root / deleted).unlink()
    (root / "Bag" / "new.png").write_bytes(png_bytes(fm[0][1998]))
    again = ingest(f"imagefolder:{root}", data_dir=data)
    assert again.reused == 34 and again.ingested == 36
    manifest = pd.read_parquet(DataPaths(data).manifest)
    assert deleted not in set(manifest["source_path"])
    full = ingest(f"imagefolder:{root}", data_dir=tmp_path / "full", incremental=False)
    assert full.reused == 0 and full.data_version == again.data_version
    pd.testing.assert_frame_equal(pd.read_parquet(DataPaths(tmp_path / "full").manifest), manifest)


def test_an_unusable_cache_means_a_full_ingest(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "images"
    make_imagefolder(root, fm, per_class=4)
    data = tmp_path / "data"
    first = ingest(f"imagefolder:{root}", data_dir=data)
    cache = pd.read_parquet(data / CACHE_FILE)
    (data / CACHE_FILE).write_bytes(b"not parquet")
    again = ingest(f"imagefolder:{root}", data_dir=data)
    assert again.reused == 0 and again.data_version == first.data_version
    # the same rows written another way (pandas, as layout 1 did): another layout, ignored
    assert ingest(f"imagefolder:{root}", data_dir=data).reused == first.ingested
    cache.to_parquet(data / CACHE_FILE, index=False)
    assert ingest(f"imagefolder:{root}", data_dir=data).reused == 0
    # a stored copy gone from the store: that item is read again
    victim = next((data / "store").rglob("*.png"))
    victim.unlink()
    third = ingest(f"imagefolder:{root}", data_dir=data)
    assert third.reused == third.ingested - 1 and victim.exists()


@needs_fm
def test_fashion_mnist_pixels_are_read_only_for_items_that_need_them(tmp_path: Path) -> None:
    """A no-op lists the labels but never decompresses the images (~0.3 s of gzip per run); the checks of
    the image file run when an item is read, as a clear DataError, and the previous version stays."""
    from components.data.sources import fashion_mnist_items

    folder = tmp_path / "fm"
    shutil.copytree(FMNIST_DIR, folder)
    data = tmp_path / "data"
    first = ingest("fashion-mnist", data_dir=data, max_per_class=5, fashion_mnist_dir=folder)
    before = pd.read_parquet(DataPaths(data).manifest)

    # the test images replaced by the train images: 60,000 pixels arrays for 10,000 labels
    shutil.copy2(folder / "train-images-idx3-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz")
    paths = {p.name: p for p in folder.iterdir()}
    items = list(fashion_mnist_items(paths, max_per_class=5))  # labels only: listing works
    assert len(items) == 100 and {i.official_split for i in items} == {"test", "train"}
    with pytest.raises(DataError, match="60000 images but t10k-labels-idx1-ubyte.gz has 10000 labels"):
        items[0].read()
    with pytest.raises(DataError, match="60000 images but t10k-labels"):  # the changed file is read again
        ingest("fashion-mnist", data_dir=data, max_per_class=5, fashion_mnist_dir=folder)
    pd.testing.assert_frame_equal(pd.read_parquet(DataPaths(data).manifest), before)

    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip idx file"):
        fashion_mnist_items(paths, max_per_class=5).__next__().read()
    shutil.copy2(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz")
    again = ingest("fashion-mnist", data_dir=data, max_per_class=5, fashion_mnist_dir=folder)
    assert again.data_version == first.data_version


def test_a_dead_writers_temporary_file_in_the_store_is_removed(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    """The store folders are listed once per ingest, for the cache's lookups and for the temporary files a
    killed ingest left: those of a dead writer go, a live writer's stay, and the cache is still used."""
    root, data = tmp_path / "images", tmp_path / "data"
    make_imagefolder(root, fm, per_class=4)
    first = ingest(f"imagefolder:{root}", data_dir=data)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    stored = next((data / "store").rglob("*.png"))
    dead = stored.with_name(f".{stored.stem}.{int(exited.stdout)}.1.tmp")
    live = stored.with_name(f".{stored.stem}.{os.getpid()}.1.tmp")
    for leftover in (dead, live):
        leftover.write_bytes(b"half an image")
    again = ingest(f"imagefolder:{root}", data_dir=data)
    assert not dead.exists() and live.exists()
    assert again.reused == again.ingested == first.ingested and again.data_version == first.data_version


def test_ingest_leaves_the_garbage_collector_as_it_found_it(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    """Ingest pauses the cyclic collector while it runs, and restores it whether it ends or fails."""
    root = tmp_path / "images"
    make_imagefolder(root, fm, per_class=2)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert gc.isenabled()
    ingest(f"imagefolder:{root}", data_dir=tmp_path / "data")
    assert gc.isenabled()
    with pytest.raises(DataError, match="no usable image"):
        ingest(f"imagefolder:{tmp_path / 'empty'}", data_dir=tmp_path / "data2")
    assert gc.isenabled()
    gc.disable()
    try:
        ingest(f"imagefolder:{root}", data_dir=tmp_path / "data")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_cyclic_garbage_a_source_makes_while_read_is_freed_during_ingest(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the automatic collector paused, what a source's client leaves in reference cycles while
    reading (an object store's HTTP stack does) must still be freed as ingest goes, not pile up until
    it ends: 600 reads (two chunks), each leaving a cycle that holds 64 KiB."""
    import weakref

    from components.data import ingest as ingest_module
    from components.data.sources import SourceItem, SourceListing

    freed: list[int] = []

    class Cycle:
        def __init__(self) -> None:
            self.me, self.blob = self, bytearray(1 << 16)

    def reader(data: bytes) -> Any:
        def read() -> bytes:
            weakref.finalize(Cycle(), freed.append, 1)  # unreachable at once, but only a collection frees it
            return data

        return read

    items = [SourceItem(f"Bag/{i}.png", "Bag", ("Bag",), reader(png_bytes(fm[0][i]))) for i in range(600)]
    listing = SourceListing(spec="imagefolder:x", kind="imagefolder", classes=("Bag",), items=items)
    monkeypatch.setattr(ingest_module, "list_source", lambda *args, **kwargs: listing)
    gc.collect()
    summary = ingest("imagefolder:x", data_dir=tmp_path / "data")
    assert summary.seen == 600 and summary.ingested + summary.quarantined == 600
    assert len(freed) == 600  # before ingest returned: its chunks' collections, not the re-enabled collector


@needs_fm
def test_fashion_mnist_items_measured_from_their_pixels_as_from_their_decoded_bytes() -> None:
    """The built-in source hands examination the pixels it encoded: the same image info and pixel sample
    (thumbnail, grey pixels, channels, bit depth) as decoding its PNG bytes, on 400 real images; the
    pixel-count and empty checks still apply."""
    from components.data.sources import Rejection, examine_image, examine_pixels, fashion_mnist_items

    paths = {p.name: p for p in FMNIST_DIR.iterdir()}
    items = list(fashion_mnist_items(paths, max_per_class=20))
    assert len(items) == 400 and all(i.pixels is not None for i in items)
    for item in items:
        data = item.read()
        want, got = (
            examine_image(data, max_pixels=10_000),
            examine_pixels(data, item.pixels(), max_pixels=10_000),
        )
        assert not isinstance(want, Rejection) and not isinstance(got, Rejection)
        assert got[0] == want[0] and got[0].format == "png" and got[0].mode == "L"
        for field in ("channels", "bit_depth", "measured", "phash"):
            assert getattr(got[1], field) == getattr(want[1], field)
        np.testing.assert_array_equal(got[1].thumb, want[1].thumb)
        np.testing.assert_array_equal(got[1].grey, want[1].grey)
    grey = items[0].pixels()
    too_big = examine_pixels(items[0].read(), grey, max_pixels=783)
    assert isinstance(too_big, Rejection) and too_big.key == "too_many_pixels"
    assert examine_pixels(b"", grey, max_pixels=10_000) == Rejection("empty", "empty file (0 bytes)")
