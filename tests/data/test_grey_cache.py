"""The grey pixels ingest saves (components/data/grey_cache.py): the same values the audit and a grey
model's decoded splits get by decoding the files, carried over by an incremental ingest, and never used
where they would differ (another size, 16-bit images, an id they do not hold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.config import AuditConfig
from components.data.datasets import cached_split_array, decode_split
from components.data.grey_cache import GREY_FILE, grey_rows, load_grey_pixels
from components.data.ingest import ingest
from components.data.manifest import DataPaths
from components.quality import label_quality
from tests.conftest import fmnist_arrays
from tests.data.test_ingest import make_imagefolder, png_bytes


@pytest.fixture(scope="module")
def fm() -> tuple[np.ndarray, np.ndarray]:
    return fmnist_arrays("t10k", 600)


def _manifest(data: Path) -> pd.DataFrame:
    return pd.read_parquet(DataPaths(data).manifest)


def _ingested(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray], per_class: int) -> tuple[Path, Path]:
    """(image folder, data dir): 3 classes of real Fashion-MNIST PNGs, ingested."""
    folder, data = tmp_path / "images", tmp_path / "data"
    make_imagefolder(folder, fm, per_class=per_class)
    ingest(f"imagefolder:{folder}", data_dir=data)
    return folder, data


def _decoded(data: Path, manifest: pd.DataFrame, side: int = 28) -> np.ndarray:
    return decode_split([data / p for p in manifest["path"]], mode="L", side=side)[:, 0]


def test_ingest_saves_what_decoding_gives_and_an_incremental_ingest_carries_it(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    folder, data = _ingested(tmp_path, fm, 10)
    manifest = _manifest(data)
    held = load_grey_pixels(data)
    assert held is not None and held.shape == (28, 28) and len(held.pixels) == len(manifest) == 30
    np.testing.assert_array_equal(held.rows(list(manifest["image_id"])), _decoded(data, manifest))

    # one file changed, one added: the other 29 come from the ingest cache (not decoded), their grey
    # pixels from the previous file; the new ones from this ingest's decoding
    first = sorted(folder.rglob("*.png"))[0]
    first.write_bytes(png_bytes(255 - np.asarray(Image.open(first))))
    (folder / "Bag" / "new.png").write_bytes(png_bytes(fm[0][-1]))
    summary = ingest(f"imagefolder:{folder}", data_dir=data)
    assert summary.reused == 29 and summary.ingested == 31
    manifest = _manifest(data)
    again = load_grey_pixels(data)
    assert again is not None and len(again.pixels) == 31
    np.testing.assert_array_equal(again.rows(list(manifest["image_id"])), _decoded(data, manifest))

    # nothing changed: every item from the ingest cache, and the file is not written again
    written = (data / GREY_FILE).stat().st_mtime_ns
    assert ingest(f"imagefolder:{folder}", data_dir=data).reused == 31
    assert (data / GREY_FILE).stat().st_mtime_ns == written


def test_the_audit_and_decoded_splits_read_the_same_values_from_it(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    folder, data = _ingested(tmp_path, fm, 8)
    rows = _manifest(data)
    cfg = AuditConfig()
    assert cfg.image_side == 28
    from_file = label_quality.read_grey(rows, data, side=28)
    paths = [data / p for p in rows["path"]]
    np.testing.assert_array_equal(from_file, label_quality.load_grey(paths, side=28, workers=1))

    split = cached_split_array(paths, cache_file=tmp_path / "c1.npy", mode="L", side=28, data_dir=data)
    decoded = cached_split_array(paths, cache_file=tmp_path / "c2.npy", mode="L", side=28)
    np.testing.assert_array_equal(split, decoded)

    # another size or mode: decoded (resized / RGB), not read from the 28 px grey file
    assert grey_rows(data, list(rows["image_id"]), shape=(32, 32)) is None
    np.testing.assert_array_equal(
        cached_split_array(paths, cache_file=tmp_path / "c3.npy", mode="L", side=32, data_dir=data),
        decode_split(paths, mode="L", side=32),
    )
    rgb = cached_split_array(paths, cache_file=tmp_path / "c4.npy", mode="RGB", side=28, data_dir=data)
    assert rgb.shape == (len(paths), 3, 28, 28)
    # an id the file does not hold: the whole lookup falls back to decoding
    assert grey_rows(data, [*rows["image_id"], "0" * 64], shape=(28, 28)) is None


def test_no_file_for_mixed_sizes_or_16_bit_images_and_a_stale_one_is_removed(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    folder, data = _ingested(tmp_path, fm, 5)
    assert (data / GREY_FILE).exists()
    big = Image.fromarray(fm[0][0]).resize((40, 40))
    big.save(folder / "Bag" / "big.png")
    ingest(f"imagefolder:{folder}", data_dir=data)
    assert not (data / GREY_FILE).exists()  # two sizes: nothing saved, the previous file gone
    (folder / "Bag" / "big.png").unlink()
    wide = (fm[0][1].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "Bag" / "deep.png")
    ingest(f"imagefolder:{folder}", data_dir=data)
    assert set(_manifest(data)["mode"]) & {"I;16", "I"} and not (data / GREY_FILE).exists()


def test_a_broken_file_is_ignored(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    folder, data = _ingested(tmp_path, fm, 4)
    (data / GREY_FILE).write_bytes(b"not an npz")
    rows = _manifest(data)
    assert load_grey_pixels(data) is None
    paths = [data / p for p in rows["path"]]
    np.testing.assert_array_equal(
        label_quality.read_grey(rows, data, side=28), label_quality.load_grey(paths, side=28)
    )
