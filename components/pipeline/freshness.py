"""Retrain only on change: is the current ``champion`` already trained on this data with these params?

A scheduled pipeline ingests first (that fixes the data version, the manifest's md5), then compares
the data version and the *training* fingerprint of the resolved params with the tags of the
registry's ``champion`` (written by the train stage). Equal: the run is "up to date" and stops there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from components.core.config import Params

IRRELEVANT_TO_TRAINING: tuple[str, ...] = (
    "project.name",
    "project.data_dir",
    "project.output_dir",
    "project.state_dir",
    "ingest.fashion_mnist_dir",  # where the files are read from; their content is the data version
    "ingest.download",
    "ingest.unlabelled",  # the pool's folder: labels imported from it change the data version instead
    "baseline.cache_dir",
    "baseline.device",
    "baseline.batch_size",
    "baseline.loader_workers",
    "train.loader_workers",
    "evaluate.batch_size",
    "register",  # names and addresses of the registry, not the model
    "notify",
    "tune",  # the sweep's own settings: `imgflow tune` writes a params file, it does not train the champion
    "distill",  # `imgflow distill` trains a student registered under its own name, not the pipeline's model
    "drift",  # how drift is measured, not what is trained
    "ssl",  # `imgflow pretrain`'s settings: train.init names the pretraining run itself
)
"""Dotted keys (or whole sections) that cannot change the trained model or its verdict: changing
them does not trigger a retrain. Everything else does (seed, ingest filters, split, validation and
audit thresholds, training, evaluation and gates)."""


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.get(key, {})
    node.pop(leaf, None)


def training_fingerprint(params: Params) -> str:
    """Short stable hash of the params that decide what is trained and how it is judged."""
    tree = params.to_dict()
    for key in IRRELEVANT_TO_TRAINING:
        _drop(tree, key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Freshness:
    """The verdict of the retrain check, with what was compared (for the artifact and the logs)."""

    retrain: bool
    reason: str
    data_version: str
    training_params_hash: str
    champion_version: str | None = None
    champion_run_id: str | None = None
    forced: bool = False
    model_name: str = ""
    """The registered model whose champion was compared."""
    drift: dict[str, Any] | None = None
    """When the data version changed: the drift test of the new data against the champion's training
    data (``components.pipeline.trust.version_drift``), or why it was not measured."""

    @property
    def status(self) -> str:
        return "retrain" if self.retrain else "up to date"

    def with_drift(self, drift: dict[str, Any] | None) -> Freshness:
        """This verdict with the drift test attached; a drifted data version leads the reason."""
        if drift is None:
            return self
        if drift.get("drifted"):
            p = drift.get("p_value")
            reason = f"data drifted: retrain (MMD p = {p:.4f}); {self.reason}"
        elif drift.get("status") == "measured":
            reason = f"{self.reason} (no drift detected: MMD p = {drift.get('p_value', float('nan')):.4f})"
        else:
            reason = f"{self.reason} (drift not measured: {drift.get('reason', '')})"
        return replace(self, drift=drift, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def decide(
    *,
    data_version: str,
    training_params_hash: str,
    champion: dict[str, str] | None,
    force: bool = False,
    model_name: str = "",
) -> Freshness:
    """Compare the current data version and training fingerprint with the champion's tags.

    ``champion``: the champion's provenance tags (``components.registry.tracking.alias_provenance``), or None
    when there is no champion. A champion trained before the training fingerprint existed is
    treated as stale (its tags cannot prove the params are the same).
    """
    base = Freshness(
        retrain=True,
        reason="no champion yet",
        data_version=data_version,
        training_params_hash=training_params_hash,
        forced=force,
        model_name=model_name,
    )
    if champion is None:
        return base
    base = replace(base, champion_version=champion.get("version"), champion_run_id=champion.get("run_id"))
    if force:
        return replace(base, reason="forced (--force)")
    changed = []
    if champion.get("training_run_missing") == "true":
        changed.append(f"the champion's training run {base.champion_run_id or ''} is gone (deleted)")
    if champion.get("data_version") != data_version:
        changed.append(f"data version {champion.get('data_version')} -> {data_version}")
    if champion.get("training_params_hash") != training_params_hash:
        was = champion.get("training_params_hash") or "(not recorded)"
        changed.append(f"training params {was} -> {training_params_hash}")
    if changed:
        return replace(base, reason="changed since champion: " + "; ".join(changed))
    reason = f"champion version {base.champion_version} was trained on this data with these params"
    return replace(base, retrain=False, reason=reason)
