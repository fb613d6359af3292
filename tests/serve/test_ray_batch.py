"""imgflow predict --ray: Ray Data batch prediction equals the single-process predictions.

One local Ray runtime (2 CPUs, 127.0.0.1, dashboard off) serves the module and is shut down after it.
Real Fashion-MNIST PNGs and the session's tiny trained model; two files that are no image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.errors import DataError
from components.model.checkpoint import Predictor
from components.serve import ray_batch
from components.serve.predict import list_inputs, predict_to_parquet
from tests.conftest import fmnist_arrays, free_port, png_bytes, run_cli


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    with ray_batch.ray_runtime(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray-images")
    x, _ = fmnist_arrays("t10k", 40)
    for i, a in enumerate(x):
        (folder / f"img_{i:02d}.png").write_bytes(png_bytes(a))
    (folder / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "zz_empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def single_process(
    tiny_model_dir: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("single") / "predictions.parquet"
    predict_to_parquet(
        Predictor.from_dir(tiny_model_dir), list_inputs(image_folder), out, batch_size=16, workers=0
    )
    return pd.read_parquet(out)


def _assert_same_predictions(ray_rows: pd.DataFrame, single: pd.DataFrame) -> None:
    assert list(ray_rows.columns) == list(single.columns)
    assert ray_rows["path"].tolist() == single["path"].tolist()
    assert ray_rows["label"].tolist() == single["label"].tolist()
    assert ray_rows["error"].fillna("").tolist() == single["error"].fillna("").tolist()
    ok = single["error"].isna().to_numpy()
    np.testing.assert_allclose(
        np.stack(ray_rows["probabilities"][ok]), np.stack(single["probabilities"][ok]), rtol=1e-5, atol=1e-6
    )


def test_one_actor_file_equals_single_process(
    ray_runtime: None, tiny_model_dir: Path, image_folder: Path, single_process: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "ray.parquet"
    seen: list[int] = []
    result = ray_batch.predict_with_ray(
        tiny_model_dir,
        ray_batch.list_images(image_folder),
        out,
        batch_size=16,
        actors=1,
        on_batch=seen.append,
    )
    assert (result.images, result.failed, result.actors, result.gpu) == (42, 2, 1, False)
    assert sum(seen) == 42
    rows = pd.read_parquet(out)
    _assert_same_predictions(rows, single_process)  # same order too: the single file keeps input order
    errors = rows.set_index("path")["error"]
    assert "not a decodable image" in errors[str(image_folder / "zz_corrupt.png")]
    assert "empty input" in errors[str(image_folder / "zz_empty.jpg")]
    assert rows["label"].notna().sum() == 40 and set(rows["label"].dropna()) <= set(result.classes)


def test_folder_output_through_an_fsspec_filesystem(
    ray_runtime: None, tiny_model_dir: Path, image_folder: Path, single_process: pd.DataFrame, tmp_path: Path
) -> None:
    """A CSV list read through an fsspec filesystem (wrapped for Ray's workers), written by the workers
    as a folder of Parquet files; rerunning replaces the folder's contents."""
    import fsspec

    listing = image_folder / "list.csv"
    pd.DataFrame({"path": sorted(p.name for p in image_folder.iterdir() if p.suffix != ".csv")}).to_csv(
        listing, index=False
    )
    source = ray_batch.list_images(str(listing), filesystem=fsspec.filesystem("file"))
    assert source.filesystem is not None and len(source) == 42
    out = tmp_path / "predictions"
    for _ in range(2):
        result = ray_batch.predict_with_ray(tiny_model_dir, source, out, batch_size=16, actors=1)
    assert (result.images, result.failed) == (42, 2)
    rows = pd.read_parquet(out).sort_values("path", ignore_index=True)
    _assert_same_predictions(rows, single_process.sort_values("path", ignore_index=True))


def test_cpu_shares_leave_room_to_decode() -> None:
    """Actors never take every CPU: a decoding task must always fit, or the job would wait forever."""
    assert ray_batch.cpu_shares(1, 2.0) == (1.0, 1.0)
    for actors, cpus in [(2, 2.0), (3, 2.0), (1, 1.0), (4, 4.0)]:
        actor, decode = ray_batch.cpu_shares(actors, cpus)
        assert actors * actor + decode <= cpus + 1e-9 and decode > 0


def test_unreachable_ray_address_is_a_clear_error(
    tiny_model_dir: Path, image_folder: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = run_cli(
        "predict", str(image_folder), "--ray", "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.parquet"),
        cwd=tmp_path, env={"RAY_ADDRESS": address}, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"no Ray cluster answers at RAY_ADDRESS={address}" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 120
    assert not (tmp_path / "p.parquet").exists()


def test_clip_embeddings_on_ray_equal_the_local_loader(
    ray_runtime: None, image_folder: Path, tmp_path: Path
) -> None:
    """The baseline's image embeddings through Ray Data (what the pipeline passes as ``encode`` for
    large data) equal the stage's own loader's, image for image."""
    import json

    import open_clip
    import torch

    from components.baseline.clip_model import create_clip, embed_images
    from tests.baseline.tiny_clip import TINY, TINY_CFG

    (tmp_path / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / f"{TINY}.json")
    torch.manual_seed(0)
    encoder = create_clip(TINY, None, random_init=True)
    paths = sorted(image_folder.glob("img_*.png"))[:24]
    ids = [p.stem for p in paths]
    local, _ = embed_images(encoder, ids, paths, cache=None, batch_size=8)
    on_ray, encoded = embed_images(
        encoder, ids, paths, cache=None, batch_size=8,
        encode=lambda todo: ray_batch.encode_images(todo, encoder.model, encoder.preprocess, batch_size=8),
    )  # fmt: skip
    assert encoded == 24 and on_ray.shape == local.shape
    np.testing.assert_allclose(on_ray, local, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="could not be encoded"):
        ray_batch.encode_images([image_folder / "zz_corrupt.png"], encoder.model, encoder.preprocess)
