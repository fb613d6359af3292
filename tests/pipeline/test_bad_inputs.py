"""Bad input never crashes ingestion and is never lost: one test per item of the issue's list.

Each test builds a small image folder (or CSV) of real Fashion-MNIST images in ``tmp_path``, adds
one kind of bad input, ingests, and checks that the item is quarantined with its reason (or kept
and recorded, for unusual modes), or that a clear error names the problem — and that the counts
add up: good + quarantined = seen.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.config import ValidateConfig
from components.core.errors import ConfigError, DataError
from components.data.image_stats import hamming, hex_to_uint64
from components.data.ingest import IngestSummary, ingest
from components.data.manifest import DataPaths, read_manifest
from components.quality.validation import validate_manifest
from tests.conftest import fmnist_arrays

CLASSES = ("bag", "shoe", "trousers")
FM_LABEL = {"bag": 8, "shoe": 7, "trousers": 1}


@pytest.fixture(scope="module")
def fm() -> tuple[np.ndarray, np.ndarray]:
    return fmnist_arrays("t10k", 400)


def encode(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixels_of(fm: tuple[np.ndarray, np.ndarray], cls: str, n: int) -> list[np.ndarray]:
    images, labels = fm
    return [images[i] for i in np.flatnonzero(labels == FM_LABEL[cls])[:n]]


def make_folder(root: Path, fm: tuple[np.ndarray, np.ndarray], *, per_class: int = 6) -> int:
    """3 class folders of real PNGs; returns the number of good files written."""
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, px in enumerate(pixels_of(fm, cls, per_class)):
            (root / cls / f"{i:02d}.png").write_bytes(encode(Image.fromarray(px)))
    return per_class * len(CLASSES)


def quarantine(data_dir: Path) -> dict[str, dict[str, str]]:
    with open(DataPaths(data_dir).quarantine, newline="", encoding="utf-8") as f:
        return {r["source_path"]: r for r in csv.DictReader(f)}


def adds_up(s: IngestSummary, data_dir: Path) -> pd.DataFrame:
    df = read_manifest(DataPaths(data_dir).manifest)
    assert s.seen == s.ingested + s.quarantined == len(df) + len(quarantine(data_dir))
    assert sum(s.reasons.values()) == s.quarantined
    return df


def ingest_folder(root: Path, tmp_path: Path, **kw: object) -> tuple[IngestSummary, pd.DataFrame]:
    data_dir = tmp_path / "data"
    s = ingest(f"imagefolder:{root}", data_dir=data_dir, **kw)  # type: ignore[arg-type]
    return s, adds_up(s, data_dir)


def row(df: pd.DataFrame, source_path: str) -> pd.Series:
    match = df[df["source_path"] == source_path]
    assert len(match) == 1, (source_path, list(df["source_path"]))
    return match.iloc[0]


# --------------------------------------------------------------------------------------------
# Broken files


def test_truncated_file_is_quarantined(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    data = (root / "bag" / "00.png").read_bytes()
    (root / "bag" / "cut.png").write_bytes(data[: len(data) // 2])
    s, _ = ingest_folder(root, tmp_path)
    assert (s.seen, s.ingested, s.reasons) == (good + 1, good, {"truncated": 1})
    assert "truncated or corrupt" in quarantine(tmp_path / "data")["bag/cut.png"]["reason"]


def test_corrupt_pixel_data_is_quarantined(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    data = bytearray(encode(Image.fromarray(pixels_of(fm, "bag", 7)[6]), "JPEG", quality=90))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64  # scribble over the entropy-coded data
    data = data[: len(data) - 200]
    (root / "bag" / "scribbled.jpg").write_bytes(bytes(data))
    s, _ = ingest_folder(root, tmp_path)
    assert s.seen == good + 1 and s.quarantined == 1
    assert next(iter(s.reasons)) in ("truncated", "undecodable")


def test_zero_byte_file_is_quarantined(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    (root / "shoe" / "empty.png").write_bytes(b"")
    s, _ = ingest_folder(root, tmp_path)
    assert (s.ingested, s.reasons) == (good, {"empty": 1})
    assert quarantine(tmp_path / "data")["shoe/empty.png"]["reason"] == "empty file (0 bytes)"


def test_non_image_with_image_extension_is_quarantined(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    (root / "shoe" / "readme.jpg").write_text("not pixels, just a text file\n")
    (root / "shoe" / "page.png").write_bytes(b"<html><body>404</body></html>")
    s, _ = ingest_folder(root, tmp_path)
    assert (s.ingested, s.reasons) == (good, {"undecodable": 2})
    assert "not an image" in quarantine(tmp_path / "data")["shoe/readme.jpg"]["reason"]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x\x9c\x03\x00") + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_quarantined_from_its_header(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    (root / "bag" / "bomb.png").write_bytes(_png_header_only(60_000, 60_000))  # 3.6e9 px: PIL refuses
    (root / "bag" / "big.png").write_bytes(_png_header_only(3_000, 3_000))  # 9e6 px > our cap
    s, _ = ingest_folder(root, tmp_path, max_pixels=1_000_000)
    assert (s.ingested, s.reasons) == (good, {"too_many_pixels": 2})
    assert "9000000 > max_pixels 1000000" in quarantine(tmp_path / "data")["bag/big.png"]["reason"]


# --------------------------------------------------------------------------------------------
# Unusual modes: kept (original bytes), mode recorded, measured on a correctly scaled grey image;
# validation's allowed_modes decides whether they may be trained on.


def test_cmyk_rgba_palette_and_16_bit_images_are_kept_and_recorded(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    px = pixels_of(fm, "trousers", 7)[6]
    grey = Image.fromarray(px)
    (root / "trousers" / "cmyk.jpg").write_bytes(encode(grey.convert("CMYK"), "JPEG", quality=95))
    rgba = grey.convert("RGBA")
    rgba.putalpha(128)
    (root / "trousers" / "rgba.png").write_bytes(encode(rgba))
    (root / "trousers" / "palette.png").write_bytes(encode(grey.convert("RGB").convert("P")))
    (root / "trousers" / "deep.png").write_bytes(encode(Image.fromarray(px.astype(np.uint16) * 257)))
    s, df = ingest_folder(root, tmp_path)
    assert (s.ingested, s.quarantined) == (good + 4, 0)
    expected = {"cmyk.jpg": ("CMYK", 4, 8), "rgba.png": ("RGBA", 4, 8), "palette.png": ("P", 1, 8),
                "deep.png": ("I;16", 1, 16)}  # fmt: skip
    brightness_8bit = px.mean() / 255
    for name, (mode, channels, depth) in expected.items():
        r = row(df, f"trousers/{name}")
        assert (r["mode"], r["channels"], r["bit_depth"]) == (mode, channels, depth), name
        # measured on the grey image: 16-bit scaled, not clipped to white
        assert r["brightness"] == pytest.approx(brightness_8bit, abs=0.03), name
    # default allowed_modes (L, RGB): validation names exactly these four rows
    report = validate_manifest(df, classes=CLASSES, cfg=ValidateConfig(min_per_class=1))
    modes = next(o for o in report.outcomes if o.name == "mode_allowed")
    assert not modes.success and modes.unexpected_count == 4
    assert {e["value"] for e in modes.examples} == {"CMYK", "RGBA", "P", "I;16"}


def test_exif_rotated_image_is_measured_as_displayed(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    px = np.asarray(Image.fromarray(pixels_of(fm, "shoe", 7)[6]).resize((56, 28)))  # 56 wide x 28 high
    upright = Image.fromarray(px).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored rotated, 28 wide x 56 high
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate it back by 90 degrees clockwise
    (root / "shoe" / "upright.jpg").write_bytes(encode(upright, "JPEG", quality=95))
    (root / "shoe" / "rotated.jpg").write_bytes(encode(sideways, "JPEG", quality=95, exif=exif))
    s, df = ingest_folder(root, tmp_path)
    assert s.ingested == good + 2
    a, b = row(df, "shoe/upright.jpg"), row(df, "shoe/rotated.jpg")
    assert (b["width"], b["height"], b["aspect"]) == (56, 28, 2.0)  # as displayed
    assert a["image_id"] != b["image_id"]  # different bytes...
    distance = hamming(hex_to_uint64([a["phash"]]), hex_to_uint64([b["phash"]]))[0]
    assert distance <= 4  # ...but a near-duplicate: the hash sees the displayed image

    # Every model input is the displayed image too: training's decoded splits and per-file dataset,
    # serving's decoder (the embedding store and the AL pixels use the same function).
    from torchvision.transforms.functional import pil_to_tensor

    from components.data.datasets import ManifestDataset, decode_split
    from components.model.checkpoint import decode_image

    files = [tmp_path / "data" / r["path"] for r in (a, b)]
    split = decode_split(files, mode="RGB", side=28).astype(np.float32)
    per_file = ManifestDataset(files, [0, 0], transform=pil_to_tensor, mode="RGB")
    served = [np.asarray(decode_image(f.read_bytes(), mode="RGB"), np.float32) for f in files]
    assert served[1].shape == served[0].shape == (28, 56, 3)  # upright: 56 wide
    assert np.abs(served[1] - served[0]).mean() < 6  # the same picture, up to JPEG's own losses
    assert np.abs(split[1] - split[0]).mean() < 6
    assert tuple(per_file[1][0].shape) == (3, 28, 56)


# --------------------------------------------------------------------------------------------
# Paths


def test_paths_with_spaces_and_unicode(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "my images ✓"
    (root / "sac à main").mkdir(parents=True)
    (root / "靴 shoes").mkdir()
    for i, px in enumerate(pixels_of(fm, "bag", 4)):
        (root / "sac à main" / f"photo {i} é.png").write_bytes(encode(Image.fromarray(px)))
    for i, px in enumerate(pixels_of(fm, "shoe", 4)):
        (root / "靴 shoes" / f"写真 {i}.png").write_bytes(encode(Image.fromarray(px)))
    (root / "靴 shoes" / "空 file.png").write_bytes(b"")
    s, df = ingest_folder(root, tmp_path)
    assert s.classes == ("sac à main", "靴 shoes")
    assert (s.ingested, s.reasons) == (8, {"empty": 1})
    assert "sac à main/photo 0 é.png" in set(df["source_path"])
    assert "靴 shoes/空 file.png" in quarantine(tmp_path / "data")  # the CSV round-trips unicode


def test_symlinks_outside_the_source_root_are_quarantined(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    good = make_folder(root, fm)
    elsewhere.mkdir()
    secret = elsewhere / "secret.png"
    secret.write_bytes(encode(Image.fromarray(pixels_of(fm, "bag", 8)[7])))
    os.symlink(secret, root / "bag" / "link_out.png")
    os.symlink(elsewhere, root / "bag" / "dir_out")
    os.symlink(root / "shoe" / "00.png", root / "bag" / "link_in.png")  # inside: read (a conflicting copy)
    s, _ = ingest_folder(root, tmp_path)
    q = quarantine(tmp_path / "data")
    assert s.seen == good + 3
    assert s.reasons == {"outside_root": 2, "conflicting_labels": 2}
    assert "leads outside the source root" in q["bag/link_out.png"]["reason"]
    assert str(secret) in q["bag/link_out.png"]["reason"] and q["bag/link_out.png"]["image_id"] == ""
    assert "directory symlink" in q["bag/dir_out"]["reason"]
    # the user can opt in
    s2 = ingest(f"imagefolder:{root}", data_dir=tmp_path / "d2", allow_outside_root=True)
    adds_up(s2, tmp_path / "d2")
    assert "outside_root" not in s2.reasons and s2.ingested == good - 1 + 1  # secret.png in once


def test_dotdot_in_csv_paths_is_quarantined(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    base = tmp_path / "ds"
    (base / "img").mkdir(parents=True)
    rows = []
    for cls in CLASSES:
        for i, px in enumerate(pixels_of(fm, cls, 5)):
            (base / "img" / f"{cls}{i}.png").write_bytes(encode(Image.fromarray(px)))
            rows.append((f"img/{cls}{i}.png", cls))
    (tmp_path / "outside.png").write_bytes(encode(Image.fromarray(pixels_of(fm, "bag", 6)[5])))
    rows += [("../outside.png", "bag"), ("img/../../outside.png", "bag"), ("img/../img/shoe0.png", "shoe")]
    rows += [(str(tmp_path / "outside.png"), "bag")]
    with open(base / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    data_dir = tmp_path / "data"
    s = ingest(f"csv:{base / 'labels.csv'}", data_dir=data_dir)
    adds_up(s, data_dir)
    q = quarantine(data_dir)
    assert s.seen == 19
    assert s.reasons == {"outside_root": 3, "duplicate": 1}  # img/../img/shoe0.png stays inside
    assert "CSV line 17 path '../outside.png' leads outside" in q["../outside.png"]["reason"]


def test_empty_class_folder_is_reported_and_fails_validation(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    (root / "hats").mkdir()
    s, df = ingest_folder(root, tmp_path)
    assert s.classes == ("bag", "hats", "shoe", "trousers") and s.ingested == good
    assert s.empty_classes == ("hats",)
    report = validate_manifest(df, classes=s.classes, cfg=ValidateConfig(min_per_class=1))
    assert not report.success
    missing = next(o for o in report.outcomes if o.name == "min_per_class")
    assert missing.examples == ({"split": "all", "label": "hats", "count": 0, "imbalance": None},)


def test_single_class_dataset_is_ingested_and_fails_validation(
    tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]
) -> None:
    root = tmp_path / "src"
    (root / "bag").mkdir(parents=True)
    for i, px in enumerate(pixels_of(fm, "bag", 10)):
        (root / "bag" / f"{i}.png").write_bytes(encode(Image.fromarray(px)))
    s, df = ingest_folder(root, tmp_path)
    assert s.classes == ("bag",) and s.ingested == 10
    report = validate_manifest(df, classes=s.classes, cfg=ValidateConfig(min_per_class=1))
    assert [o.name for o in report.errors()] == ["enough_classes"]
    assert "at least 2 classes" in report.summary_text()


def test_labels_differing_only_by_case(tmp_path: Path, fm: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path / "src"
    good = make_folder(root, fm)
    (root / "Bag").mkdir()
    (root / "Bag" / "x.png").write_bytes(encode(Image.fromarray(pixels_of(fm, "bag", 8)[7])))
    with pytest.raises(DataError, match=r"differ only by case \('Bag' vs 'bag'\)"):
        ingest(f"imagefolder:{root}", data_dir=tmp_path / "d1")
    # declared classes pick the spelling; the other is quarantined with a hint
    s, _ = ingest_folder(root, tmp_path, classes=list(CLASSES))
    assert (s.ingested, s.reasons) == (good, {"unknown_label": 1})
    assert (
        "differs only by case from the declared class 'bag'"
        in quarantine(tmp_path / "data")["Bag/x.png"]["reason"]
    )
    with pytest.raises(ConfigError, match="differ only by case"):
        ingest(f"imagefolder:{root}", data_dir=tmp_path / "d2", classes=["bag", "Bag", "shoe"])
