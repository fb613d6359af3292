"""A 3-member deep ensemble against its members, on real Fashion-MNIST, all in one run.

Three seeds of the shipped small CNN, each a real Ray Train run (``train.ensemble: {seeds: [0, 1, 2]}``
through :func:`components.train.training.train`: side by side when the local runtime holds several
members' workers), combined into one ensemble folder. Every model, members included, gets its own
temperature fitted on val; the ensemble's is refitted on its averaged probabilities. Figures, on the
test split: each member's and the ensemble's accuracy, NLL and ECE; the ensemble against its best
member (highest test accuracy) with a paired-bootstrap lower bound of the accuracy gain and upper
bound of the NLL difference (:func:`components.evaluate.ensemble_eval.compare_members`).

Targets: the ensemble beats its best member on accuracy and NLL (bounds on the right side of 0), and
its ECE after the refit is at most 0.03. Budget: 800 train images per class (7,200 train + 800 val
after the split), 4 epochs, 8,000 test images (the same cap per class); ``--quick``: 200 per class, 2 epochs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from components.core.config import TrainConfig, load_params
from components.data.ingest import ingest
from components.data.manifest import DataPaths
from components.evaluate.ensemble_eval import compare_members, member_probabilities
from components.model.ensemble import ensemble_summary
from components.train.training import train

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SEEDS = [0, 1, 2]


def _train(root: Path, *, epochs: int) -> tuple[Path, float]:
    cfg = TrainConfig(epochs=epochs, workers=1, cpus_per_worker=1, max_failures=0, ensemble={"seeds": SEEDS})
    t0 = time.perf_counter()
    result = train(cfg, data=DataPaths(root / "data"), out_dir=root / "train", storage_path=root / "ray",
                   run_name="bench-ensemble", seed=0, weights_dir=root / "weights", show_progress=False)  # fmt: skip
    return result.model_dir, time.perf_counter() - t0


def _figures(compared: dict[str, Any]) -> list[dict[str, Any]]:
    ens, versus = compared["ensemble"], compared["versus_best"]
    figures: list[dict[str, Any]] = []
    for row in [*compared["members"], ens]:
        name = row["name"].replace(" ", "_")
        figures += [{"name": f"{name}_accuracy", "value": row["accuracy"]},
                    {"name": f"{name}_nll", "value": row["nll"]},
                    {"name": f"{name}_ece", "value": row["ece"]}]  # fmt: skip
    figures[-1].update(target="<= 0.03", passed=ens["ece"] <= 0.03)
    figures += [
        {"name": "accuracy_gain_vs_best_lower_bound", "value": versus["accuracy_gain_lower"], "target": "> 0",
         "passed": versus["accuracy_gain_lower"] > 0},
        {"name": "nll_difference_vs_best_upper_bound", "value": versus["nll_difference_upper"], "target": "< 0",
         "passed": versus["nll_difference_upper"] < 0},
    ]  # fmt: skip
    return figures


def run(*, quick: bool = False) -> dict[str, Any]:
    per_class, epochs = (200, 2) if quick else (800, 4)
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-ensemble-") as tmp:
        root = Path(tmp)
        ingest("fashion-mnist", data_dir=root / "data", max_per_class=per_class, fashion_mnist_dir=FMNIST_DIR,
               progress=False)  # fmt: skip
        model_dir, train_seconds = _train(root, epochs=epochs)
        params = load_params("params.yaml", [f"project.data_dir={root / 'data'}"])
        test, y_test = member_probabilities(params, model_dir, "test")
        val, y_val = member_probabilities(params, model_dir, "val")
        summary = ensemble_summary(model_dir)
        assert summary is not None
        schedule = json.loads((root / "train" / "members.json").read_text())
        labels = [m["label"] for m in summary["members"]]
        compared = compare_members(test, y_test, val, y_val, labels, n_boot=2000, confidence=0.95, seed=0)
    return {
        "figures": _figures(compared),
        "compared": compared,
        "members": summary["members"],
        "budget": {
            "train_images_per_class": per_class,
            "epochs": epochs,
            "test_images": int(len(y_test)),
            "val_images": int(len(y_val)),
            "train_seconds": train_seconds,
            "members_side_by_side": schedule["side_by_side"],
        },  # fmt: skip
    }
