"""Knowledge distillation: does a small student taught by a bigger teacher beat the same student trained
from scratch for the same epochs, on the same data, with the same seeds?

Real Fashion-MNIST subset. The teacher (``imgflow_cnn_wide``, 0.29M parameters) is trained first; then,
for each seed, the student (``imgflow_cnn``, ~4x fewer parameters) twice: from the labels alone
(the baseline, measured in the same run) and with the teacher's soft targets (``distill.temperature``,
``distill.alpha`` defaults). Every run goes through the Ray worker's own pieces in one plain process
(recipe, model, loaders, optimiser, loss, ``components.train.distill.Distiller``, engine steps): the
comparison is about the loss, not the orchestration. Figures: test accuracy and test NLL (at T=1, no
calibration) of the teacher and of both students, and the distilled-minus-scratch deltas.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from components.core.config import DistillConfig, TrainConfig
from components.data.ingest import ingest
from components.data.manifest import DataPaths
from components.train.recipe import Distillation, TrainRecipe

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TEACHER, STUDENT = "imgflow_cnn_wide", "imgflow_cnn"


def _train(recipe: TrainRecipe, out: Path) -> dict[str, Any]:
    """Train ``recipe`` as a Ray worker would, in this process; save the model into ``out``; test figures."""
    import torch

    from components.model.checkpoint import save_classifier
    from components.train import torch_recipe as tr
    from components.train.distill import build_distiller
    from components.train.engine import seed_everything, train_one_epoch

    t0 = time.perf_counter()
    model, spec = tr.build_model(recipe)
    seed_everything(recipe.seed)
    device = torch.device("cpu")
    train_loader, _val = tr.build_loaders(recipe, spec.data_config)
    optimizer, scheduler = tr.build_optimizer(model, recipe, len(train_loader))
    opts = tr.build_step_options(recipe, model, device)
    loss_fn = tr.build_train_loss(recipe, opts, tr.train_targets(train_loader.dataset))
    if recipe.teacher_dir is not None:
        opts.distill = build_distiller(recipe, loss_fn, spec.data_config, device)
    for epoch in range(recipe.epochs):
        train_one_epoch(model, train_loader, optimizer, loss_fn, device=device, scheduler=scheduler,
                        start_step=epoch * len(train_loader), opts=opts)  # fmt: skip
    save_classifier(model.state_dict(), spec, out)
    return {**_test_figures(recipe, model, spec.data_config), "train_s": time.perf_counter() - t0,
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _test_figures(recipe: TrainRecipe, model: Any, data_config: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood on the test split."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from components.data.datasets import InMemoryDataset, batch_collate
    from components.data.manifest import read_manifest
    from components.train import torch_recipe as tr
    from components.train.engine import predict_logits

    test = tr.split_dataset(read_manifest(recipe.manifest), "test", recipe, data_config, train=False)
    collate = batch_collate if isinstance(test, InMemoryDataset) else None
    logits, y = predict_logits(
        model, DataLoader(test, batch_size=512, collate_fn=collate), device=torch.device("cpu")
    )
    log_p = torch.log_softmax(torch.as_tensor(logits), dim=1).numpy()
    return {
        "test_accuracy": float((logits.argmax(1) == y).mean()),
        "test_nll": float(-log_p[np.arange(len(y)), y].mean()),
        "test_images": len(y),
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    import torch

    from components.train.recipe import build_recipe

    per_class, teacher_epochs, student_epochs, seeds = (200, 5, 3, (0,)) if quick else (1000, 10, 4, (0, 1))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    kd = DistillConfig()
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-distill-") as tmp:
        root = Path(tmp)
        ingest("fashion-mnist", data_dir=root / "data", max_per_class=per_class, fashion_mnist_dir=FMNIST_DIR,
               progress=False)  # fmt: skip
        data = DataPaths(root / "data")

        def recipe(model: str, epochs: int, seed: int, distill: Distillation | None = None) -> TrainRecipe:
            cfg = TrainConfig(model=model, epochs=epochs)
            return build_recipe(cfg, data, seed=seed, weights_dir=root / "weights", distill=distill)

        teacher = _train(recipe(TEACHER, teacher_epochs, 0), root / "teacher")
        distill = Distillation(root / "teacher", kd.temperature, kd.alpha)
        runs = []
        for seed in seeds:
            scratch = _train(recipe(STUDENT, student_epochs, seed), root / f"scratch-{seed}")
            taught = _train(recipe(STUDENT, student_epochs, seed, distill), root / f"distilled-{seed}")
            runs.append({"seed": seed, "scratch": scratch, "distilled": taught})
    mean = {
        f"{kind}_{key}": sum(r[kind][key] for r in runs) / len(runs)
        for kind in ("scratch", "distilled")
        for key in ("test_accuracy", "test_nll")
    }
    acc_gain = mean["distilled_test_accuracy"] - mean["scratch_test_accuracy"]
    nll_gain = mean["scratch_test_nll"] - mean["distilled_test_nll"]
    figures: list[dict[str, Any]] = [
        {"name": "teacher_test_accuracy", "value": teacher["test_accuracy"]},
        {"name": "teacher_test_nll", "value": teacher["test_nll"]},
        {"name": "scratch_student_test_accuracy", "value": mean["scratch_test_accuracy"]},
        {"name": "distilled_student_test_accuracy", "value": mean["distilled_test_accuracy"]},
        {"name": "scratch_student_test_nll", "value": mean["scratch_test_nll"]},
        {"name": "distilled_student_test_nll", "value": mean["distilled_test_nll"]},
        {"name": "accuracy_gain", "value": acc_gain, "target": "> 0", "passed": acc_gain > 0},
        {"name": "nll_gain", "value": nll_gain, "target": "> 0", "passed": nll_gain > 0},
        {
            "name": "seeds_where_distilled_wins_accuracy",
            "value": sum(r["distilled"]["test_accuracy"] > r["scratch"]["test_accuracy"] for r in runs),
        },  # fmt: skip
    ]
    return {
        "figures": figures,
        "config": {
            "teacher": TEACHER,
            "student": STUDENT,
            "max_per_class": per_class,
            "teacher_epochs": teacher_epochs,
            "student_epochs": student_epochs,
            "seeds": list(seeds),
            "distill": kd.model_dump(),
            "train": {"batch_size": TrainConfig().batch_size, "lr": TrainConfig().lr},
        },  # fmt: skip
        "teacher": teacher,
        "runs": runs,
        "baseline": "the same student, seeds, data, epochs and recipe trained from the hard labels alone, in "
        "the same run; figures are means over the seeds",
    }
