"""Deployment variants side by side: accuracy, calibration, OOD detection, size and CPU latency, one run.

A *variant* is one way to ship the same classifier: fp32 PyTorch, fp32 ONNX Runtime, int8 ONNX Runtime
(:mod:`components.model.quantize`), flip test-time augmentation, and any other model that predicts
the same classes (a distilled student, an ensemble). Each is a :class:`Variant`: a name, a file size, a
``preprocess`` (raw image bytes -> (N, C, H, W) float32, the variant's own preprocessing) and a
``predict_proba`` ((N, C, H, W) float32 -> (N, K) probabilities), plus an optional ``ood_score``
((N, C, H, W) -> (N,), higher: less like the training data). Anything with those callables can be
added as a row; :func:`predictor_variant` makes one from any :class:`~components.model.checkpoint.Predictor`
(a model folder loaded with ``Predictor.from_dir``, an ensemble's included)::

    rows = [*standard, predictor_variant("distilled student", Predictor.from_dir(student_dir),
                                         size_bytes=folder_bytes(student_dir))]
    table = measure_variants(rows, data)

What each column means:

- accuracy, NLL (mean negative log probability of the true class) and ECE (15 equal-width bins) on
  the labelled test images in :class:`VariantData`;
- OOD AUROC of the variant's ``ood_score``, test images vs the OOD reference images (MNIST digits for
  Fashion-MNIST, as the evaluate stage's ``ood`` section), when the model ships a detector;
- file size: what would be copied to the target machine (weights, ONNX file);
- latency: p50/p95 of ``predict_proba`` on one preprocessed image and on a batch of 64, in
  milliseconds, on this CPU with the same thread count for every runtime. Preprocessing (decode,
  resize, normalise) is the same work for every variant and is left out. The variants are timed
  round-robin (one call of each, then the next round), so a load spike on a shared machine hits every
  row alike instead of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.core import report as kit

logger = logging.getLogger(__name__)

Preprocess = Callable[[Sequence[bytes]], np.ndarray]
"""Raw image file bytes -> (N, C, H, W) float32 model input."""
PredictProba = Callable[[np.ndarray], np.ndarray]
"""(N, C, H, W) float32 -> (N, K) probabilities."""
OODScore = Callable[[np.ndarray], np.ndarray]
"""(N, C, H, W) float32 -> (N,) OOD scores (higher: less like the training data)."""

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
"""The /proc/cpuinfo flags that decide int8 speed: VNNI (int8 dot products) and AMX (int8 matrix tiles)."""


@dataclass(frozen=True)
class Variant:
    """One row of the comparison (see the module docstring for each field's contract)."""

    name: str
    runtime: str
    """What runs it: ``PyTorch`` or ``ONNX Runtime``."""
    size_bytes: int
    preprocess: Preprocess
    predict_proba: PredictProba
    ood_score: OODScore | None = None
    note: str = ""


@dataclass(frozen=True)
class VariantData:
    """What every variant is measured on: labelled test images and (optional) OOD reference images."""

    images: Sequence[bytes]
    targets: np.ndarray
    """(N,) class indices of ``images``."""
    ood_images: Sequence[bytes] = ()
    ood_reference: str = ""
    """What ``ood_images`` are (e.g. ``mnist``), for the table."""


@dataclass(frozen=True)
class LatencyConfig:
    """How long to time: ``repeats`` timed calls per batch size after ``warmup`` untimed ones."""

    repeats: int = 30
    warmup: int = 3
    batch: int = 64


@dataclass(frozen=True)
class VariantRow:
    name: str
    runtime: str
    size_bytes: int
    accuracy: float
    nll: float
    ece: float
    ood_auroc: float | None
    latency_ms: dict[str, dict[str, float]]
    """``"1"`` and ``"<batch>"`` -> ``{"p50": ms, "p95": ms}``."""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "runtime": self.runtime, "size_bytes": self.size_bytes,
                "accuracy": self.accuracy, "nll": self.nll, "ece": self.ece, "ood_auroc": self.ood_auroc,
                "latency_ms": self.latency_ms, "note": self.note}  # fmt: skip


