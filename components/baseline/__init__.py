"""Zero-shot and linear-probe CLIP baselines (open_clip): the floor every trained model must beat.

Modules, by what they do:

* :mod:`~components.baseline.clip_model`: the open_clip adapter (the only module that imports
  open_clip): model and weights, offline errors, device, text and image encoding.
* :mod:`~components.baseline.embeddings`: the on-disk cache of image features (each image is
  encoded once per model and weights).
* :mod:`~components.baseline.prompts`: prompt templates and each class's prompts.
* :mod:`~components.baseline.zero_shot`: zero-shot logits and probabilities, label calibration.
* :mod:`~components.baseline.probes`: linear probes on frozen features.
* :mod:`~components.baseline.disagreements`: images whose label CLIP confidently contradicts.
* :mod:`~components.baseline.run`: the stage's work (:func:`run_baselines`).
* :mod:`~components.baseline.records`: baseline.json, its files and its summary.

The gate that compares a trained model with these baselines lives with the other gates:
:mod:`components.evaluate.baseline_gate`. The stage's API is re-exported here.
"""

from components.baseline.clip_model import (
    WEIGHTS_UNAVAILABLE,
    ClipEncoder,
    WeightsUnavailableError,
    create_clip,
    resolve_device,
)
from components.baseline.records import read_baseline, skipped_record, summarize, summary_line, write_baseline
from components.baseline.run import run_baselines

__all__ = [
    "WEIGHTS_UNAVAILABLE",
    "ClipEncoder",
    "WeightsUnavailableError",
    "create_clip",
    "read_baseline",
    "resolve_device",
    "run_baselines",
    "skipped_record",
    "summarize",
    "summary_line",
    "write_baseline",
]
