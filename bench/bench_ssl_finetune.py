"""Fine-tuning from a self-supervised backbone (issue 25): what ``train.init: ssl:<run>`` buys over
imgflow's recipe from scratch, and which fine-tuning schedule buys it.

Real Fashion-MNIST: ``run_ingest`` -> ``run_pretrain`` (SimCLR, ``ssl.*`` defaults, as
``bench label_efficiency``) -> on the label-efficiency report's seeded subsets (1% / 10% / 100% of the
train labels, 3 subsets below 100%), imgflow's supervised recipe for the report's step budget
(:func:`components.evaluate.label_efficiency.scratch_epochs`), flip TTA, scored on the test split:

- ``scratch``: from random init;
- ``default``: from the backbone with ``train.init_*`` as params.yaml sets them (no probe phase, the
  backbone at 1.0 x lr);
- ``lpft_0.1``: LP-FT as the defaults were until 2026-12-05 (the head alone for the first 10% of the
  epochs, then the backbone at 0.1 x lr);
- ``lpft_1.0``: LP-FT's probe phase with the backbone at 1.0 x lr afterwards.

Every arm runs in this process on the same subsets and seeds; figures are points over ``scratch``.
``--quick``: 200 images per class, 2 pretraining epochs, 200 steps (a smoke test).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_label_efficiency import _figure, pretrained_project

ARMS = {"scratch": None, "default": (None, None), "lpft_0.1": (0.1, 0.1), "lpft_1.0": (1.0, 0.1)}
"""arm -> None (from scratch) or (backbone lr scale, probe share); None inside: the params.yaml value."""


def run(*, quick: bool = False) -> dict[str, Any]:
    from components.evaluate import label_efficiency as le
    from components.pipeline.pretraining import report_inputs

    settings = le.EvalSettings(scratch_steps=200 if quick else 600, mirror=True)
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-ft-") as tmp:
        params, pretrained, pretrain_s = pretrained_project(Path(tmp), quick=quick)
        folder = pretrained.backbone_dir
        inputs = report_inputs(params, folder)
        recipe, train, test = inputs.recipe, inputs.train, inputs.test
        rows, seconds = [], {}
        for arm, how in ARMS.items():
            t1 = time.perf_counter()
            if how is None:
                fit = le.recipe_scratch_trainer(recipe, mirror=True)
            else:
                scale = recipe.init_backbone_lr_scale if how[0] is None else how[0]
                share = le.train_init_probe_share(recipe) if how[1] is None else how[1]
                r = dataclasses.replace(recipe, init_backbone_lr_scale=scale)
                fit = le.recipe_scratch_trainer(r, init_dir=folder, probe_share=share, mirror=True)
            for fraction in settings.fractions:
                for subset in range(1 if fraction >= 1.0 else settings.subsets):
                    idx = le.labelled_subset(train.labels, fraction, seed=settings.seed, subset=subset)
                    acc = fit(le.Split(train.images[idx], train.labels[idx]), test,
                              le.scratch_epochs(len(idx), settings))  # fmt: skip
                    rows.append({"arm": arm, "fraction": fraction, "subset": subset, "accuracy": acc})
            seconds[arm] = time.perf_counter() - t1
    mean = {
        arm: {f"{100 * f:g}%": float(np.mean([r["accuracy"] for r in rows if r["arm"] == arm and r["fraction"] == f]))
              for f in settings.fractions}
        for arm in ARMS
    }  # fmt: skip
    figures = [
        _figure(
            f"{arm}_{pct.rstrip('%')}pct_gain_pt",
            100 * (by[pct] - mean["scratch"][pct]),
            "points",
            "reported (minus scratch, same subsets)",
        )  # fmt: skip
        for arm, by in mean.items()
        if arm != "scratch"
        for pct in by
    ]
    figures.append(_figure("ssl_pretrain_s", pretrain_s, "s"))
    return {
        "figures": figures,
        "tables": {"mean_accuracy": mean, "arm_seconds": seconds},
        "config": {
            "quick": quick,
            "arms": dict(ARMS),
            "train_init_defaults": {
                "init_backbone_lr_scale": recipe.init_backbone_lr_scale,
                "init_probe_epochs": recipe.init_probe_epochs,
                "epochs": recipe.epochs,
            },
            "eval": settings.to_dict(),
            "pretrain_losses": pretrained.losses,
            "data_hash": pretrained.data_hash,
        },  # fmt: skip
        "rows": rows,
    }
