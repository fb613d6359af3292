"""The champion comparison of the evaluate stage: the registry's champion re-run on the same test
images (its registered files, not its old numbers) and compared with the challenger by the task's
statistic (:meth:`components.task.Task.compare`: per-image correctness or per-label AP, a paired
bootstrap for non-inferiority).

The registry is not asked here: the pipeline (:mod:`components.pipeline.evaluation`) looks the
champion up, downloads its files when a comparison needs them (:func:`needs_champion_files`) and
passes a :class:`Champion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.config import Params
from components.evaluate.predictions import SplitOutput, predict_split
from components.task import Task


@dataclass(frozen=True)
class Champion:
    """The registry's champion as the caller found it."""

    alias: str
    """The alias looked up (``champion``)."""
    version: str | None
    """The version holding the alias; None when no version does."""
    uri: str = ""
    """Where it was loaded from, e.g. ``models:/imgflow@champion`` (for the report)."""
    model_dir: Path | None = None
    """Its downloaded files (model.json + weights); None when no comparison needs them."""


def needs_champion_files(params: Params, *, version: str | None, own_version: str | None) -> bool:
    """Whether the evaluation will re-run the champion (``version``): comparing is on, there is a
    champion, and it is not the evaluated model itself (``own_version``)."""
    return params.evaluate.compare_champion and version is not None and version != own_version


def champion_evidence(
    params: Params,
    test: SplitOutput,
    classes: tuple[str, ...],
    task: Task,
    champion: Champion | None,
    *,
    own_version: str | None,
) -> dict[str, Any]:
    """Re-evaluate the champion on the same test split and compare (non-inferiority).

    ``status``: ``compared`` (with ``comparison``), ``none`` (no champion), ``skipped`` (it is the
    evaluated model, or has another class set or test split) or ``not applicable``: a champion of the
    other task cannot be compared (its gate then fails as not applicable rather than passing silently).
    """
    from components.model.checkpoint import load_spec

    name = params.register_.model_name
    if champion is None or champion.version is None:
        alias = champion.alias if champion else "champion"
        return {"status": "none", "reason": f"no '{alias}' alias on {name}: nothing to compare with"}
    version, uri = champion.version, champion.uri
    if version == own_version:
        return {
            "status": "skipped",
            "reason": f"the evaluated model is the champion itself (version {version})",
        }
    if champion.model_dir is None:
        return {"status": "skipped", "reason": f"the files of champion version {version} were not fetched"}
    champ_task = load_spec(champion.model_dir).task
    if champ_task is not task:
        return {
            "status": "not applicable", "version": version, "uri": uri,
            "reason": f"champion version {version} is a {champ_task.name} model and this one is {task.name}: "
            "their metrics cannot be compared",
        }  # fmt: skip
    champ, (_, spec) = predict_split(params, champion.model_dir, "test")
    if tuple(spec.classes) != tuple(classes) or len(champ.targets) != len(test.targets):
        return {
            "status": "skipped",
            "reason": f"champion version {version} has another class set or test split",
        }
    comparison = task.compare(test.targets, test.logits, champ.logits, classes, gates=params.gates,
                              n_boot=params.evaluate.bootstrap, seed=params.project.seed)  # fmt: skip
    return {"status": "compared", "version": version, "uri": uri, "comparison": comparison}
