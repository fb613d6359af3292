"""Knowledge distillation: the KD loss, the teacher wrapper, the worker's distillation step on real
Fashion-MNIST images, the teacher checks of ``imgflow distill`` and (slow) a whole distill run on Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components.core.config import Params, load_params
from components.core.errors import ConfigError, DataError
from components.data.manifest import DataPaths
from components.pipeline.distillation import TEACHER_TAG, run_distill, student_params
from components.pipeline.stages import run_ingest
from components.train.distill import (
    Distiller,
    TeacherInput,
    build_distiller,
    check_teacher,
    distillation_loss,
    soft_target_loss,
)
from components.train.engine import predict_logits, train_one_epoch
from components.train.recipe import Distillation, build_recipe
from components.train.torch_recipe import (
    build_loaders,
    build_model,
    build_optimizer,
    build_step_options,
    build_train_loss,
    train_targets,
)
from tests.conftest import FMNIST_CLASSES, write_small_params


def _logits(seed: int, n: int = 8, k: int = 10) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_soft_loss_is_t_squared_times_the_kl_of_the_softened_distributions() -> None:
    zs, zt = _logits(0), _logits(1)
    for t in (1.0, 4.0):
        p_t, p_s = F.softmax(zt / t, dim=1), F.softmax(zs / t, dim=1)
        kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        assert torch.allclose(soft_target_loss(zs, zt, temperature=t), t * t * kl, atol=1e-5)
    assert float(soft_target_loss(zt, zt, temperature=4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target_loss(zs, zt, temperature=4.0)) > 0


def test_t_squared_keeps_the_soft_gradient_scale_as_the_temperature_grows() -> None:
    """Hinton's reason for T^2: the soft term's gradient tends to (z_s - z_t) / (K N) whatever T, instead
    of shrinking as 1/T^2 (the ratio of two temperatures' gradient norms would be 4 without it)."""
    zt = _logits(1)

    def grad_norm(t: float) -> float:
        zs = _logits(0).requires_grad_(True)
        soft_target_loss(zs, zt, temperature=t).backward()
        assert zs.grad is not None
        return float(zs.grad.norm())

    assert grad_norm(20.0) / grad_norm(40.0) == pytest.approx(1.0, abs=0.05)


def test_alpha_weighs_soft_and_hard_terms_and_alpha_zero_is_plain_training() -> None:
    zs, zt, y = _logits(0), _logits(1), torch.arange(8) % 10
    hard = F.cross_entropy(zs, y)
    soft = soft_target_loss(zs, zt, temperature=4.0)
    assert torch.equal(distillation_loss(zs, zt, hard, temperature=4.0, alpha=0.0), hard)
    assert torch.allclose(distillation_loss(zs, zt, hard, temperature=4.0, alpha=1.0), soft)
    mixed = distillation_loss(zs, zt, hard, temperature=4.0, alpha=0.7)
    assert torch.allclose(mixed, 0.7 * soft + 0.3 * hard)

    class Exploding(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("alpha=0 must not run the teacher")

    plain = Distiller(Exploding(), torch.nn.CrossEntropyLoss(), temperature=4.0, alpha=0.0)
    assert torch.equal(plain(torch.zeros(8, 1, 4, 4), zs, y), hard)


def test_teacher_input_converts_the_students_normalisation_and_size() -> None:
    student = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)}
    teacher = {"input_size": (1, 32, 32), "mean": (0.2860,), "std": (0.3530,)}
    pixels = torch.rand(2, 1, 28, 28)
    x_student = (pixels - 0.5) / 0.5
    same = TeacherInput(student, student)
    assert torch.equal(same(x_student), x_student)
    out = TeacherInput(student, {**teacher, "input_size": (1, 28, 28)})(x_student)
    assert torch.allclose(out, (pixels - 0.2860) / 0.3530, atol=1e-5)
    assert TeacherInput(student, teacher)(x_student).shape == (2, 1, 32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    """12 real Fashion-MNIST images per class and source split, ingested once for the module."""
    root = tmp_path_factory.mktemp("distill-data")
    run_ingest(load_params(write_small_params(root, max_per_class=12), [f"project.data_dir={root / 'data'}"]),
               progress=False)  # fmt: skip
    return DataPaths(root / "data")


def _teacher_with_classes(teacher: Path, dst: Path, classes: list[str]) -> Path:
    out = Path(shutil.copytree(teacher, dst))
    spec = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**spec, "classes": classes}))
    return out


def test_teacher_checks_name_what_does_not_match(tiny_model_dir: Path, tmp_path: Path) -> None:
    classes = list(FMNIST_CLASSES)
    assert (
        check_teacher(tiny_model_dir, classes=classes, in_chans=1, task="singlelabel").classes
        == FMNIST_CLASSES
    )
    other = _teacher_with_classes(tiny_model_dir, tmp_path / "other", [*classes[:9], "Hat"])
    with pytest.raises(ConfigError, match=r"missing \['Ankle boot'\], extra \['Hat'\]"):
        check_teacher(other, classes=classes, in_chans=1, task="singlelabel")
    swapped = _teacher_with_classes(
        tiny_model_dir, tmp_path / "swapped", [classes[1], classes[0], *classes[2:]]
    )
    with pytest.raises(ConfigError, match="another order"):
        check_teacher(swapped, classes=classes, in_chans=1, task="singlelabel")
    with pytest.raises(ConfigError, match="1-channel"):
        check_teacher(tiny_model_dir, classes=classes, in_chans=3, task="singlelabel")
    with pytest.raises(ConfigError, match="single-label"):
        check_teacher(tiny_model_dir, classes=classes, in_chans=1, task="multilabel")
    with pytest.raises(ConfigError, match="not an imgflow model folder"):
        check_teacher(tmp_path, classes=classes, in_chans=1, task="singlelabel")


