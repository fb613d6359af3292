"""Ingestion on small real data: Fashion-MNIST images and scikit-learn digits.

Builds image folders, CSVs and tiny idx files from real images in ``tmp_path``; only the network
(``urllib.request.urlopen``) is ever monkeypatched.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import struct
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.errors import ConfigError, DataError, DataUnavailableError
from components.data.ingest import IngestSummary, ingest
from components.data.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, DataPaths, DatasetInfo, read_manifest
from components.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    ImageInfo,
    Rejection,
    download_file,
    inspect_image,
    read_idx,
)
from components.task.splits import split_quotas

FM_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fm = pytest.mark.skipif(
    not (FM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


# --------------------------------------------------------------------------------------------
# Fixtures: real images


@pytest.fixture(scope="module")
def fm_test_set() -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST test set: images (10000, 28, 28) uint8, labels (10000,)."""
    if not (FM_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    images = read_idx(FM_DIR / "t10k-images-idx3-ubyte.gz", expect_magic=2051)
    labels = read_idx(FM_DIR / "t10k-labels-idx1-ubyte.gz", expect_magic=2049)
    return images, labels


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8: images (N, 8, 8) in 0..255, targets (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 255 / 16).astype(np.uint8), d.target


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, *, size: int = 32, exif_orientation: int | None = None) -> bytes:
    im = Image.fromarray(pixels).convert("RGB").resize((size, size * 2 // 3))
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    im.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fm_class_images(fm: tuple[np.ndarray, np.ndarray], label: int, n: int) -> list[np.ndarray]:
    images, labels = fm
    return [images[i] for i in np.flatnonzero(labels == label)[:n]]


def make_imagefolder(
    root: Path, fm: tuple[np.ndarray, np.ndarray], *, per_class: int = 12
) -> dict[str, bytes]:
    """3 classes of real Fashion-MNIST PNGs; returns relative path -> bytes written."""
    written = {}
    for label in (1, 7, 8):  # Trouser, Sneaker, Bag
        name = FASHION_MNIST_CLASSES[label].replace(" ", "_")
        for i, pixels in enumerate(fm_class_images(fm, label, per_class)):
            rel = f"{name}/img_{i:03d}.png"
            data = png_bytes(pixels)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            written[rel] = data
    return written


def read_quarantine(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == QUARANTINE_COLUMNS
        return list(reader)


def check_invariants(summary: IngestSummary, data_dir: Path) -> None:
    """What must hold after every ingestion."""
    assert summary.seen == summary.ingested + summary.quarantined
    assert sum(summary.reasons.values()) == summary.quarantined
    df = read_manifest(DataPaths(data_dir).manifest)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert len(df) == summary.ingested
    assert df["image_id"].is_unique  # so no image can sit in two splits
    assert len(read_quarantine(DataPaths(data_dir).quarantine)) == summary.quarantined
    for row in df.itertuples():
        stored = (data_dir / row.path).read_bytes()
        assert sha(stored) == row.image_id
        assert row.path == f"store/{row.image_id[:2]}/{row.image_id}.{Path(row.path).suffix[1:]}"
        assert row.bytes == len(stored)
        assert list(row.labels) == [row.label]
    info = DatasetInfo.load(DataPaths(data_dir).dataset)
    assert info.classes == summary.classes and info.counts == summary.counts
    counted = Counter(zip(df["split"], df["label"], strict=True))
    assert {
        s: {c: counted[(s, c)] for c in summary.classes} for s in ("train", "val", "test")
    } == summary.counts


# --------------------------------------------------------------------------------------------
# inspect_image


def test_inspect_image_accepts_real_png_and_jpeg(fm_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = fm_test_set[0][0]
    assert inspect_image(png_bytes(pixels), max_pixels=10_000) == ImageInfo("png", 28, 28, "L")
    info = inspect_image(jpeg_bytes(pixels, size=30), max_pixels=10_000)
    assert info == ImageInfo("jpeg", 30, 20, "RGB")
    # EXIF orientation 6 (rotated 90 degrees): reported size is as displayed
    rotated = inspect_image(jpeg_bytes(pixels, size=30, exif_orientation=6), max_pixels=10_000)
    assert rotated == ImageInfo("jpeg", 20, 30, "RGB")


def test_inspect_image_rejects_bad_bytes(fm_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    good = png_bytes(fm_test_set[0][1])
    cases = {
        b"": "empty",
        b"this is not an image, just text\n": "undecodable",
        good[: len(good) // 2]: "truncated",
    }
    for data, key in cases.items():
        got = inspect_image(data, max_pixels=10_000)
        assert isinstance(got, Rejection) and got.key == key, (key, got)
    too_big = inspect_image(good, max_pixels=28 * 28 - 1)
    assert isinstance(too_big, Rejection) and too_big.key == "too_many_pixels"
    assert "28x28" in too_big.reason
    assert inspect_image(good, max_pixels=28 * 28) == ImageInfo("png", 28, 28, "L")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        import zlib

        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x\x9c\x03\x00") + chunk(b"IEND", b"")
    )


def test_inspect_image_checks_pixels_from_the_header_before_decoding() -> None:
    # 40000 x 40000 = 1.6e9 pixels: decoding would need 1.6 GB; we must refuse from the header.
    got = inspect_image(_png_header_only(40_000, 40_000), max_pixels=89_478_485)
    assert isinstance(got, Rejection) and got.key == "too_many_pixels"
    # below PIL's own bomb limit, our limit still applies
    got = inspect_image(_png_header_only(5_000, 5_000), max_pixels=1_000_000)
    assert isinstance(got, Rejection) and got.key == "too_many_pixels"
    assert "25000000 > max_pixels 1000000" in got.reason


# --------------------------------------------------------------------------------------------
# fashion-mnist


@needs_fm
def test_fashion_mnist_source(tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    data_dir = tmp_path / "data"
    s = ingest("fashion-mnist", data_dir=data_dir, max_per_class=20, val_fraction=0.1, download=False)
    check_invariants(s, data_dir)
    assert s.classes == FASHION_MNIST_CLASSES
    assert (s.seen, s.ingested, s.quarantined) == (400, 400, 0)  # 20 per class in each official split
    for cls in FASHION_MNIST_CLASSES:
        assert (s.counts["train"][cls], s.counts["val"][cls], s.counts["test"][cls]) == (18, 2, 20)
    df = read_manifest(DataPaths(data_dir).manifest)
    assert set(df["mode"]) == {"L"} and set(df["width"]) == {28} and set(df["height"]) == {28}
    assert set(df["source"]) == {"fashion-mnist"}
    # the official test set stays test; train rows come from the official train set only
    assert all(p.startswith("idx:test:") for p in df.loc[df["split"] == "test", "source_path"])
    assert all(p.startswith("idx:train:") for p in df.loc[df["split"] != "test", "source_path"])
    # stored PNGs decode to exactly the idx pixels, with the right label
    images, labels = fm_test_set
    row = df.loc[df["source_path"] == "idx:test:0"].iloc[0]
    assert row["label"] == FASHION_MNIST_CLASSES[int(labels[0])]
    np.testing.assert_array_equal(np.asarray(Image.open(data_dir / row["path"])), images[0])
    assert read_quarantine(DataPaths(data_dir).quarantine) == []  # header-only file
    assert json.loads(DataPaths(data_dir).dataset.read_text())["classes"] == list(FASHION_MNIST_CLASSES)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _small_fm_dir(root: Path, fm: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """idx files from real images: test = 30 images; train = 60 others + two copies of test images
    (test[0] with its own label, test[1] with another label)."""
    images, labels = fm
    test_x, test_y = images[:30], labels[:30]
    train_x = np.concatenate([images[30:90], images[0:1], images[1:2]])
    train_y = np.concatenate([labels[30:90], labels[0:1], (labels[1:2] + 1) % 10])
    root.mkdir()
    _write_idx(root / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", test_y)
    _write_idx(root / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(root / "train-labels-idx1-ubyte.gz", train_y)
    return test_x, test_y


def test_fashion_mnist_copy_of_a_test_image_stays_in_test(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    fm_dir, data_dir = tmp_path / "fm", tmp_path / "data"
    _small_fm_dir(fm_dir, fm_test_set)
    s = ingest("fashion-mnist", data_dir=data_dir, fashion_mnist_dir=fm_dir, download=False)
    check_invariants(s, data_dir)
    assert s.seen == 92
    assert s.reasons == {"duplicate": 1, "conflicting_labels": 2}
    df = read_manifest(DataPaths(data_dir).manifest).set_index("source_path")
    assert df.loc["idx:test:0", "split"] == "test"
    assert "idx:train:60" not in df.index  # the train copy of test image 0
    assert "idx:test:1" not in df.index and "idx:train:61" not in df.index  # conflicting labels
    rows = {r["source_path"]: r for r in read_quarantine(DataPaths(data_dir).quarantine)}
    kept_id = df.loc["idx:test:0", "image_id"]
    assert rows["idx:train:60"]["image_id"] == kept_id
    assert "duplicate" in rows["idx:train:60"]["reason"] and kept_id in rows["idx:train:60"]["reason"]
    assert "conflicting labels" in rows["idx:test:1"]["reason"]
    assert rows["idx:test:1"]["image_id"] == rows["idx:train:61"]["image_id"]


def test_fashion_mnist_bad_idx_file_raises(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    fm_dir = tmp_path / "fm"
    _small_fm_dir(fm_dir, fm_test_set)
    good = gzip.decompress((fm_dir / "train-images-idx3-ubyte.gz").read_bytes())
    (fm_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good[:-100]))  # truncated
    with pytest.raises(DataError, match="truncated or corrupt"):
        ingest("fashion-mnist", data_dir=tmp_path / "d1", fashion_mnist_dir=fm_dir, download=False)
    (fm_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + good[4:]))
    with pytest.raises(DataError, match="magic"):
        ingest("fashion-mnist", data_dir=tmp_path / "d2", fashion_mnist_dir=fm_dir, download=False)
    (fm_dir / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        ingest("fashion-mnist", data_dir=tmp_path / "d3", fashion_mnist_dir=fm_dir, download=False)


def test_fashion_mnist_offline_raises_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError) as err:
        ingest("fashion-mnist", data_dir=tmp_path / "data", fashion_mnist_dir=empty)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "fashion_mnist_dir" in message
    assert calls and calls[0].startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    assert not list((tmp_path / "data" / ".downloads").glob("*"))  # no partial file left behind
    # with downloads off, the same advice and no network call
    calls.clear()
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        ingest("fashion-mnist", data_dir=tmp_path / "data", fashion_mnist_dir=empty, download=False)
    assert calls == []


def test_fashion_mnist_checksum_mismatch_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a server answering with the wrong content (here: the Debian re-compressed file, whose md5
    # differs from the official one, or just junk)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **kw: io.BytesIO(b"<html>not found</html>"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError, match="md5") as err:
        ingest("fashion-mnist", data_dir=tmp_path / "data", fashion_mnist_dir=empty)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert not list((tmp_path / "data" / ".downloads").glob("*"))


def test_download_file_writes_verified_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"some bytes" * 1000
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **kw: io.BytesIO(payload))
    dest = download_file(
        "http://example.invalid/x.gz", tmp_path / "cache" / "x.gz", md5=hashlib.md5(payload).hexdigest()
    )
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x.gz"]
    assert len(FASHION_MNIST_FILES) == 4


# --------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_source_with_bad_files(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    root, data_dir = tmp_path / "images", tmp_path / "data"
    written = make_imagefolder(root, fm_test_set, per_class=12)
    good = written["Trouser/img_000.png"]
    (root / "Trouser" / "truncated.png").write_bytes(png_bytes(fm_test_set[0][5])[:150])
    (root / "Trouser" / "empty.png").write_bytes(b"")
    (root / "Sneaker" / "notes.png").write_text("these are not pixels\n")
    big = np.tile(fm_test_set[0][6], (8, 8))  # 224 x 224 real image
    (root / "Bag" / "big.png").write_bytes(png_bytes(big))
    (root / "stray.png").write_bytes(good)  # not in a class folder
    (root / "Bag" / ".hidden.png").write_bytes(b"")  # hidden files are not items
    s = ingest(
        f"imagefolder:{root}", data_dir=data_dir, val_fraction=0.2, test_fraction=0.2, max_pixels=10_000
    )
    check_invariants(s, data_dir)
    assert s.classes == ("Bag", "Sneaker", "Trouser")  # sorted sub-folder names
    assert s.seen == 36 + 5 and s.ingested == 36
    assert s.reasons == {"empty": 1, "no_label": 1, "too_many_pixels": 1, "truncated": 1, "undecodable": 1}
    rows = {r["source_path"]: r for r in read_quarantine(DataPaths(data_dir).quarantine)}
    assert set(rows) == {
        "Trouser/truncated.png",
        "Trouser/empty.png",
        "Sneaker/notes.png",
        "Bag/big.png",
        "stray.png",
    }
    assert "truncated" in rows["Trouser/truncated.png"]["reason"]
    assert "empty" in rows["Trouser/empty.png"]["reason"]
    assert "not an image" in rows["Sneaker/notes.png"]["reason"]
    assert "too many pixels" in rows["Bag/big.png"]["reason"]
    assert rows["Bag/big.png"]["image_id"] == sha((root / "Bag" / "big.png").read_bytes())
    assert rows["Trouser/truncated.png"]["label"] == "Trouser"
    # stratified, every class in every split, exact quotas
    for cls in s.classes:
        expected = split_quotas(12, val_fraction=0.2, test_fraction=0.2)
        assert (s.counts["train"][cls], s.counts["val"][cls], s.counts["test"][cls]) == expected
    # the store holds the original bytes
    df = read_manifest(DataPaths(data_dir).manifest).set_index("source_path")
    for rel, data in written.items():
        assert (data_dir / df.loc[rel, "path"]).read_bytes() == data
    assert set(df["source"]) == {f"imagefolder:{root}"}


def test_imagefolder_keeps_formats_and_declared_classes(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, targets = digits
    root = tmp_path / "digits"
    for d in (0, 1, 2):
        (root / f"digit{d}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(targets == d)[:10]):
            data = jpeg_bytes(images[idx], size=24) if d == 2 else png_bytes(images[idx])
            (root / f"digit{d}" / f"{i}.{'jpg' if d == 2 else 'png'}").write_bytes(data)
    s = ingest(
        f"imagefolder:{root}", data_dir=tmp_path / "data", classes=["digit2", "digit0"], max_per_class=6
    )
    check_invariants(s, tmp_path / "data")
    assert s.classes == ("digit2", "digit0")  # declared order is index order
    assert s.reasons == {"unknown_label": 6}  # digit1 is not declared (capped at 6 as listed)
    df = read_manifest(DataPaths(tmp_path / "data").manifest)
    jpeg = df[df["label"] == "digit2"]
    assert set(jpeg["mode"]) == {"RGB"} and all(p.endswith(".jpeg") for p in jpeg["path"])
    assert set(df.loc[df["label"] == "digit0", "mode"]) == {"L"}
    assert (df["width"] > 0).all()
    assert len(df) == 12  # max_per_class keeps the first 6 per class


def test_byte_identical_images_never_land_in_two_splits(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    root, data_dir = tmp_path / "images", tmp_path / "data"
    written = make_imagefolder(root, fm_test_set, per_class=10)
    dup_same = written["Trouser/img_000.png"]
    dup_other = written["Bag/img_003.png"]
    (root / "Trouser" / "copy_a.png").write_bytes(dup_same)
    (root / "Trouser" / "z_copy_b.png").write_bytes(dup_same)
    (root / "Sneaker" / "copy_of_bag.png").write_bytes(dup_other)  # same bytes, different class
    s = ingest(f"imagefolder:{root}", data_dir=data_dir, val_fraction=0.3, test_fraction=0.3)
    check_invariants(s, data_dir)
    assert s.reasons == {"duplicate": 2, "conflicting_labels": 2}
    df = read_manifest(DataPaths(data_dir).manifest)
    assert (df["image_id"] == sha(dup_same)).sum() == 1
    kept = df.loc[df["image_id"] == sha(dup_same), "source_path"].item()
    assert kept == "Trouser/copy_a.png"  # the first listed copy
    assert (df["image_id"] == sha(dup_other)).sum() == 0
    rows = {r["source_path"]: r for r in read_quarantine(DataPaths(data_dir).quarantine)}
    assert sha(dup_same) in rows["Trouser/img_000.png"]["reason"]
    assert "Trouser/copy_a.png" in rows["Trouser/img_000.png"]["reason"]
    assert rows["Bag/img_003.png"]["reason"] == rows["Sneaker/copy_of_bag.png"]["reason"]
    assert "conflicting labels" in rows["Bag/img_003.png"]["reason"]


# --------------------------------------------------------------------------------------------
# csv


def _csv_dataset(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> tuple[Path, list[dict[str, str]]]:
    """Images in tmp/csvdata/img/, rows referring to them relative to the CSV's folder."""
    base = tmp_path / "csvdata"
    (base / "img").mkdir(parents=True)
    rows = []
    for label in (0, 3, 5):
        for i, pixels in enumerate(fm_class_images(fm, label, 10)):
            rel = f"img/{label}_{i}.png"
            (base / rel).write_bytes(png_bytes(pixels))
            rows.append({"path": rel, "label": FASHION_MNIST_CLASSES[label]})
    return base / "labels.csv", rows


def _write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("path", "label")) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_csv_source_with_missing_unknown_and_duplicate_rows(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    csv_path, rows = _csv_dataset(tmp_path, fm_test_set)
    extra = [
        {"path": "img/does_not_exist.png", "label": "Dress"},
        {"path": rows[0]["path"], "label": "Cardigan"},  # unknown label
        {"path": rows[1]["path"], "label": rows[1]["label"]},  # same file listed twice
        {"path": rows[2]["path"], "label": "Dress"},  # same file, another label
        {"path": rows[3]["path"], "label": ""},  # no label
    ]
    _write_csv(csv_path, rows + extra)
    classes = ["T-shirt/top", "Dress", "Sandal"]
    data_dir = tmp_path / "data"
    s = ingest(f"csv:{csv_path}", data_dir=data_dir, classes=classes)
    check_invariants(s, data_dir)
    assert s.classes == tuple(classes)
    assert s.seen == 35
    assert s.reasons == {
        "not_found": 1,
        "unknown_label": 1,
        "duplicate": 1,
        "conflicting_labels": 2,
        "missing_label": 1,
    }
    q = read_quarantine(DataPaths(data_dir).quarantine)
    by_reason = {r["reason"].split(":")[0]: r for r in q}
    assert by_reason["file not found"]["source_path"] == "img/does_not_exist.png"
    assert by_reason["unknown label 'Cardigan'"]["label"] == "Cardigan"
    assert all(r["source"] == f"csv:{csv_path}" for r in q)
    df = read_manifest(DataPaths(data_dir).manifest)
    assert rows[2]["path"] not in set(df["source_path"])
    assert set(df["label"]) == {"T-shirt/top", "Dress", "Sandal"}
    assert s.counts["test"]["Dress"] >= 1 and s.counts["val"]["Sandal"] >= 1


def test_csv_with_labels_column_is_accepted(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    csv_path, rows = _csv_dataset(tmp_path, fm_test_set)
    for r in rows:
        r["labels"] = r["label"]
    _write_csv(csv_path, rows, columns=("path", "label", "labels"))
    s = ingest(f"csv:{csv_path}", data_dir=tmp_path / "data")
    check_invariants(s, tmp_path / "data")
    assert s.ingested == 30 and s.classes == ("Dress", "Sandal", "T-shirt/top")


def test_ingest_is_deterministic_and_independent_of_row_order(
    tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    csv_path, rows = _csv_dataset(tmp_path, fm_test_set)
    _write_csv(csv_path, rows)
    first = ingest(f"csv:{csv_path}", data_dir=tmp_path / "a")
    second = ingest(f"csv:{csv_path}", data_dir=tmp_path / "b")
    assert first.data_version == second.data_version
    assert DataPaths(tmp_path / "a").manifest.read_bytes() == DataPaths(tmp_path / "b").manifest.read_bytes()
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    _write_csv(csv_path, shuffled)
    third = ingest(f"csv:{csv_path}", data_dir=tmp_path / "c")
    split_of = {
        d: dict(zip(df["image_id"], df["split"], strict=True))
        for d, df in ((d, read_manifest(DataPaths(tmp_path / d).manifest)) for d in ("a", "c"))
    }
    assert split_of["a"] == split_of["c"]
    assert third.data_version == first.data_version
    other_seed = ingest(f"csv:{csv_path}", data_dir=tmp_path / "d", seed=1)
    assert other_seed.data_version != first.data_version


def test_reingest_reuses_the_store(tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    root, data_dir = tmp_path / "images", tmp_path / "data"
    make_imagefolder(root, fm_test_set, per_class=4)
    first = ingest(f"imagefolder:{root}", data_dir=data_dir)
    stored = {p: p.stat().st_mtime_ns for p in (data_dir / "store").rglob("*.png")}
    assert len(stored) == 12
    second = ingest(f"imagefolder:{root}", data_dir=data_dir)
    assert second.data_version == first.data_version
    assert {p: p.stat().st_mtime_ns for p in (data_dir / "store").rglob("*.png")} == stored
    # every item examined again: the store's listing says which copies exist, none is rewritten ...
    third = ingest(f"imagefolder:{root}", data_dir=data_dir, incremental=False)
    assert third.data_version == first.data_version
    assert {p: p.stat().st_mtime_ns for p in (data_dir / "store").rglob("*.png")} == stored
    # ... and a copy missing from the store is written again
    gone = sorted(stored)[0]
    gone.unlink()
    ingest(f"imagefolder:{root}", data_dir=data_dir, incremental=False)
    assert hashlib.sha256(gone.read_bytes()).hexdigest() == gone.stem  # content-addressed, whole
    assert not [p for p in (data_dir / "store").rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# user errors


def test_bad_specs_and_paths_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fashion-mnist.*imagefolder:<dir>.*csv:<file>"):
        ingest("parquet:images.parquet", data_dir=tmp_path / "d")  # (s3:// is a source now)
    with pytest.raises(ConfigError, match="imagefolder:<dir>"):
        ingest("imagefolder:", data_dir=tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        ingest(f"imagefolder:{tmp_path / 'nope'}", data_dir=tmp_path / "d")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ingest(f"imagefolder:{tmp_path / 'flat'}", data_dir=tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        ingest(f"csv:{tmp_path / 'nope.csv'}", data_dir=tmp_path / "d")
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        ingest(f"csv:{tmp_path / 'bad.csv'}", data_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="val_fraction"):
        ingest("fashion-mnist", data_dir=tmp_path / "d", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="twice"):
        ingest("fashion-mnist", data_dir=tmp_path / "d", classes=["Bag", "Bag"])


def test_all_items_quarantined_raises_after_writing_the_quarantine(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(b"")
    (root / "cat" / "b.jpg").write_text("nope")
    with pytest.raises(DataError, match="no usable image") as err:
        ingest(f"imagefolder:{root}", data_dir=tmp_path / "data")
    assert "quarantine.csv" in str(err.value)
    assert len(read_quarantine(DataPaths(tmp_path / "data").quarantine)) == 2


# --------------------------------------------------------------------------------------------
# image properties (components.data.image_stats)


def test_phash_products_give_the_fft_bits_on_real_and_flat_thumbnails(
    fm_test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    """The matrix-product DCT keeps the reference's bits: 10k real thumbnails, plus flat and synthetic
    ones whose coefficients tie with the median (rounding decides there, so the FFT path answers)."""
    from components.data.image_stats import _phash_bits_fft, phash_bits

    thumbs = [np.asarray(Image.fromarray(p).resize((32, 32), Image.Resampling.LANCZOS)) for p in fm_test_set[0]]
    flat = [np.full((32, 32), v, dtype=np.uint8) for v in (0, 1, 128, 255)]
    ramp = np.tile((np.arange(32) * 8).astype(np.uint8), (32, 1))
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    halves = np.zeros((32, 32), dtype=np.uint8)
    halves[16:] = 255
    stack = np.stack(thumbs + flat + [ramp, checker, halves])
    bits = phash_bits(stack)
    assert bits.shape == (len(stack), 64)
    np.testing.assert_array_equal(bits, _phash_bits_fft(stack))
    assert len({b.tobytes() for b in bits[: len(thumbs)]}) > 0.9 * len(thumbs)  # real images hash apart
    wide = np.random.default_rng(0).integers(0, 256, size=(50, 32, 40), dtype=np.uint8)  # not square
    np.testing.assert_array_equal(phash_bits(wide), _phash_bits_fft(wide))


def test_phash_is_imagehash_phash_and_properties_are_measured(
    fm_test_set: tuple[np.ndarray, np.ndarray], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    import imagehash

    from components.data.image_stats import measure, phash_hex, sample_pixels

    images = [Image.fromarray(p) for p in fm_test_set[0][:150]]
    images += [Image.fromarray(np.tile(p, (9, 9))).convert("RGB") for p in digits[0][:20]]  # 72x72 RGB
    samples = [sample_pixels(im) for im in images]
    assert phash_hex([s.thumb for s in samples]) == [str(imagehash.phash(im)) for im in images]
    measured = measure(samples)  # small images in one batch, larger ones measured one by one
    for im, (brightness, contrast, blur) in zip(images, measured, strict=True):
        grey = np.asarray(im.convert("L"), dtype=np.float64)
        lap = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
        assert (brightness, contrast) == pytest.approx((grey.mean() / 255, grey.std() / 255), rel=1e-4)
        assert blur == pytest.approx(lap.var(), rel=1e-4)
    # a blurred copy scores lower on blur; a flat image scores zero
    from PIL import ImageFilter

    sharp = sample_pixels(images[0])
    soft = sample_pixels(images[0].filter(ImageFilter.GaussianBlur(1.5)))
    flat = sample_pixels(Image.new("L", (28, 28), 200))
    scores = measure([sharp, soft, flat])
    assert scores[0, 2] > 3 * scores[1, 2] and scores[2].tolist() == pytest.approx([200 / 255, 0.0, 0.0])


def test_near_duplicate_pairs_match_brute_force() -> None:
    from components.data.image_stats import duplicate_sets, hamming, near_duplicate_pairs

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=2000, dtype=np.int64).astype(np.uint64)
    for i in range(0, 200, 2):  # plant pairs at distances 0..5
        flips = rng.choice(64, size=i % 6, replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    for max_distance in (0, 3, 5):
        got = near_duplicate_pairs(hashes, max_distance=max_distance)
        a, b = np.triu_indices(len(hashes), k=1)
        d = hamming(hashes[a], hashes[b])
        expected = np.stack([a, b, d], axis=1)[d <= max_distance]
        np.testing.assert_array_equal(got, expected)
    sets = duplicate_sets(len(hashes), near_duplicate_pairs(hashes, max_distance=5)[:, :2])
    assert len(sets) == 100 and all(len(s) == 2 for s in sets)


@needs_fm
def test_manifest_holds_image_properties(tmp_path: Path, fm_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    import imagehash

    s = ingest("fashion-mnist", data_dir=tmp_path / "d", max_per_class=3, download=False)
    df = read_manifest(DataPaths(tmp_path / "d").manifest)
    assert s.ingested == 60 and df["decode_ok"].all()
    assert set(df["aspect"]) == {1.0} and set(df["channels"]) == {1} and set(df["bit_depth"]) == {8}
    row = df.loc[df["source_path"] == "idx:test:0"].iloc[0]
    pixels = fm_test_set[0][0]
    assert row["brightness"] == pytest.approx(pixels.mean() / 255, rel=1e-5)
    assert row["contrast"] == pytest.approx(pixels.std() / 255, rel=1e-4)
    assert row["phash"] == str(imagehash.phash(Image.fromarray(pixels)))
