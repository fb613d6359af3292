"""``imgflow pretrain`` through Ray Train on real Fashion-MNIST images, and ``train.init: ssl:<run>``.

One tiny ingest and one local Ray runtime (127.0.0.1) serve the module. Default suite: a tiny
pretraining run twice with one seed gives the identical loss curve, and its MLflow run resolves back to
a backbone that supervised training loads (a wrong run id or another architecture: a clear error).
BYOL the same way, with both its backbones (target and online) written. Slow: a CI-sized run (SimCLR
and BYOL) whose worker is killed mid-epoch resumes from its last checkpoint and ends on the very curve of
an uninterrupted run; supervised training from the backbone through Ray (LP-FT).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from components.core.config import Params, load_params
from components.core.errors import ConfigError
from components.pipeline.pretraining import resolve_init, run_pretrain
from components.pipeline.stages import run_ingest
from components.train.ray_adapter import RayOptions
from components.train.ssl import hash_images
from tests.conftest import fast_ray_runtime, write_small_params


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 real images per class and source split, ingested once."""
    root = tmp_path_factory.mktemp("ssl-project")
    params = load_params(write_small_params(root, max_per_class=10), _overrides(root))
    run_ingest(params, progress=False)
    return root


@pytest.fixture(scope="module")
def ci_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 real images per class and source split (~900 train images): several steps per epoch."""
    root = tmp_path_factory.mktemp("ssl-ci-project")
    params = load_params(write_small_params(root, max_per_class=100), _overrides(root))
    run_ingest(params, progress=False)
    return root


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """One local Ray runtime for the module (tests/conftest.py fast_ray_runtime)."""
    with fast_ray_runtime():
        yield


def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        f"project.data_dir={root / 'data'}", f"project.output_dir={root / 'outputs'}",
        f"project.state_dir={root / '.imgflow'}", "train.workers=1", "train.recipe=manual",
        "train.model=imgflow_cnn", "ssl.batch_size=32", *extra,
    ]  # fmt: skip


def _params(root: Path, *extra: str) -> Params:
    return load_params(root / "params.yaml", _overrides(root, *extra))


def _replay_first_epoch(backbone_dir: Path) -> float:
    """The first epoch of the run that wrote ``backbone_dir``, replayed in this process (1 thread, as the
    Ray worker ran it): the same per-worker function, the recipe from the backbone's spec."""
    import torch

    from components.train.ssl import SSLRecipe, _epoch, build_network

    recipe = SSLRecipe.from_dict(json.loads((backbone_dir / "backbone.json").read_text())["recipe"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = build_network(recipe)
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        images = np.load(recipe.images_file, mmap_mode="r")
        sums = _epoch(net, opt, images, recipe, epoch=0, rank=0, world=1, device=torch.device("cpu"),
                      on_batch=lambda *_: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return sums["loss_sum"] / sums["count"]


def test_pretraining_is_deterministic_logged_and_resolvable(project: Path, ray_runtime: None) -> None:
    params = _params(project, "ssl.max_images=96")
    run = run_pretrain(params, epochs=1, progress=False)
    # seed + data hash -> the loss curve: replaying the epoch outside Ray gives the same loss
    assert np.isfinite(run.losses).all() and _replay_first_epoch(run.backbone_dir) == pytest.approx(
        run.losses[0], rel=1e-6
    )
    images = np.load(next((project / ".imgflow" / "cache").glob("ssl-*.npy")), mmap_mode="r")
    assert (
        images.shape[1:] == (1, 28, 28) and run.images == len(images) and run.data_hash == hash_images(images)
    )
    spec = json.loads((run.backbone_dir / "backbone.json").read_text())
    assert spec["data_hash"] == run.data_hash and spec["model"] == "imgflow_cnn"

    folder = resolve_init(_params(project, f"train.init=ssl:{run.run_id}"))
    assert folder is not None and (folder / "backbone.safetensors").is_file()
    with pytest.raises(ConfigError, match="no MLflow run"):
        resolve_init(_params(project, "train.init=ssl:0123456789abcdef0123456789abcdef"))
    with pytest.raises(ConfigError, match="architecture mismatch"):
        resolve_init(_params(project, f"train.init=ssl:{run.run_id}", "train.model=imgflow_cnn_wide"))


def test_byol_pretraining_is_deterministic_and_keeps_both_backbones(project: Path, ray_runtime: None) -> None:
    run = run_pretrain(_params(project, "ssl.max_images=96", "ssl.method=byol"), epochs=1, progress=False)
    assert run.method == "byol" and 0.0 <= run.losses[0] <= 4.0
    assert _replay_first_epoch(run.backbone_dir) == pytest.approx(run.losses[0], rel=1e-6)
    spec = json.loads((run.backbone_dir / "backbone.json").read_text())
    target = json.loads((run.backbone_dir / "target" / "backbone.json").read_text())
    assert (spec["method"], spec["branch"], target["branch"]) == ("byol", "online", "target")
    assert spec["recipe"]["byol_momentum"] == 0.9  # auto on a 1-step run: the range's floor
    folder = resolve_init(_params(project, f"train.init=ssl:{run.run_id}"))
    assert folder is not None and (folder / "target" / "backbone.safetensors").is_file()


def test_an_unknown_method_is_a_config_error(project: Path) -> None:
    params = _params(project)  # the CLI's --method sets ssl.method past the schema's check
    params = params.model_copy(update={"ssl": params.ssl.model_copy(update={"method": "moco"})})
    with pytest.raises(ConfigError, match="unknown pretraining method 'moco': use one of simclr, byol"):
        run_pretrain(params, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="ssl.method: Input should be 'simclr' or 'byol'"):
        _params(project, "ssl.method=moco")


def test_label_efficiency_fine_tunes_as_train_init_does(project: Path, ray_runtime: None) -> None:
    """The report's ``ssl_finetune`` arm takes train.init's schedule: by default no probe phase and the
    backbone at 1 x lr; with ``train.init_probe_epochs`` the head-only share of a full run's epochs."""
    from components.evaluate.label_efficiency import EvalSettings
    from components.pipeline.pretraining import run_label_efficiency

    run = run_pretrain(_params(project, "ssl.max_images=96"), epochs=1, progress=False)
    settings = EvalSettings(fractions=(0.5,), subsets=1, scratch_steps=4, probe_C=0.5, feature_batch_size=64)
    default = run_label_efficiency(_params(project), ssl_run=run.run_id, settings=settings).report
    assert default["settings"]["finetune_probe_share"] == 0.0
    assert {r["method"] for r in default["rows"]} >= {"ssl_probe", "scratch", "ssl_finetune"}
    assert any(
        "the whole network, the backbone at 1 x lr" in n and "LP-FT" not in n for n in default["notes"]
    )
    lpft = run_label_efficiency(
        _params(project, "train.init_probe_epochs=1", "train.epochs=4", "train.init_backbone_lr_scale=0.1"),
        ssl_run=run.run_id, settings=settings,
    ).report  # fmt: skip
    assert lpft["settings"]["finetune_probe_share"] == 0.25
    assert any("LP-FT: the head alone for 25% of the epochs" in n and "0.1 x lr" in n for n in lpft["notes"])


@pytest.mark.slow
def test_same_seed_same_loss_curve_through_ray(project: Path, ray_runtime: None) -> None:
    params = _params(project, "ssl.max_images=96")
    first = run_pretrain(params, epochs=2, progress=False)
    second = run_pretrain(params, epochs=2, progress=False)
    assert first.run_id != second.run_id and first.losses == second.losses


def _kill_mid_epoch(
    events: Path, ray_results: Path, *, older: set[Path], killed: list[tuple[int, int]], stop: threading.Event
) -> None:
    """After Ray Train registered a checkpoint of a run not in ``older``, SIGKILL the worker (by PID)
    inside its next epoch."""
    registered_at = None
    while not stop.is_set():
        if registered_at is None:
            if {p.parent for p in ray_results.glob("pretrain-*/checkpoint_manager_snapshot.json")} - older:
                registered_at = time.time()
        elif events.exists():
            rows = [json.loads(line) for line in events.read_text().splitlines()]
            later = [e for e in rows if e["phase"] == "mid_epoch" and e["time"] > registered_at]
            if later:
                os.kill(later[0]["pid"], signal.SIGKILL)
                killed.append((later[0]["pid"], later[0]["epoch"]))
                return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_killed_pretraining_worker_resumes_on_the_same_curve(
    ci_project: Path, ray_runtime: None, tmp_path: Path, method: str
) -> None:
    """BYOL: the target network and its EMA momentum (a function of the step) resume with the rest."""
    project = ci_project
    params = _params(project, "ssl.batch_size=64", "train.max_failures=1", f"ssl.method={method}")
    reference = run_pretrain(params, epochs=3, progress=False)
    events, killed, stop = tmp_path / "events.jsonl", list[tuple[int, int]](), threading.Event()
    killer = threading.Thread(
        target=_kill_mid_epoch, args=(events, project / ".imgflow" / "ray_results"),
        kwargs={"older": set((project / ".imgflow" / "ray_results").glob("pretrain-*")), "killed": killed,
                "stop": stop},
    )  # fmt: skip
    killer.start()
    try:
        resumed = run_pretrain(params, epochs=3, progress=False, ray_options=RayOptions(worker_events=events))
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1, "the worker was never seen inside an epoch after a checkpoint"
    starts = [json.loads(line) for line in events.read_text().splitlines() if '"start"' in line]
    assert [s["start_epoch"] for s in starts][0] == 0 and 1 <= starts[-1]["start_epoch"] <= killed[0][1]
    # The killed epoch ran again from the last checkpoint: each epoch once, on the uninterrupted curve.
    assert len(resumed.losses) == 3 and resumed.losses == pytest.approx(reference.losses, rel=1e-6)


@pytest.mark.slow
def test_supervised_training_from_the_backbone(project: Path, ray_runtime: None) -> None:
    from components.pipeline.stages import run_train

    pretrained = run_pretrain(_params(project, "ssl.max_images=96"), epochs=1, progress=False)
    params = _params(
        project, f"train.init=ssl:{pretrained.run_id}", "train.epochs=2", "train.init_probe_epochs=1"
    )
    trained = run_train(params, progress=False)
    assert trained.epochs == 2 and trained.final["val_accuracy"] >= 0.0
