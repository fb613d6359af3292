"""``imgflow pretrain`` and ``train.init: ssl:<run>``: the glue between self-supervised pretraining
(:mod:`components.train.ssl`), the data, and MLflow (:mod:`components.registry.tracking`).

A pretraining run is an MLflow run tagged ``imgflow.kind=ssl-pretrain`` with its params (``ssl.*``, the
resolved recipe), the loss curve (``ssl_loss`` per epoch), the data hash and the backbone under the
artifact path ``ssl_backbone``; supervised training resolves ``ssl:<run id>`` back to that folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.core.config import Params
from components.core.errors import ConfigError
from components.core.jsonio import write_json
from components.pipeline.context import StagePaths, connect_tracking, experiment_id
from components.train.ray_adapter import RayOptions

if TYPE_CHECKING:
    from components.evaluate.label_efficiency import Split

logger = logging.getLogger(__name__)

SSL_KIND = "ssl-pretrain"
ARTIFACT_PATH = "ssl_backbone"


@dataclass(frozen=True)
class PretrainRecord:
    """What ``imgflow pretrain`` reports: the MLflow run, the backbone folder, the loss curve."""

    run_id: str
    tracking_uri: str
    backbone_dir: Path
    method: str
    model: str
    data_hash: str
    images: int
    epochs: int
    final_loss: float
    seconds: float
    losses: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "backbone_dir": str(self.backbone_dir)}


def _resolved_train(params: Params, source: Path) -> tuple[Any, int]:
    """``train.*`` as supervised training of the project's data resolves it (model, channels, input
    size: the backbone must fit the classifier ``train.init`` builds), and the channels."""
    from components.train.auto_recipe import resolve_for_data
    from components.train.recipe import resolve_in_chans
    from components.train.ssl_data import folder_in_chans, source_paths

    data = StagePaths(params).data
    if data.manifest.is_file():
        cfg = resolve_for_data(params.train, data).config
        return cfg, resolve_in_chans(cfg, data)
    return params.train, params.train.in_chans or folder_in_chans(source_paths(source))


def run_pretrain(
    params: Params,
    *,
    data: Path | None = None,
    epochs: int | None = None,
    progress: bool = True,
    ray_options: RayOptions | None = None,
) -> PretrainRecord:
    """Pretrain ``train.model``'s backbone with ``ssl.method`` on ``data`` (default: the project's data
    version, train split; labels ignored) and log it to MLflow."""
    from components.registry import tracking
    from components.train.ssl import METHODS, pretrain
    from components.train.ssl_data import build_ssl_recipe, decode_images, model_data_config, source_paths

    if params.ssl.method not in METHODS:  # the CLI's --method bypasses the params schema
        raise ConfigError(
            f"unknown pretraining method {params.ssl.method!r}: use one of {', '.join(METHODS)}"
        )
    paths = StagePaths(params)
    source = (data or paths.data.root).resolve()
    train_cfg, in_chans = _resolved_train(params, source)
    data_config = model_data_config(train_cfg.model, in_chans, train_cfg.input_size)
    images_file = decode_images(
        source_paths(source), in_chans=in_chans, side=int(data_config["input_size"][-1]),
        cache_dir=paths.decoded_cache, max_images=params.ssl.max_images,
    )  # fmt: skip
    recipe = build_ssl_recipe(
        params.ssl, train_cfg, images_file=images_file, in_chans=in_chans, data_config=data_config,
        seed=params.project.seed, epochs=epochs,
    )  # fmt: skip
    out = paths.out("pretrain")
    out.mkdir(parents=True, exist_ok=True)
    uri = connect_tracking(params)
    # unique: a Ray Train run of the same name would resume from that run's checkpoint
    name = (
        f"pretrain-{recipe.method}-{recipe.data_hash}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    tags = {"imgflow.kind": SSL_KIND, "data_hash": recipe.data_hash, "model": recipe.model,
            "ssl_method": recipe.method, "data_source": str(source)}  # fmt: skip
    run = tracking.start_run(
        experiment_id(params), run_name=name, params={"ssl": params.ssl.model_dump(mode="json"),
        "recipe": recipe.to_dict()}, tags=tags, tracking_uri=uri,
    )  # fmt: skip
    try:
        result = pretrain(
            recipe, out_dir=out, workers=params.train.workers, cpus_per_worker=params.train.cpus_per_worker,
            use_gpu={"auto": None, "true": True, "false": False}[params.train.use_gpu],
            storage_path=params.train.storage_path or paths.state / "ray_results", run_name=name,
            max_failures=params.train.max_failures, show_progress=progress, ray_options=ray_options,
        )  # fmt: skip
    except BaseException:
        tracking.end_run(run.run_id, status="FAILED")
        raise
    tracking.log_history(run.run_id, result.history)
    tracking.log_metrics(run.run_id, {"pretrain_seconds": result.seconds})
    tracking.log_artifacts(run.run_id, [result.backbone_dir], artifact_path=ARTIFACT_PATH)
    tracking.end_run(run.run_id)
    losses = [float(h["ssl_loss"]) for h in result.history]
    record = PretrainRecord(
        run_id=run.run_id, tracking_uri=uri, backbone_dir=result.backbone_dir, method=recipe.method,
        model=recipe.model, data_hash=recipe.data_hash, images=int(np.load(images_file, mmap_mode="r").shape[0]),
        epochs=len(losses), final_loss=losses[-1], seconds=result.seconds, losses=losses,
    )  # fmt: skip
    write_json(out / "pretrain.json", record.to_dict(), sort_keys=True)
    return record


def resolve_init(params: Params) -> Path | None:
    """``train.init``: None, or the local backbone folder of ``ssl:<run id>`` (downloaded from MLflow
    into ``<state_dir>/ssl/<run id>``). A run that is not an ``imgflow pretrain`` run, or a backbone of
    another model or channel count, is a ConfigError (exit 2) before Ray starts."""
    from components.registry import tracking
    from components.train.ssl import read_backbone_spec

    if params.train.init == "none":
        return None
    run_id = params.train.init.removeprefix("ssl:")
    ensemble = params.train.ensemble
    if ensemble is not None and ensemble.snapshots is None:
        raise ConfigError(
            "train.init starts one model from a backbone: combine it with train.ensemble snapshots only"
        )
    connect_tracking(params)
    dst = StagePaths(params).state / "ssl" / run_id
    local, tags = tracking.download_run_artifacts(run_id, ARTIFACT_PATH, dst)
    if tags.get("imgflow.kind") != SSL_KIND:
        raise ConfigError(
            f"train.init={params.train.init}: MLflow run {run_id} is not an `imgflow pretrain` run"
        )
    spec = read_backbone_spec(local)
    return _check_fits(params, spec, local)


def _check_fits(params: Params, spec: dict[str, Any], folder: Path) -> Path:
    from components.train.auto_recipe import resolve_for_data
    from components.train.recipe import resolve_in_chans

    data = StagePaths(params).data
    cfg = resolve_for_data(params.train, data).config
    in_chans = resolve_in_chans(cfg, data)
    if spec["model"] != cfg.model or int(spec["in_chans"]) != in_chans:
        raise ConfigError(
            f"train.init={params.train.init}: the backbone is {spec['model']} with {spec['in_chans']} channel(s), "
            f"this training builds {cfg.model} with {in_chans} (architecture mismatch): "
            f"set train.model={spec['model']} or pretrain this model"
        )
    return folder


# --------------------------------------------------------------------------- the label-efficiency report


@dataclass(frozen=True)
class LabelEfficiencyRecord:
    """``imgflow label-efficiency``: the report, where it was written, its MLflow run."""

    report: dict[str, Any]
    json_path: Path
    markdown_path: Path
    run_id: str
    gate_report: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.report,
            "json_path": str(self.json_path),
            "markdown_path": str(self.markdown_path),
            "run_id": self.run_id,
            "gate_report": str(self.gate_report) if self.gate_report else None,
        }


def backbone_for_report(params: Params, ssl_run: str | None) -> tuple[Path, str]:
    """The backbone folder and its run id: ``ssl_run`` (``ssl:<id>`` or ``<id>``, from MLflow), else
    the last ``imgflow pretrain`` of this project (``<output_dir>/pretrain``)."""
    from components.registry import tracking

    if ssl_run:
        run_id = ssl_run.removeprefix("ssl:")
        connect_tracking(params)
        local, tags = tracking.download_run_artifacts(
            run_id, ARTIFACT_PATH, StagePaths(params).state / "ssl" / run_id
        )
        if tags.get("imgflow.kind") != SSL_KIND:
            raise ConfigError(f"MLflow run {run_id} is not an `imgflow pretrain` run")
        return local, run_id
    record = StagePaths(params).out("pretrain") / "pretrain.json"
    if not record.is_file():
        raise ConfigError("no pretrained backbone: run `imgflow pretrain` first, or pass --ssl-run <run id>")
    from components.core.jsonio import read_json

    raw = read_json(record, hint="run `imgflow pretrain` again")
    return Path(raw["backbone_dir"]), str(raw["run_id"])


@dataclass(frozen=True)
class ReportInputs:
    """What the label-efficiency report and ``bench ssl_finetune`` fit on: the backbone's spec, imgflow's
    supervised recipe for its model and channels, the model's data config, and the decoded train and test
    splits."""

    spec: dict[str, Any]
    recipe: Any
    data_config: dict[str, Any]
    train: Split
    test: Split


def report_inputs(params: Params, folder: Path) -> ReportInputs:
    """:class:`ReportInputs` for the backbone in ``folder`` on the project's data version."""
    from components.train.recipe import build_recipe
    from components.train.ssl import read_backbone_spec
    from components.train.ssl_data import model_data_config

    paths = StagePaths(params)
    spec = read_backbone_spec(folder)
    cfg = params.train.model_copy(update={"model": spec["model"], "in_chans": int(spec["in_chans"])})
    recipe = build_recipe(cfg, paths.data, seed=params.project.seed, weights_dir=paths.state / "weights")
    dc = model_data_config(spec["model"], int(spec["in_chans"]), cfg.input_size)
    split = {s: report_split(params, dc, s) for s in ("train", "test")}
    return ReportInputs(spec=spec, recipe=recipe, data_config=dc, train=split["train"], test=split["test"])