def test_worker_distillation_step_pulls_the_student_towards_the_teacher(
    data: DataPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The worker's own pieces (recipe, model, loaders, loss, Distiller) without Ray: epochs with
    alpha=1 bring the student's predictions closer to the teacher's on the val images."""
    params = load_params(write_small_params(tmp_path), ["train.model=imgflow_cnn", "train.batch_size=16"])
    recipe = build_recipe(params.train, data, seed=0, weights_dir=tmp_path / "weights",
                          distill=Distillation(tiny_model_dir, temperature=4.0, alpha=1.0))  # fmt: skip
    assert recipe.teacher_dir == tiny_model_dir.resolve() and recipe.to_dict()["teacher_dir"] == str(
        recipe.teacher_dir
    )
    model, spec = build_model(recipe)
    train_loader, val_loader = build_loaders(recipe, spec.data_config)
    optimizer, scheduler = build_optimizer(model, recipe, len(train_loader))
    device = torch.device("cpu")
    opts = build_step_options(recipe, model, device)
    opts.distill = build_distiller(recipe, build_train_loss(recipe, opts, train_targets(train_loader.dataset)),
                                   spec.data_config, device)  # fmt: skip
    teacher = opts.distill.teacher  # type: ignore[attr-defined]

    def kl_to_teacher() -> float:
        student_logits, _ = predict_logits(model, val_loader, device=device)
        teacher_logits, _ = predict_logits(teacher, val_loader, device=device)
        return float(
            soft_target_loss(
                torch.as_tensor(student_logits), torch.as_tensor(teacher_logits), temperature=1.0
            )
        )

    before = kl_to_teacher()
    for epoch in range(4):
        sums = train_one_epoch(model, train_loader, optimizer, torch.nn.Identity(), device=device, scheduler=scheduler,
                               start_step=epoch * len(train_loader), opts=opts)  # fmt: skip
        assert sums["count"] == len(train_loader.dataset) and torch.isfinite(torch.tensor(sums["loss_sum"]))
    assert kl_to_teacher() < 0.7 * before


def _project(root: Path, data: DataPaths, *overrides: str) -> Params:
    path = write_small_params(root, max_per_class=12, evaluate={"compare_champion": False})
    return load_params(path, [f"project.data_dir={data.root}", f"project.output_dir={root / 'outputs'}",
                              f"project.state_dir={root / '.imgflow'}", *overrides])  # fmt: skip


def test_a_teacher_of_another_class_set_stops_before_training_and_leaves_the_registry_alone(
    data: DataPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    params = _project(tmp_path, data)
    other = _teacher_with_classes(tiny_model_dir, tmp_path / "other", [*FMNIST_CLASSES[:9], "Hat"])
    with pytest.raises(ConfigError, match="the teacher's classes do not match") as e:
        run_distill(params, teacher_uri=str(other), student="imgflow_cnn", progress=False)
    assert e.value.exit_code == 2
    assert not (tmp_path / ".imgflow" / "mlflow.db").exists()  # no run, no registered model
    assert not (tmp_path / "outputs" / "distill" / "run.json").exists()
    with pytest.raises(ConfigError, match="unknown student model"):
        run_distill(params, teacher_uri=str(tiny_model_dir), student="no_such_net", progress=False)
    with pytest.raises(DataError, match="neither a model folder"):
        run_distill(params, teacher_uri=str(tmp_path / "missing"), student="imgflow_cnn", progress=False)


def test_a_registry_uri_that_does_not_resolve_is_a_clear_error(data: DataPaths, tmp_path: Path) -> None:
    params = _project(tmp_path, data)
    with pytest.raises(DataError, match="does not resolve in the registry"):
        run_distill(
            params, teacher_uri="models:/no-such-model@champion", student="imgflow_cnn", progress=False
        )


def test_student_params_name_the_students_own_registered_model() -> None:
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml", ["register.model_name=fm"])
    sp = student_params(params, "imgflow_cnn")
    assert (sp.train.model, sp.register_.model_name) == ("imgflow_cnn", "fm-student")
    named = load_params(
        Path(__file__).resolve().parents[2] / "params.yaml", ["distill.registered_name=small"]
    )
    assert student_params(named, "resnet18").register_.model_name == "small"


@pytest.mark.slow
def test_distill_run_on_ray_trains_evaluates_and_registers_the_student(
    data: DataPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from components.pipeline.context import connect_tracking

    # the evaluate stage's own evidence (OOD sets, corruption sweep, drift) is tested with it, not here
    cheap = ("ood.enabled=false", "evaluate.robustness.enabled=false", "drift.enabled=false")
    params = _project(tmp_path, data, "train.epochs=2", "train.batch_size=16", *cheap)
    result = run_distill(params, teacher_uri=str(tiny_model_dir), student="imgflow_cnn", progress=False,
                         raise_on_gate_failure=False)  # fmt: skip
    assert result.epochs == 2 and result.registration.name == "imgflow-test-student"
    assert (tmp_path / "outputs" / "distill" / "evaluate" / "gates.json").exists()
    connect_tracking(params)
    client = MlflowClient()
    version = client.get_model_version("imgflow-test-student", result.registration.version)
    assert version.tags[TEACHER_TAG] == str(tiny_model_dir)
    run = client.get_run(result.run_id)
    assert run.data.params["distill.temperature"] == "4.0" and "val_accuracy" in run.data.metrics
    assert (
        client.search_registered_models(filter_string="name='imgflow-test'") == []
    )  # the teacher's line untouched