@dataclass(frozen=True)
class VariantsTable:
    """The measured rows plus what they were measured on (images, CPU, threads)."""

    rows: tuple[VariantRow, ...]
    images: int
    ood_images: int
    ood_reference: str
    cpu: dict[str, Any]
    threads: int
    batch: int
    repeats: int
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> VariantRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "images": self.images, "ood_images": self.ood_images,
                "ood_reference": self.ood_reference, "cpu": self.cpu, "threads": self.threads,
                "batch": self.batch, "repeats": self.repeats, "rows": [r.to_dict() for r in self.rows],
                **self.extra}  # fmt: skip


# --------------------------------------------------------------------------- making variants


def predictor_variant(
    name: str, predictor: Any, *, size_bytes: int, note: str = "", preprocess: Preprocess | None = None
) -> Variant:
    """A PyTorch row from a :class:`~components.model.checkpoint.Predictor` (its own preprocessing,
    temperature and, when it ships one, OOD detector). ``preprocess``: share another row's callable
    (same data config) so the images are decoded once."""
    import torch

    preprocess = preprocess or predictor_preprocess(predictor)

    def proba(x: np.ndarray) -> np.ndarray:
        return np.asarray(predictor.score_batch(torch.from_numpy(x)).probs)

    def ood(x: np.ndarray) -> np.ndarray:
        return np.asarray(predictor.score_batch(torch.from_numpy(x)).ood_scores)

    return Variant(name, "PyTorch", size_bytes, preprocess, proba,
                   ood if predictor.scored_net is not None else None, note)  # fmt: skip


def onnx_variant(name: str, path: Path, preprocess: Preprocess, *, threads: int, note: str = "") -> Variant:
    """An ONNX Runtime row for an imgflow ONNX file (:mod:`components.model.export`: probabilities and,
    with a detector, ``ood_score``), on ``threads`` intra-op threads."""
    from components.model.export import OOD_OUTPUT, onnx_probabilities, onnx_session

    session = onnx_session(path, threads=threads)
    has_ood = OOD_OUTPUT in {o.name for o in session.get_outputs()}

    def ood(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([OOD_OUTPUT], {session.get_inputs()[0].name: x.astype(np.float32)})[0])

    return Variant(name, "ONNX Runtime", Path(path).stat().st_size, preprocess,
                   lambda x: onnx_probabilities(session, x), ood if has_ood else None, note)  # fmt: skip


def predictor_preprocess(predictor: Any) -> Preprocess:
    """The predictor's own preprocessing as a :data:`Preprocess` (what the fp32 ONNX path is fed)."""

    def preprocess(images: Sequence[bytes]) -> np.ndarray:
        return np.asarray(predictor.preprocess(list(images)).numpy(), dtype=np.float32)

    return preprocess


def plain_and_flip(predictor: Any) -> tuple[Any, Any]:
    """Two predictors over the same weights, trust files and temperature: without test-time augmentation
    and with flip-TTA (logits averaged over the image and its mirror), whatever the spec says."""
    from dataclasses import replace

    from components.model.checkpoint import FlipTTA, Predictor

    base = predictor.model.model if isinstance(predictor.model, FlipTTA) else predictor.model
    width = int(predictor.spec.data_config["input_size"][-1])
    kw = {"ood": predictor.ood, "conformal": predictor.conformal}
    return (Predictor(base, replace(predictor.spec, tta="none"), **kw),
            Predictor(FlipTTA(base, width), replace(predictor.spec, tta="hflip"), **kw))  # fmt: skip


def standard_variants(
    predictor: Any, model_dir: Path, work_dir: Path, *, calibration: Sequence[bytes], threads: int
) -> tuple[list[Variant], Any]:
    """The four rows every model gets: fp32 PyTorch, fp32 ONNX, int8 ONNX (quantized in ``work_dir`` on
    the ``calibration`` images, raw bytes of val images) and flip-TTA PyTorch; with the
    :class:`~components.model.quantize.QuantizedModel` record."""
    from components.model.export import export_onnx
    from components.model.quantize import quantize_int8

    plain, flip = plain_and_flip(predictor)
    prep = predictor_preprocess(plain)
    fp32 = export_onnx(plain, work_dir / "model.onnx")
    int8 = quantize_int8(fp32, work_dir / "model.int8.onnx", prep(calibration))
    weights = folder_bytes(model_dir)
    rows = [
        predictor_variant("fp32", plain, size_bytes=weights, preprocess=prep, note="model folder"),
        onnx_variant("fp32 ONNX", fp32, prep, threads=threads),
        onnx_variant("int8 ONNX", int8.path, prep, threads=threads,
                     note=f"QDQ, per-channel; {int8.quantized_ops}/{int8.weight_ops} weight ops int8"),
        predictor_variant("flip-TTA", flip, size_bytes=weights, preprocess=prep, note="2 passes per image"),
    ]  # fmt: skip
    return rows, int8


