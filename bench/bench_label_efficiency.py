"""Fewer labels (issue 25): self-supervised pretraining's label efficiency, plus the active-learning figures.

Real Fashion-MNIST, through the product's own entry points: ``run_ingest`` -> ``run_pretrain`` (SimCLR
on Ray Train, 2 workers, ``ssl.*`` defaults; its wall time is ``ssl_pretrain_s``) -> ``run_label_efficiency``
(1% / 10% / 100% of the train labels, 3 seeded subsets; the SSL probe (the report's protocol: the last two or
three conv stages 3x3-pooled, of each image and its mirror; classifier, C and maps chosen by CV inside each
labelled subset), raw pixels and random init through the same probe, imgflow's recipe from scratch; all
measured in this run).

Figures (targets from the issue): ``ssl_1pct_gain_pt`` (SSL probe minus the better of pixels and scratch
at 1%, >= 2.0), ``ssl_10pct_gain_pt`` (minus scratch at 10%, >= 1.5), ``ssl_pretrain_s`` (<= 300), the
stretch ``ssl_1pct_minus_scratch_10pct_pt`` (>= 0: "1% SSL >= 10% scratch", reported); then the
active-learning figures of ``bench/al_bench.py`` (``measure``), when that module is present.

``--quick``: 200 images per class and split, 2 pretraining epochs, a 200-step scratch budget (smoke
test: its figures are not the issue's).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from components.core.config import load_params
from components.evaluate.label_efficiency import EvalSettings

REPO = Path(__file__).resolve().parents[1]


def _figure(
    name: str, value: float, unit: str, target: str | None = None, passed: bool | None = None
) -> dict:
    return {"name": name, "value": float(value), "unit": unit, "target": target, "passed": passed}


def _ssl_figures(report: dict[str, Any], pretrain_s: float) -> list[dict[str, Any]]:
    gains, summary = report["gains"], report["summary"]
    g1, g10 = gains["ssl_vs_best_baseline_1%_pt"], gains["ssl_vs_scratch_10%_pt"]
    stretch = 100 * (summary["ssl_probe"]["1%"] - summary["scratch"]["10%"])
    return [
        _figure("ssl_1pct_gain_pt", g1, "points", ">= 2.0", g1 >= 2.0),
        _figure("ssl_10pct_gain_pt", g10, "points", ">= 1.5", g10 >= 1.5),
        _figure("ssl_pretrain_s", pretrain_s, "s", "<= 300", pretrain_s <= 300),
        _figure("ssl_1pct_minus_scratch_10pct_pt", stretch, "points", ">= 0 (stretch, reported)", None),
        *(
            _figure(
                f"ssl_finetune_{pct}pct_gain_pt",
                gains[f"ssl_finetune_vs_scratch_{pct}%_pt"],
                "points",
                "reported (train.init: ssl with the train.init_* defaults, minus scratch)",
                None,
            )  # fmt: skip
            for pct in ("1", "10", "100")
            if f"ssl_finetune_vs_scratch_{pct}%_pt" in gains
        ),
        *(
            _figure(f"{method}_{pct.rstrip('%')}pct_accuracy", 100 * value, "%")
            for method, by in summary.items()
            for pct, value in by.items()
        ),
    ]


def _active_learning(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Helper C's active-learning figures (``bench/al_bench.py``), or a note when it is absent."""
    try:
        from bench import al_bench
    except ImportError as e:
        return [], {"active_learning": f"not measured: bench/al_bench.py could not be imported ({e})"}
    measured = al_bench.measure(quick=quick)
    return list(measured["figures"]), dict(measured.get("tables", {}))


def pretrained_project(root: Path, *, quick: bool) -> tuple[Any, Any, float]:
    """A fresh project under ``root``: Fashion-MNIST ingested (all of it; ``quick``: 200 images per class
    and split), the small CNN pretrained with the ``ssl.*`` defaults (``quick``: 2 epochs). Returns the
    params, the :class:`PretrainRecord` and the pretraining's wall seconds (``ssl_pretrain_s``)."""
    from components.pipeline.pretraining import run_pretrain
    from components.pipeline.stages import run_ingest

    params = load_params(REPO / "params.yaml", [
        f"project.data_dir={root / 'data'}", f"project.output_dir={root / 'outputs'}",
        f"project.state_dir={root / '.imgflow'}", f"ingest.max_per_class={200 if quick else 'null'}",
        "train.recipe=manual", "train.model=imgflow_cnn", f"register.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ])  # fmt: skip
    run_ingest(params, progress=False)
    t0 = time.perf_counter()
    pretrained = run_pretrain(params, epochs=2 if quick else None, progress=False)
    return params, pretrained, time.perf_counter() - t0


def run(*, quick: bool = False) -> dict[str, Any]:
    from components.pipeline.pretraining import run_label_efficiency

    settings = EvalSettings(scratch_steps=200) if quick else EvalSettings()
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-le-") as tmp:
        params, pretrained, pretrain_s = pretrained_project(Path(tmp), quick=quick)
        t1 = time.perf_counter()
        record = run_label_efficiency(params, settings=settings)
        report_s = time.perf_counter() - t1
    al_figures, al_tables = _active_learning(quick)
    report = record.report
    return {
        "figures": [*_ssl_figures(report, pretrain_s), *al_figures],
        "tables": {"label_efficiency": report["summary"], "gains": report["gains"], **al_tables},
        "config": {
            "quick": quick,
            "max_per_class": 200 if quick else None,
            "model": "imgflow_cnn",
            "ssl": {**params.ssl.model_dump(mode="json"), "epochs": pretrained.epochs},
            "pretrain_images": pretrained.images,
            "pretrain_losses": pretrained.losses,
            "data_hash": pretrained.data_hash,
            "eval": report["settings"],
            "report_s": report_s,
            "threads": os.cpu_count(),
        },
        "rows": report["rows"],
        "notes": report["notes"],
    }
