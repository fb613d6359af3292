"""Batch work over many images with Ray Data: ``imgflow predict --ray`` and the heavy feature stages.

The pipeline of one job (:func:`map_images`)::

    the listing (folder, CSV, object-store URI)      driver: one row per image {index, path, name}
      -> read + decode + preprocess                  Ray tasks, as many as the CPUs allow
      -> fn_class(batch)                             an actor pool: each actor loads the model once
                                                     (GPU actors when the cluster has GPUs)
      -> the caller's sink                           one Parquet file (streamed by the driver), a
                                                     folder of Parquet files (written by the workers),
                                                     or an array in input order (embeddings)

Decoding runs in tasks, apart from the model's actors, so a single CPU actor scores while the other
CPUs decode (the split Ray's batch-inference guide recommends). An image that cannot be read or
decoded travels on as a row with its ``error`` text and zero pixels, never dropped: prediction rows
come from :func:`components.serve.predict.prediction_table`, the same record function as the
single-process ``imgflow predict``, so both write the same columns.

The listing happens on the driver, not through ``ray.data.read_binary_files``: a file that cannot be
read (denied, gone since the listing) must become an error row as it does without Ray, and Ray's
file readers fail the whole job on it. Files are read through a ``pyarrow.fs`` filesystem (an fsspec
one is wrapped), so the same code reads local disk and object stores (``s3://bucket/prefix``).

The Ray runtime comes from :mod:`components.train.ray_adapter` (a local runtime on 127.0.0.1 with
the dashboard off, or the cluster ``RayOptions.address`` names; an unreachable address is a clear
error within seconds). This module is the only one importing ``ray.data``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from components.core.errors import ConfigError, DataError
from components.core.jsonio import atomic_path
from components.data.sources import is_object_uri
from components.model.checkpoint import ModelSpec, Predictor, decode_image, load_spec
from components.model.models import create_image_transform, image_mode
from components.serve.predict import IMAGE_SUFFIXES, list_inputs, prediction_table
from components.train import ray_adapter

if TYPE_CHECKING:
    from components.train.ray_adapter import RayOptions

logger = logging.getLogger(__name__)

_DECODE_WORKER_BYTES = 640 * 2**20


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ImageSource:
    """The images of one job, in order: ``paths`` as ``filesystem`` reads them (None: the local disk)
    and ``names``, what output rows call them (the local path, or the full ``s3://...`` URI)."""

    paths: tuple[str, ...]
    names: tuple[str, ...]
    filesystem: Any = None
    """A ``pyarrow.fs.FileSystem``, or None for local files (read with ``Path.read_bytes``)."""

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def local(cls, paths: list[Path] | list[str]) -> ImageSource:
        """Local files, named by their path."""
        names = tuple(str(p) for p in paths)
        return cls(paths=names, names=names)


def list_images(source: str | Path, *, filesystem: Any | None = None) -> ImageSource:
    """The images of a folder (recursive, sorted), a CSV with a ``path`` column (relative to the CSV)
    or an object-store URI (``s3://bucket/prefix`` or ``.../list.csv``); ``filesystem``: a
    ``pyarrow.fs`` or fsspec filesystem to read ``source`` with (default: the local disk for a path,
    fsspec's for a URI, with its endpoint and credentials from where that library looks)."""
    text = str(source)
    if filesystem is None and not is_object_uri(text):
        return ImageSource.local(list_inputs(Path(source)))
    fs, root = _filesystem(text, filesystem)
    scheme = text.split("://", 1)[0] + "://" if is_object_uri(text) else ""
    paths = _list_remote(fs, root, text)
    return ImageSource(paths=paths, names=tuple(scheme + p for p in paths), filesystem=fs)


def as_arrow_filesystem(filesystem: Any) -> Any:
    """``filesystem`` as a ``pyarrow.fs.FileSystem`` (an fsspec filesystem is wrapped, not copied)."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.FileSystem):
        return filesystem
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


def _filesystem(uri: str, filesystem: Any | None) -> tuple[Any, str]:
    """The arrow filesystem and the path inside it of ``uri``."""
    if filesystem is not None:
        root = uri.split("://", 1)[1] if is_object_uri(uri) else uri
        return as_arrow_filesystem(filesystem), root.rstrip("/")
    from fsspec.core import url_to_fs

    try:
        # A fresh instance: fsspec's cache would keep the endpoint and credentials of an earlier call.
        fs, root = url_to_fs(uri, skip_instance_cache=True)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its driver is not installed
        raise ConfigError(f"cannot open {uri}: {e}") from e
    return as_arrow_filesystem(fs), str(root).rstrip("/")


def _list_remote(fs: Any, root: str, uri: str) -> tuple[str, ...]:
    import pyarrow.fs as pafs

    hint = "check the URI, the endpoint and the credentials"
    try:
        if root.lower().endswith(".csv") and fs.get_file_info(root).type == pafs.FileType.File:
            files = _csv_paths(fs, root, uri)
        else:
            found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=False))
            files = sorted(
                i.path for i in found
                if i.type == pafs.FileType.File and posixpath.splitext(i.path)[1].lower() in IMAGE_SUFFIXES
            )  # fmt: skip
    except DataError:
        raise
    except Exception as e:  # arrow and the fsspec drivers raise their own types (endpoint, denied, missing)
        raise DataError(f"cannot list {uri} ({type(e).__name__}: {e}): {hint}") from e
    if not files:
        raise DataError(f"no images found in {uri} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return tuple(files)


def _csv_paths(fs: Any, csv_path: str, uri: str) -> list[str]:
    import pandas as pd

    with fs.open_input_stream(csv_path) as f:
        table = pd.read_csv(f)
    if "path" not in table.columns:
        raise DataError(f"{uri} needs a 'path' column (image paths relative to the CSV)")
    folder = posixpath.dirname(csv_path)
    return [posixpath.normpath(posixpath.join(folder, p)) for p in table["path"].astype(str)]


def read_bytes(path: str, filesystem: Any | None) -> bytes:
    """One file's bytes: from the local disk (``filesystem`` None) or an arrow filesystem."""
    if filesystem is None:
        return Path(path).read_bytes()
    try:
        with filesystem.open_input_file(path) as f:
            return bytes(f.read())
    except OSError:
        raise
    except Exception as e:  # fsspec drivers' own errors: an error row, like a local OSError
        raise OSError(f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- preparing images


class ImagePrep(Protocol):
    """Raw bytes -> one float32 array of ``shape`` (a DataError for bytes that are no image)."""

    shape: tuple[int, ...]

    def __call__(self, data: bytes) -> np.ndarray: ...


class ModelInput:
    """A classifier's own preprocessing (:meth:`Predictor.preprocess` for one image), built from its
    spec alone so the decoding tasks never load the weights."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.shape = tuple(int(v) for v in spec.data_config["input_size"])
        self._transform: Callable[[Any], Any] | None = None

    def __call__(self, data: bytes) -> np.ndarray:
        if self._transform is None:  # built where it runs: a task gets the spec, not the transform
            self._transform = create_image_transform(self.spec.data_config, is_training=False)
        return np.asarray(
            self._transform(decode_image(data, mode=image_mode(self.spec.in_chans))), np.float32
        )


def _read_and_prepare(
    batch: dict[str, np.ndarray], *, filesystem: Any | None, prepare: ImagePrep
) -> dict[str, np.ndarray]:
    """A Ray task's block: {index, path, name} -> {index, path (the name), pixels (B, *shape), error}."""
    pixels, errors = [], []
    for path in batch["path"]:
        try:
            pixels.append(prepare(read_bytes(str(path), filesystem)))
            errors.append("")
        except (DataError, OSError) as e:  # the image's row says why; the job goes on
            pixels.append(np.zeros(prepare.shape, np.float32))
            errors.append(str(e))
    return {
        "index": np.asarray(batch["index"], np.int64),
        "path": np.asarray(batch["name"], dtype=object),
        "pixels": np.stack(pixels),
        "error": np.asarray(errors, dtype=object),
    }


# --------------------------------------------------------------------------- the Ray Data job


@contextlib.contextmanager
def ray_runtime(options: RayOptions | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """A connected Ray runtime for the block: the cluster ``options.address`` names (checked first:
    an unreachable one is a ConfigError within seconds), else a local one on 127.0.0.1 with
    ``num_cpus``. Shut down on exit when this call started it."""
    with ray_adapter.runtime(options, num_cpus=num_cpus):
        _quiet_ray_data(verbose=bool(options and options.verbose))
        yield


def _quiet_ray_data(*, verbose: bool) -> None:
    """Not ``verbose``: no Ray Data progress bars, per-job lines or tuning hints on the console
    (its warnings then say that progress bars are off, and which detector found a slow operator)."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = verbose


def map_images(
    source: ImageSource,
    fn_class: type,
    *,
    prepare: ImagePrep,
    fn_constructor_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
) -> Any:
    """A lazy ``ray.data.Dataset``: ``source``'s images read and ``prepare``-d by Ray tasks, then
    ``fn_class`` mapped over batches of up to ``batch_size`` images by ``actors`` actors (each
    constructs ``fn_class(**fn_constructor_kwargs)`` once: load the model there).

    ``fn_class`` gets numpy batches {index (B,), path (B,) names, pixels (B, *prepare.shape) float32,
    error (B,) '' when fine} and returns a batch (dict of arrays, pandas or Arrow) that keeps
    ``index``. Needs a connected runtime (:func:`ray_runtime`)."""
    import ray.data

    if actors < 1:
        raise ConfigError(f"--actors must be at least 1, got {actors}")
    rows = [
        {"index": i, "path": p, "name": n}
        for i, (p, n) in enumerate(zip(source.paths, source.names, strict=True))
    ]
    blocks = max(1, math.ceil(len(rows) / batch_size))  # one read task per model batch
    # Each decoding task reserves the memory it uses: its worker (torch imported: ~0.6 GiB measured)
    # and its block of pixels, twice (built, then stacked). Its remote arguments then differ from the
    # actors', so Ray Data does not fuse decoding into the actors, where it would run in turn with
    # the model on the actors' CPUs only.
    decode_bytes = _DECODE_WORKER_BYTES + 2 * batch_size * math.prod(prepare.shape) * 4
    actor_cpus, decode_cpus = cpu_shares(actors, ray_adapter.cluster_resources().get("CPU", 1.0))
    return (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map_batches(
            functools.partial(_read_and_prepare, filesystem=source.filesystem, prepare=prepare),
            batch_size=None, batch_format="numpy", num_cpus=decode_cpus, memory=decode_bytes,
        )
        .map_batches(
            fn_class, fn_constructor_kwargs=dict(fn_constructor_kwargs or {}), batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus, num_gpus=gpus_per_actor,
        )
    )  # fmt: skip


def cpu_shares(actors: int, cpus: float) -> tuple[float, float]:
    """(CPUs each actor reserves, CPUs each decoding task reserves) on a cluster of ``cpus``: one each
    while ``actors`` leave a CPU free, else equal shares of ``cpus / (actors + 1)``. Actors hold their
    CPUs for the whole job: had they taken every CPU, no decoding task could start and the job would
    wait forever (measured: 2 actors of 1 CPU on 2 CPUs)."""
    if cpus >= actors + 1:
        return 1.0, 1.0
    share = cpus / (actors + 1)
    return share, share


@contextlib.contextmanager
def _ordered() -> Iterator[None]:
    """Ray Data hands out the job's rows in input order while the block runs (its default favours speed)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def map_images_to_array(
    source: ImageSource, fn_class: type, *, column: str, prepare: ImagePrep, **kwargs: Any
) -> tuple[np.ndarray, list[str]]:
    """(``column`` of every row stacked in input order (N, ...), the per-image error texts).

    For features and embeddings a stage keeps in memory; ``kwargs`` go to :func:`map_images`."""
    out: list[np.ndarray] = []
    errors: list[str] = []
    with _ordered():
        for batch in map_images(source, fn_class, prepare=prepare, **kwargs).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            out.append(np.asarray(batch[column]))
            errors.extend(str(e) for e in batch["error"])
    if not out:
        raise DataError("no images to map")
    return np.concatenate(out), errors


# --------------------------------------------------------------------------- batch prediction


def share_model_files(model_dir: Path) -> list[Any]:
    """Every file of a model folder (relative path -> bytes) put in Ray's object store, as a one-item
    list holding the reference: actors get the model by value, so an actor on another node needs no
    shared storage, and the nested reference keeps the MBs out of every actor's constructor arguments."""
    import ray

    root = Path(model_dir)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return [ray.put(files)]


class PredictBatch:
    """A Ray Data actor holding one :class:`Predictor`: a batch of prepared pixels -> prediction rows
    (:func:`components.serve.predict.prediction_table`) plus ``index``. ``model``: what
    :func:`share_model_files` returned."""

    def __init__(self, model: list[Any], *, top_k: int, device: str = "cpu") -> None:
        import ray

        self._dir = tempfile.TemporaryDirectory(prefix="imgflow-ray-model-")
        root = Path(self._dir.name)
        files: dict[str, bytes] = ray.get(model[0])
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        self.predictor = Predictor.from_dir(root, device=device)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa
        import torch

        # Ray hands out read-only views of its object store; torch wants a writable array.
        pixels = np.require(batch["pixels"], np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
        x = torch.from_numpy(pixels)
        scored = self.predictor.score_batch(x)  # probabilities and, when the model ships one, OOD scores
        table = prediction_table(
            [str(p) for p in batch["path"]], scored.probs, [str(e) for e in batch["error"]], self.predictor,
            top_k=self.top_k, ood_scores=scored.ood_scores,
        )  # fmt: skip
        return table.append_column("index", pa.array(batch["index"], pa.int64()))


@dataclass(frozen=True)
class RayPrediction:
    """What a ``predict --ray`` job did: rows written (``failed`` of them with an error), where, the
    actors and whether they had a GPU each."""

    images: int
    failed: int
    out: str
    classes: tuple[str, ...]
    actors: int
    gpu: bool

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "out": self.out, "classes": list(self.classes),
                "actors": self.actors, "gpu": self.gpu}  # fmt: skip


def predict_with_ray(
    model_dir: Path,
    source: ImageSource,
    out: Path | str,
    *,
    batch_size: int = 256,
    top_k: int = 3,
    actors: int = 1,
    use_gpu: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RayPrediction:
    """Score every image of ``source`` with the classifier in ``model_dir`` on an actor pool.

    ``out`` ending in ``.parquet``: one Parquet file, rows in input order, streamed by this process
    (replaced atomically: the same file ``imgflow predict`` writes). Anything else (a local folder or
    an object-store URI): a folder of Parquet files written by the workers themselves, one per block,
    rows in no particular order. ``use_gpu`` None: one GPU per actor when the cluster has GPUs.
    Needs a connected runtime (:func:`ray_runtime`)."""
    import ray.data

    spec = load_spec(model_dir)
    gpu = ray_adapter.cluster_has_gpus() if use_gpu is None else use_gpu
    ds = map_images(
        source, PredictBatch, prepare=ModelInput(spec),
        fn_constructor_kwargs={"model": share_model_files(model_dir), "top_k": top_k, "device": "cuda" if gpu else "cpu"},
        batch_size=batch_size, actors=actors, gpus_per_actor=1.0 if gpu else 0.0,
    )  # fmt: skip
    if str(out).lower().endswith(".parquet"):
        done, failed = _write_one_file(ds, Path(out), on_batch=on_batch)
    else:
        ds.drop_columns(["index"]).write_parquet(str(out), mode=ray.data.SaveMode.OVERWRITE)
        done, failed = len(source), _count_failed(str(out))
    return RayPrediction(
        images=done, failed=failed, out=str(out), classes=tuple(spec.classes), actors=actors, gpu=gpu
    )


def _write_one_file(ds: Any, out: Path, *, on_batch: Callable[[int], None] | None) -> tuple[int, int]:
    """Stream the job's rows, in input order, into one Parquet file (a row group per block). Its
    schema is the first block's without ``index``: the columns ``prediction_table`` gave this model
    (with its OOD and prediction-set columns when it ships them)."""
    import pyarrow.parquet as pq

    done = failed = 0
    writer: Any = None
    with _ordered(), atomic_path(out) as tmp:
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                table = table.drop_columns(["index"])
                writer = writer or pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table.cast(writer.schema))
                done += table.num_rows
                failed += table.num_rows - table["error"].null_count
                if on_batch:
                    on_batch(table.num_rows)
        finally:
            if writer is not None:
                writer.close()
    return done, failed


def _count_failed(folder: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    errors = pads.dataset(folder, format="parquet").to_table(columns=["error"])["error"]
    return int(pc.sum(pc.is_valid(errors)).as_py() or 0)


# --------------------------------------------------------------------------- image features


class TransformInput:
    """An image transform (PIL image in ``mode`` -> (C, H, W) tensor, e.g. CLIP's preprocess) as an
    :class:`ImagePrep`; ``shape`` is measured once on a blank image."""

    def __init__(self, transform: Callable[[Any], Any], *, mode: str = "RGB") -> None:
        from PIL import Image

        self.transform, self.mode = transform, mode
        self.shape = tuple(int(v) for v in transform(Image.new(mode, (8, 8))).shape)

    def __call__(self, data: bytes) -> np.ndarray:
        return np.asarray(self.transform(decode_image(data, mode=self.mode)), np.float32)


class EncodeImages:
    """A Ray Data actor holding an image encoder (a torch module with ``encode_image``, e.g. an
    open_clip model): prepared pixels -> {index, features (B, D) float32, error}. ``model``: a
    one-item list holding the module's object-store reference."""

    def __init__(self, model: list[Any], *, device: str = "cpu") -> None:
        import ray

        self.device = device
        self.model = ray.get(model[0]).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.require(batch["pixels"], np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        with torch.inference_mode():
            features = self.model.encode_image(x.to(self.device)).float().cpu().numpy()
        return {"index": batch["index"], "features": features, "error": batch["error"]}


def encode_images(
    paths: list[Path], model: Any, transform: Callable[[Any], Any], *, batch_size: int = 64, actors: int = 1
) -> np.ndarray:
    """Features (N, D) of ``paths`` in order from ``model.encode_image`` on a Ray Data actor pool (one
    GPU per actor when the cluster has GPUs); a DataError naming the first image that failed. Needs a
    connected runtime (:func:`ray_runtime`)."""
    import ray

    gpu = ray_adapter.cluster_has_gpus()
    features, errors = map_images_to_array(
        ImageSource.local(paths), EncodeImages, column="features", prepare=TransformInput(transform),
        fn_constructor_kwargs={"model": [ray.put(model)], "device": "cuda" if gpu else "cpu"},
        batch_size=batch_size, actors=actors, gpus_per_actor=1.0 if gpu else 0.0,
    )  # fmt: skip
    failed = [(p, e) for p, e in zip(paths, errors, strict=True) if e]
    if failed:
        raise DataError(f"{len(failed)} images could not be encoded, e.g. {failed[0][0]}: {failed[0][1]}")
    return features