def labelled_split(
    data_dir: Path, split: str, classes: Sequence[str], *, task: Any, limit: int | None = None, seed: int = 0
) -> tuple[list[bytes], np.ndarray]:
    """A split's image bytes and (N,) targets from the manifest; a seeded sample of ``limit`` images."""
    from components.data.datasets import encode_targets, split_rows
    from components.data.manifest import DataPaths, read_manifest, require_manifest

    rows = split_rows(read_manifest(require_manifest(DataPaths(data_dir))), split)
    if limit is not None and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed).sort_index()
    targets = np.asarray(encode_targets(rows, classes, task))
    return [(Path(data_dir) / p).read_bytes() for p in rows["path"]], targets


def ood_reference_images(n: int, *, seed: int) -> list[bytes]:
    """``n`` real MNIST digits as PNG bytes: the evaluate stage's held-out OOD reference."""
    import io

    from PIL import Image

    from components.evaluate.ood import mnist_digits

    out = []
    for a in mnist_digits(n, seed=seed):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def folder_bytes(model_dir: Path) -> int:
    """Size of a model folder: every file in it (weights, spec, OOD/conformal files)."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- measuring


def measure_variants(
    variants: Sequence[Variant], data: VariantData, *, latency: LatencyConfig | None = None, model: str = ""
) -> VariantsTable:
    """Every variant on the same images and the same CPU, in one run (see the module docstring).

    PyTorch runs on ``torch.get_num_threads()`` threads (set it, and the ONNX rows' ``threads``, to the
    same number before calling: :func:`torch_threads`)."""
    import torch

    if not variants:
        raise ValueError("no variants to measure")
    latency = latency or LatencyConfig()
    # Rows that share one preprocess callable (the standard rows do) decode the images once.
    cache: dict[tuple[int, str], np.ndarray] = {}

    def prepared(v: Variant, which: str, images: Sequence[bytes]) -> np.ndarray:
        key = (id(v.preprocess), which)
        if key not in cache:
            cache[key] = v.preprocess(images)
        return cache[key]

    inputs = [prepared(v, "test", data.images) for v in variants]
    ood_inputs = [prepared(v, "ood", data.ood_images) if v.ood_score and data.ood_images else None
                  for v in variants]  # fmt: skip
    times = _time_round_robin(variants, inputs, latency)
    rows = []
    for v, x, ox, t in zip(variants, inputs, ood_inputs, times, strict=True):
        probs = _batched(v.predict_proba, x)
        auroc = None if ox is None else _ood_auroc(v, x, ox)
        rows.append(
            VariantRow(v.name, v.runtime, v.size_bytes, *quality(probs, data.targets), auroc, t, v.note)
        )
    return VariantsTable(rows=tuple(rows), images=len(data.images), ood_images=len(data.ood_images),
                         ood_reference=data.ood_reference, cpu=cpu_features(), threads=torch.get_num_threads(),
                         batch=latency.batch, repeats=latency.repeats, model=model)  # fmt: skip


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """PyTorch's intra-op threads set to ``threads`` inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def quality(probs: np.ndarray, targets: np.ndarray) -> tuple[float, float, float]:
    """probs: (N, K), targets: (N,) -> (accuracy, NLL, ECE)."""
    from components.evaluate.calibration import expected_calibration_error

    targets = np.asarray(targets, dtype=np.int64)
    p_true = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    accuracy = float(np.mean(probs.argmax(1) == targets))
    return accuracy, float(-np.log(p_true).mean()), expected_calibration_error(targets, probs, n_bins=15)


def _batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + size])) for i in range(0, len(x), size)])


