"""The commands around registered models, after the pipeline: list them, move aliases (promote,
rollback) and read the promotion log, serve one over HTTP, predict a folder in batch, export to ONNX.

Glue like :mod:`components.pipeline.stages`: the registry, serving and export packages do the work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.config import Params
from components.core.errors import ConfigError, DataError
from components.core.jsonio import write_json
from components.data.manifest import read_manifest
from components.pipeline.context import StagePaths, connect_tracking, registry_options, registry_retry
from components.pipeline.records import AliasMove, ExportResult, PredictionResult

if TYPE_CHECKING:
    from components.train.ray_adapter import RayOptions

# --------------------------------------------------------------------------- registry


def list_models(params: Params) -> list[dict[str, Any]]:
    """Every registered version of ``register.model_name``, newest first (aliases, tags, test metrics)."""
    from components.registry import tracking

    connect_tracking(params)
    return list(tracking.list_versions(params.register_.model_name))


def run_promote(
    params: Params, version: str, *, to: str = "champion", force: bool = False, reason: str | None = None
) -> AliasMove:
    """``imgflow promote``: point ``to`` at ``version`` (gates must have passed unless forced)."""
    from components.registry import registry

    connect_tracking(params)
    entry = registry.promote(params.register_.model_name, version, to=to, force=force, reason=reason,
                             **registry_options(params))  # fmt: skip
    return AliasMove.from_entry(entry)


def run_rollback(params: Params, *, reason: str | None = None) -> AliasMove:
    """``imgflow rollback``: the previous champion becomes champion again."""
    from components.registry import registry

    connect_tracking(params)
    entry = registry.rollback(params.register_.model_name, reason=reason, **registry_options(params))
    return AliasMove.from_entry(entry)


def promotion_history(params: Params) -> list[dict[str, Any]]:
    """The append-only promotion log, oldest first."""
    from components.registry import registry

    connect_tracking(params)
    return list(registry.read_log(params.register_.model_name, retry=registry_retry(params)))


# --------------------------------------------------------------------------- serving, batch prediction


def resolve_model_uri(params: Params, model: str | None) -> str:
    """``--model`` if given (a registry URI or a local model folder), else the champion."""
    return model or params.serve.model or f"models:/{params.register_.model_name}@champion"


def model_dir(params: Params, model: str | None, tmp: Path) -> tuple[Path, str]:
    """The folder of ``model`` (a local folder holding model.json as is, else the registry/run URI
    downloaded into ``tmp``) and its URI."""
    from components.model.checkpoint import SPEC_FILE
    from components.registry import tracking

    uri = resolve_model_uri(params, model)
    if (Path(uri) / SPEC_FILE).exists():
        return Path(uri), uri
    connect_tracking(params)
    return tracking.download_model_dir(uri, tmp / "served"), uri


def load_predictor(params: Params, model: str | None, tmp: Path, **kwargs: Any) -> tuple[Any, str]:
    """A Predictor for ``model`` (registry/run URI, or a folder holding model.json) and its URI."""
    from components.model.checkpoint import Predictor

    path, uri = model_dir(params, model, tmp)
    return Predictor.from_dir(path, **kwargs), uri


def run_serve(
    params: Params,
    *,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
) -> None:
    """``imgflow serve``: the HTTP scoring server (blocks until interrupted). ``token``: required as
    ``Authorization: Bearer`` on POST (the entry point resolves it: serve.token or the environment)."""
    import tempfile

    from components.serve import serving

    cfg = params.serve
    with tempfile.TemporaryDirectory(prefix="imgflow-serve-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        limits = serving.ServeLimits.from_config(cfg)
        app = serving.create_app(predictor, model_uri=uri, limits=limits, token=token)
        serving.serve(app, host=host or cfg.host, port=port or cfg.port, requires_token=bool(token))


def run_serve_ray(
    params: Params,
    *,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    replicas: int | None = None,
    autoscale: str | None = None,
    token: str | None = None,
    ray_options: RayOptions | None = None,
) -> None:
    """``imgflow serve --ray``: the same HTTP protocol from a Ray Serve deployment of ``replicas``
    (default 1) or ``autoscale`` ("MIN,MAX") replicas; blocks until interrupted, then shuts Serve
    (and the Ray runtime it started) down."""
    import tempfile

    from components.core.errors import ConfigError
    from components.model.checkpoint import Predictor
    from components.serve import ray_serve, serving
    from components.train.ray_adapter import RayOptions

    if replicas is not None and autoscale is not None:
        raise ConfigError("--replicas and --autoscale exclude each other: a fixed count or MIN,MAX")
    scaling = ray_serve.Scaling(
        replicas=replicas or 1, autoscale=ray_serve.parse_autoscale(autoscale) if autoscale else None
    )
    cfg, options = params.serve, ray_options or RayOptions()
    limits = serving.ServeLimits.from_config(cfg)
    settings = ray_serve.ServeSettings(
        host=host or cfg.host, port=port or cfg.port, limits=limits, token=token
    )
    with tempfile.TemporaryDirectory(prefix="imgflow-serve-") as tmp:
        path, uri = model_dir(params, model, Path(tmp))
        Predictor.from_dir(path)  # a model that cannot load fails here, before Ray starts
        try:
            running = ray_serve.start(path, model_uri=uri, settings=settings, scaling=scaling,
                                      ray_address=options.address, verbose=options.verbose,
                                      interruptible=True)  # fmt: skip
        except KeyboardInterrupt:
            return  # stopped while the replicas started: start() shut down what it had started
    ray_serve.serve_until_interrupted(running)


def run_predict(
    params: Params,
    source: Path | str,
    *,
    out: Path,
    model: str | None = None,
    progress: bool = True,
    ray: bool | None = None,
    actors: int | None = None,
    ray_options: RayOptions | None = None,
) -> PredictionResult:
    """``imgflow predict``: batch inference over a folder, CSV or object-store URI into Parquet.

    ``ray`` True: on Ray Data (:mod:`components.serve.ray_batch`, ``actors`` model actors, default
    ``ray.actors``) on the cluster ``ray_options`` names or a local runtime; None: so when a cluster
    is named, the source is a URI or it holds at least ``ray.min_images`` images; False: in this
    process, streaming."""
    import tempfile

    from tqdm import tqdm

    from components.serve.predict import predict_to_parquet
    from components.serve.ray_batch import list_images

    cfg = params.predict
    images = list_images(source)
    if ray is None:
        cluster = bool(ray_options and ray_options.address)
        ray = cluster or images.filesystem is not None or len(images) >= params.ray.min_images
    if ray:
        return _predict_on_ray(params, images, out=out, model=model, progress=progress, actors=actors,
                               ray_options=ray_options)  # fmt: skip
    if images.filesystem is not None:
        raise ConfigError(f"{source} is in object storage: predict it with --ray (Ray Data reads URIs)")
    paths = [Path(p) for p in images.paths]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgflow-predict-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        with tqdm(total=len(paths), unit="img", disable=not progress, desc="predict") as bar:
            result = predict_to_parquet(predictor, paths, out, batch_size=cfg.batch_size, workers=cfg.workers,
                                        top_k=cfg.top_k, on_batch=bar.update)  # fmt: skip
    return PredictionResult(
        images=int(result["images"]), failed=int(result["failed"]), out=Path(result["out"]),
        classes=tuple(result["classes"]), model=uri, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _predict_on_ray(
    params: Params,
    images: Any,
    *,
    out: Path,
    model: str | None,
    progress: bool,
    actors: int | None,
    ray_options: RayOptions | None,
) -> PredictionResult:
    """``imgflow predict --ray``: ``images`` (a ``ray_batch.ImageSource``) scored on an actor pool."""
    import tempfile

    from tqdm import tqdm

    from components.serve import ray_batch

    cfg = params.predict
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgflow-predict-") as tmp:
        folder, uri = model_dir(params, model, Path(tmp))
        with (
            ray_batch.ray_runtime(ray_options),
            tqdm(total=len(images), unit="img", disable=not progress, desc="predict (ray)") as bar,
        ):
            result = ray_batch.predict_with_ray(
                folder, images, out, batch_size=cfg.batch_size, top_k=cfg.top_k,
                actors=actors or params.ray.actors, on_batch=bar.update,
            )  # fmt: skip
    return PredictionResult(
        images=result.images, failed=result.failed, out=Path(result.out), classes=result.classes,
        model=uri, seconds=time.perf_counter() - t0,
    )  # fmt: skip


# --------------------------------------------------------------------------- export


def _parity_images(params: Params, images: Path | None, limit: int = 256) -> list[bytes]:
    """Real images for the export parity check: ``images`` (folder/CSV), else the test split."""
    from components.serve.predict import list_inputs

    if images is not None:
        return [p.read_bytes() for p in list_inputs(images)[:limit]]
    manifest_path = StagePaths(params).data.manifest
    if not manifest_path.exists():
        raise DataError("no images for the parity check: pass --images <folder|csv> or run `imgflow ingest`")
    test = read_manifest(manifest_path).query("split == 'test'").head(limit)
    return [(params.project.data_dir / p).read_bytes() for p in test["path"]]


def run_export(
    params: Params,
    *,
    model: str | None = None,
    out: Path | None = None,
    images: Path | None = None,
    quantize: str | None = None,
) -> ExportResult:
    """``imgflow export --format onnx``: ONNX file + parity check; attached to the registered version.

    ``quantize="int8"``: also the int8 file (:mod:`components.model.quantize`), calibrated on val and
    checked against the fp32 file on the test split; both are attached only when the int8 accuracy drop
    is within ``gates.max_int8_accuracy_drop`` (else GatesFailedError, exit 3, registry unchanged)."""
    import tempfile

    from components.model.export import check_parity, export_onnx
    from components.registry import tracking

    if quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantization {quantize!r}: only 'int8' is supported")
    out = out or params.project.output_dir / "export" / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="imgflow-export-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        export_onnx(predictor, out)
        parity = check_parity(predictor, out, _parity_images(params, images))
        result = ExportResult(model=uri, onnx=out, parity=parity)
        report = write_json(out.with_suffix(".parity.json"), result, sort_keys=True)
        if not parity.passed:
            raise DataError(
                f"ONNX parity check failed: max abs probability difference {parity.max_abs_diff:.2e} > "
                f"{parity.tolerance:.0e} on {parity.images} images; the file was not attached ({out})"
            )
        int8 = _export_int8(params, predictor, out) if quantize == "int8" else None
    connect_tracking(params)
    version = tracking.resolve_model_version(uri)
    if version is None:
        return ExportResult(model=uri, onnx=out, parity=parity, int8=int8)
    name, number, run_id = version
    files, tags = [out, report], {"onnx_model": f"runs:/{run_id}/onnx/{out.name}",
                                  "onnx_parity_max_abs_diff": f"{parity.max_abs_diff:.3e}"}  # fmt: skip
    if int8 is not None:
        int8_file = Path(int8["onnx"])
        files += [int8_file, int8_file.with_suffix(".accuracy.json")]
        int8 = {**int8, "artifact": f"runs:/{run_id}/onnx/{int8_file.name}"}
        tags |= {"onnx_int8_model": int8["artifact"],
                 "onnx_int8_accuracy_drop": f"{int8['accuracy']['drop']:.4f}"}  # fmt: skip
    tracking.attach_to_version(name, number, run_id, files, artifact_path="onnx", tags=tags)
    attached = {"name": name, "version": number, "artifact": f"runs:/{run_id}/onnx/{out.name}"}
    return ExportResult(model=uri, onnx=out, parity=parity, attached_to=attached, int8=int8)


def _export_int8(params: Params, predictor: Any, fp32: Path) -> dict[str, Any]:
    """``<fp32 stem>.int8.onnx`` next to the fp32 file, calibrated on val images and measured against it
    on the test split (``<stem>.int8.accuracy.json``); raises GatesFailedError past the allowed drop."""
    from components.core.errors import GatesFailedError
    from components.evaluate.variants import labelled_split, predictor_preprocess
    from components.model.quantize import accuracy_delta, quantize_int8

    spec, data_dir, seed = predictor.spec, params.project.data_dir, params.project.seed
    if spec.task.several_labels:
        raise ConfigError("int8 export measures single-label accuracy; this model is multi-label")
    prep = predictor_preprocess(predictor)
    calibration, _ = labelled_split(
        data_dir, "val", spec.classes, task=spec.task, limit=INT8_CALIBRATION, seed=seed
    )
    test, targets = labelled_split(data_dir, "test", spec.classes, task=spec.task)
    quantized = quantize_int8(fp32, fp32.with_suffix(".int8.onnx"), prep(calibration))
    delta = accuracy_delta(
        fp32, quantized.path, prep(test), targets, max_drop=params.gates.max_int8_accuracy_drop
    )
    record = {"onnx": str(quantized.path), "quantized": quantized.to_dict(), "accuracy": delta.to_dict()}
    write_json(quantized.path.with_suffix(".accuracy.json"), record, sort_keys=True)
    if not delta.passed:
        raise GatesFailedError(
            f"int8 ONNX is {delta.drop:.2%} less accurate than fp32 ONNX on {delta.images} test images "
            f"({delta.int8_accuracy:.4f} vs {delta.fp32_accuracy:.4f}; gates.max_int8_accuracy_drop = "
            f"{delta.max_drop}): nothing was attached to the registry ({quantized.path})"
        )
    return record


INT8_CALIBRATION = 512
"""Val images that calibrate the int8 activation ranges (a seeded sample: ORT's docs use a few hundred)."""


# --------------------------------------------------------------------------- deployment variants


def run_variants(
    params: Params,
    *,
    model: str | None = None,
    max_images: int | None = None,
    repeats: int = 30,
    threads: int | None = None,
    extra: Sequence[Any] = (),
    compare: Sequence[str] = (),
) -> dict[str, Any]:
    """``imgflow variants``: fp32, fp32 ONNX, int8 ONNX and flip-TTA of ``model`` (default: the champion),
    plus a PyTorch row for each ``compare`` model (registry/run URI or folder: a distilled student, an
    ensemble; it must have the same classes) and ``extra`` rows
    (:class:`components.evaluate.variants.Variant`), measured in one run
    (:func:`components.evaluate.variants.measure_variants`). Writes ``outputs/variants/variants.json``
    and the "Deployment variants" section of the gate report when ``outputs/evaluate/report.json``
    exists. Returns the table as a dict."""
    import tempfile

    import torch

    from components.evaluate import variants as v
    from components.evaluate.gate_report import add_variants_section
    from components.model.checkpoint import Predictor

    threads = threads or torch.get_num_threads()
    seed = params.project.seed
    with tempfile.TemporaryDirectory(prefix="imgflow-variants-") as tmp:
        path, uri = model_dir(params, model, Path(tmp))
        predictor = Predictor.from_dir(path)
        spec, data_dir = predictor.spec, params.project.data_dir
        if spec.task.several_labels:
            raise ConfigError("imgflow variants compares single-label models; this one is multi-label")
        calibration, _ = v.labelled_split(data_dir, "val", spec.classes, task=spec.task,
                                          limit=INT8_CALIBRATION, seed=seed)  # fmt: skip
        images, targets = v.labelled_split(data_dir, "test", spec.classes, task=spec.task, limit=max_images,
                                           seed=seed)  # fmt: skip
        ood = _ood_reference(params, predictor)
        data = v.VariantData(images, targets, ood, params.ood.reference if ood else "")
        with v.torch_threads(threads):
            rows, _ = v.standard_variants(predictor, path, Path(tmp), calibration=calibration,
                                          threads=threads)  # fmt: skip
            others = [_compared_variant(params, other, spec.classes, Path(tmp) / f"compare-{i}")
                      for i, other in enumerate(compare)]  # fmt: skip
            latency = v.LatencyConfig(repeats=repeats)
            table = v.measure_variants([*rows, *others, *extra], data, latency=latency, model=uri)
    result = table.to_dict()
    out_dir = StagePaths(params).out("variants")
    result["files"] = {"json": str(out_dir / "variants.json")}
    report = add_variants_section(StagePaths(params).out("evaluate"), result)
    if report is not None:
        result["files"]["gate_report"] = str(report)
    write_json(out_dir / "variants.json", result, sort_keys=True)
    return result


def _compared_variant(params: Params, model: str, classes: Sequence[str], tmp: Path) -> Any:
    """A PyTorch row for another model in the variants table, named by its URI or folder; its size is its
    folder's, as for the fp32 row. A model with other classes cannot be scored on these labels: ConfigError."""
    from components.evaluate.variants import folder_bytes, predictor_variant
    from components.model.checkpoint import Predictor

    tmp.mkdir(parents=True, exist_ok=True)
    path, uri = model_dir(params, model, tmp)
    predictor = Predictor.from_dir(path)
    if tuple(predictor.spec.classes) != tuple(classes):
        raise ConfigError(
            f"imgflow variants --compare {model}: its classes {list(predictor.spec.classes)} differ from the "
            f"compared model's {list(classes)}"
        )
    return predictor_variant(uri, predictor, size_bytes=folder_bytes(path), note="--compare")


def _ood_reference(params: Params, predictor: Any) -> list[bytes]:
    """The OOD reference images for the OOD AUROC column: only for a model that ships a detector."""
    from components.evaluate.variants import ood_reference_images

    if predictor.ood is None or params.ood.reference == "none":
        return []
    return ood_reference_images(min(params.ood.max_images, 1000), seed=params.ood.seed)