def report_split(params: Params, data_config: dict[str, Any], split: str) -> Split:
    """One split of the data version decoded as the label-efficiency report reads it (the backbone's
    channels and side, the decoded cache)."""
    from components.data.manifest import DatasetInfo
    from components.evaluate import label_efficiency as le

    paths = StagePaths(params)
    classes = DatasetInfo.load(paths.data.dataset).classes
    return le.load_split(paths.data.manifest, paths.data.root, split, classes,
                         in_chans=int(data_config["input_size"][0]), side=int(data_config["input_size"][-1]),
                         cache_dir=paths.decoded_cache)  # fmt: skip


def _classifier_note(settings: Any) -> str:
    """How the probes' classifier and C are chosen, in words, for the report's notes."""
    c = f"C fixed at {settings.probe_C:g}" if settings.probe_C is not None else "its C"
    if settings.probe_classifier == "auto":
        return (
            f"a linear classifier (logistic regression on standardised features, shrinkage LDA, or the two's "
            f"probabilities averaged; {c}) chosen"
        )
    return f"{settings.probe_classifier} ({c} for a logistic part) chosen"


def run_label_efficiency(
    params: Params, *, ssl_run: str | None = None, settings: Any = None
) -> LabelEfficiencyRecord:
    """The label-efficiency report of a pretrained backbone on the project's data version (train labels
    subsampled, test split scored), written to ``<output_dir>/label_efficiency``, logged to MLflow and
    added to the gate report when ``imgflow evaluate`` has written one."""
    from safetensors.torch import load_file

    from components.data.manifest import data_version, require_manifest
    from components.evaluate import label_efficiency as le
    from components.evaluate.gate_report import add_report_data
    from components.model.models import create_classifier
    from components.registry import tracking
    from components.train.engine import seed_everything
    from components.train.ssl import BACKBONE_WEIGHTS

    paths = StagePaths(params)
    require_manifest(paths.data)
    folder, run_id = backbone_for_report(params, ssl_run)
    inputs = report_inputs(params, folder)
    spec, recipe, dc, train, test = inputs.spec, inputs.recipe, inputs.data_config, inputs.train, inputs.test
    ssl_net = create_classifier(spec["model"], 0, in_chans=int(spec["in_chans"]))
    ssl_net.load_state_dict(load_file(str(folder / BACKBONE_WEIGHTS)))
    seed_everything(params.project.seed)
    random_net = create_classifier(spec["model"], 0, in_chans=int(spec["in_chans"]))
    settings = settings or le.EvalSettings(seed=params.project.seed)
    if settings.mirror is None:
        settings = dataclasses.replace(settings, mirror=recipe.hflip > 0)
    if settings.finetune_probe_share is None:
        settings = dataclasses.replace(settings, finetune_probe_share=le.train_init_probe_share(recipe))
    share = float(settings.finetune_probe_share or 0.0)
    notes = [
        f"scratch: imgflow's supervised recipe ({spec['model']}, its augmentation, loss, optimiser and schedule) "
        f"trained in one process for about {settings.scratch_steps} steps (1..{settings.scratch_max_epochs} epochs)",
        f"probes: {_classifier_note(settings)}, by {settings.probe_cv_folds}-fold CV inside "
        f"the labelled subset; SSL and random-init features: "
        + (
            f"the last two or three conv stages, as the same CV chooses ({' or '.join(le.AUTO_LAYERS)}), "
            if settings.probe_layers == "auto"
            else f"{settings.probe_layers} conv stage(s), "
        )
        + f"each average-pooled to {settings.grid}x{settings.grid}"
        + (", of each image and its mirror image (concatenated)" if settings.mirror else ""),
        *(
            [
                "scratch and ssl_finetune predict with flip TTA (the mean logits of each test image and its mirror), "
                "as the probes see both"
            ]
            if settings.mirror
            else []
        ),
        "ssl_finetune: the scratch recipe and steps started from the SSL backbone as train.init does ("
        + (f"LP-FT: the head alone for {share:.0%} of the epochs, then " if share else "")
        + f"the whole network, the backbone at {recipe.init_backbone_lr_scale:g} x lr)",
        "at 100% the three subsets are one set: fitted once",
    ]
    report = le.label_efficiency(
        train, test, ssl_backbone=ssl_net, random_backbone=random_net, mean=dc["mean"], std=dc["std"],
        train_scratch=le.recipe_scratch_trainer(recipe, mirror=settings.mirror), backbone_spec={**spec, "run_id": run_id},
        train_finetune=le.recipe_scratch_trainer(recipe, init_dir=folder, probe_share=share,
                                                 mirror=settings.mirror),
        settings=settings, notes=notes,
    )  # fmt: skip
    out = paths.out("label_efficiency")
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "label_efficiency.json", report.to_dict())
    md_path = le.write_markdown(report, out / "label_efficiency.md")
    uri = connect_tracking(params)
    run = tracking.log_result_run(
        experiment_id(params), run_name=f"label-efficiency-{run_id[:8]}",
        params={"eval": settings.to_dict(), "ssl_run": run_id, "model": spec["model"]},
        tags={"imgflow.kind": "label-efficiency", "ssl_run": run_id, "data_hash": spec["data_hash"],
              "data_version": data_version(paths.data.manifest)},
        tracking_uri=uri, metrics=report.metrics(), artifacts=[json_path, md_path], artifact_path="label_efficiency",
    )  # fmt: skip
    gate = add_report_data(paths.out("evaluate"), "label_efficiency", report.to_dict())
    return LabelEfficiencyRecord(report.to_dict(), json_path, md_path, run.run_id, gate)