def _ood_auroc(v: Variant, x: np.ndarray, ood_x: np.ndarray) -> float:
    from components.evaluate.ood import auroc

    assert v.ood_score is not None
    return auroc(_batched(v.ood_score, x), _batched(v.ood_score, ood_x))


def _time_round_robin(
    variants: Sequence[Variant], inputs: Sequence[np.ndarray], cfg: LatencyConfig
) -> list[dict[str, dict[str, float]]]:
    """p50/p95 milliseconds of ``predict_proba`` on 1 image and on ``cfg.batch`` images, per variant."""
    out: list[dict[str, dict[str, float]]] = [{} for _ in variants]
    for size in (1, cfg.batch):
        batches = [np.ascontiguousarray(np.resize(x, (size, *x.shape[1:]))) for x in inputs]
        samples: list[list[float]] = [[] for _ in variants]
        for r in range(cfg.warmup + cfg.repeats):
            for i, v in enumerate(variants):
                t0 = time.perf_counter()
                v.predict_proba(batches[i])
                if r >= cfg.warmup:
                    samples[i].append((time.perf_counter() - t0) * 1000)
        for i, s in enumerate(samples):
            out[i][str(size)] = {"p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95))}
    return out


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (empty when /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"model": "unknown", "flags": {}}
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown"
    )
    flags_line = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(flags_line.split())
    return {"model": model, "flags": {f: f in have for f in CPU_FLAGS}}


def cpu_summary(cpu: Mapping[str, Any]) -> str:
    """One line: model name, the int8-relevant flags it has and lacks."""
    flags = cpu.get("flags") or {}
    has = [f for f, ok in flags.items() if ok]
    lacks = [f for f, ok in flags.items() if not ok]
    return (f"{cpu.get('model', 'unknown')}; has: {', '.join(has) or 'none'}"
            + (f"; lacks: {', '.join(lacks)}" if lacks else ""))  # fmt: skip


# --------------------------------------------------------------------------- presenting

COLUMNS = ("variant", "runtime", "accuracy", "NLL", "ECE", "OOD AUROC", "size",
           "1 img p50/p95 ms", "{batch} img p50/p95 ms")  # fmt: skip


def _cells(row: Mapping[str, Any], batch: int) -> list[str]:
    lat = row["latency_ms"]
    auroc = "-" if row.get("ood_auroc") is None else f"{row['ood_auroc']:.3f}"
    return [row["name"], row["runtime"], f"{row['accuracy']:.4f}", f"{row['nll']:.4f}", f"{row['ece']:.4f}",
            auroc, _size(row["size_bytes"]), f"{lat['1']['p50']:.2f} / {lat['1']['p95']:.2f}",
            f"{lat[str(batch)]['p50']:.2f} / {lat[str(batch)]['p95']:.2f}"]  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def header_lines(table: Mapping[str, Any]) -> list[str]:
    """What the numbers were measured on: model, images, CPU flags, threads."""
    ood = (
        f"; OOD AUROC vs {table['ood_images']} {table['ood_reference']} images"
        if table.get("ood_images")
        else ""
    )
    return [
        f"model: {table.get('model') or '-'}; {table['images']} test images{ood}",
        f"CPU: {cpu_summary(table['cpu'])}; {table['threads']} threads for every runtime; "
        f"latency: {table['repeats']} timed calls per batch size, preprocessing excluded",
    ]


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text (``imgflow variants``, the bench)."""
    batch = int(table["batch"])
    head = [c.format(batch=batch) for c in COLUMNS]
    body = [_cells(r, batch) for r in table["rows"]]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = "  ".join
    rows = [line(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "\n".join([*header_lines(table), "", *rows])


def variants_section(table: Mapping[str, Any] | None) -> kit.Section | None:
    """The gate report's "Deployment variants" section (absent until ``imgflow variants`` has run)."""
    if not table:
        return None
    batch = int(table["batch"])
    head = [c.format(batch=batch) for c in COLUMNS]
    return kit.section(
        "Deployment variants",
        kit.paragraph(" ".join(header_lines(table))),
        kit.table(head, [_cells(r, batch) for r in table["rows"]]),
        kit.note("Measured by `imgflow variants` in one run on this CPU; int8 is not always faster than fp32 "
                 "(it depends on VNNI/AMX and on whether the model is large enough to be compute-bound)."),
    )  # fmt: skip
