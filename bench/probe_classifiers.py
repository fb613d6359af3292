"""Which linear classifier the label-efficiency probes should fit: logistic regression, shrinkage LDA
(Ledoit-Wolf), the two averaged, and ``auto`` (the report's default: the CV inside each labelled subset
chooses), each through the report's own ``probe_fit`` (maps and C chosen as the report chooses them), on
one pretrained backbone's features and on raw pixels, with the report's seeded subsets, scored on the val
split (a comparison a default may be chosen by) or the test split (what the report scores)
(docs/self-supervised.md, "The probe's classifier").

A measurement script, not a benchmark of ``python -m bench``: it needs a project that holds a data
version and an ``imgflow pretrain`` run::

    python -m bench.probe_classifiers --set project.data_dir=DATA --set project.output_dir=OUT
        --set project.state_dir=STATE [--split val] [--fractions 0.01,0.1] [--seed 0] [--json]

(one command line).

Writes ``bench/results/probe_classifiers.json`` (``probe_classifiers.val.json`` for ``--split val``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import load_params
from components.evaluate import label_efficiency as le

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "probe_classifiers.json"


CLASSIFIERS = (*le.PROBE_CLASSIFIERS, "auto")


def compare(
    feats: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]],
    y_train: np.ndarray,
    y_eval: np.ndarray,
    *,
    settings: le.EvalSettings,
) -> list[dict[str, Any]]:
    """One row per (features, fraction, subset, classifier): accuracy on the scored split, what was
    chosen, and fit seconds."""
    rows = []
    for name, (x_train, x_eval, columns) in feats.items():
        for fraction in settings.fractions:
            for subset in range(settings.subsets):
                idx = le.labelled_subset(y_train, fraction, seed=settings.seed, subset=subset)
                for clf in CLASSIFIERS:
                    t0 = time.perf_counter()
                    fit = le.probe_fit(x_train[idx], y_train[idx], x_eval, y_eval, columns=columns,
                                       settings=dataclasses.replace(settings, probe_classifier=clf))  # fmt: skip
                    rows.append({"features": name, "fraction": fraction, "subset": subset, "classifier": clf,
                                 "accuracy": fit.accuracy, "chosen": fit.classifier, "C": fit.C,
                                 "layers": fit.layers, "fit_s": time.perf_counter() - t0})  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"<features> <classifier>": {"1%": mean accuracy in %, ...}}``."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        cell = out.setdefault(f"{r['features']} {r['classifier']}", {})
        cell.setdefault(f"{r['fraction']:.0%}", []).append(100 * r["accuracy"])
    return {k: {f: round(float(np.mean(v)), 2) for f, v in by.items()} for k, by in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override"
    )
    parser.add_argument("--fractions", default="0.01,0.1", help="label fractions (default 0.01,0.1)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the labelled subsets (default project.seed, as `imgflow label-efficiency` draws them; "
        "0 is what `python -m bench label_efficiency` draws)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the split the probes are scored on (val: choose a protocol without the test split)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()

    from safetensors.torch import load_file
    from sklearn.exceptions import ConvergenceWarning

    from components.model.models import create_classifier
    from components.pipeline.pretraining import backbone_for_report, report_inputs, report_split
    from components.train.ssl import BACKBONE_WEIGHTS

    # probe_max_iter caps the fits as the report does: its warnings are expected
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    params = load_params(REPO / "params.yaml", args.set)
    folder, run_id = backbone_for_report(params, None)
    inputs = report_inputs(params, folder)
    net = create_classifier(inputs.spec["model"], 0, in_chans=int(inputs.spec["in_chans"]))
    net.load_state_dict(load_file(str(folder / BACKBONE_WEIGHTS)))
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seed = params.project.seed if args.seed is None else args.seed
    settings = le.EvalSettings(seed=seed, fractions=fractions,
                               mirror=inputs.recipe.hflip > 0)  # fmt: skip
    dc = inputs.data_config
    scored = inputs.test if args.split == "test" else report_split(params, dc, "val")
    feats = {
        name: (*(le.probe_features(backbone, split.images, settings=settings, mean=dc["mean"], std=dc["std"])
                 for split in (inputs.train, scored)),
               le.probe_columns(backbone, scored.images[:1], settings=settings, mean=dc["mean"], std=dc["std"]))
        for name, backbone in (("ssl", net), ("pixels", None))
    }  # fmt: skip
    rows = compare(feats, inputs.train.labels, scored.labels, settings=settings)
    result = {
        "split": args.split,
        "ssl_run": run_id,
        "settings": dataclasses.asdict(settings),
        "summary": summary(rows),
        "rows": rows,
    }
    out = RESULT if args.split == "test" else RESULT.with_suffix(".val.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, by in result["summary"].items():
            print(f"{key:<26}", "  ".join(f"{f} {v:.2f}" for f, v in by.items()))
        print(f"written: {out}")


if __name__ == "__main__":
    main()
