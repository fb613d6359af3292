"""The data contract: inferred from the first accepted version, later versions validated against it;
quality judged relative to the dataset; imbalance warns."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.core.config import Params, params_from_dict
from components.core.errors import ConfigError, ValidationFailedError
from components.data.manifest import MANIFEST_COLUMNS, DataPaths, DatasetInfo, read_manifest, write_manifest
from components.quality.contract import (
    QUANTILES,
    compare_to_contract,
    infer_contract,
    load_contract,
    write_contract,
)
from components.quality.validation import quality_cutoffs
from tests.conftest import REPO, run_cli


def _repo_validate_section() -> dict:
    """The validate section of the repo's params.yaml: the defaults a new user gets."""
    return yaml.safe_load((REPO / "params.yaml").read_text())["validate"]


def _synthetic_manifest(n: int, *, seed: int, classes: tuple[str, ...] = ("a", "b", "c")) -> pd.DataFrame:
    """``n`` manifest rows whose image properties are drawn from fixed distributions (no images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image_id = hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()
        rows.append({
            "image_id": image_id, "path": f"store/{image_id[:2]}/{image_id}.png", "label": classes[i % len(classes)],
            "labels": [classes[i % len(classes)]], "width": 64, "height": 64, "mode": "L", "bytes": 900,
            "split": ("train", "train", "train", "val", "test")[i % 5], "source": "synthetic",
            "source_path": f"s/{i}", "decode_ok": True, "aspect": 1.0, "channels": 1, "bit_depth": 8,
            "brightness": float(rng.beta(4, 6)), "contrast": float(rng.uniform(0.1, 0.3)),
            "blur": float(rng.lognormal(3.0, 0.5)), "phash": image_id[:16],
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return df.astype(
        {"width": "int32", "height": "int32", "bytes": "int64", "channels": "int32", "bit_depth": "int32"}
    )


# --------------------------------------------------------------------------- distribution shift


def test_contract_passes_a_resampled_version_and_flags_a_brightness_shift() -> None:
    contract = infer_contract(_synthetic_manifest(600, seed=0), classes=("a", "b", "c"), data_version="v1")
    assert contract.images == 600 and contract.class_shares == {"a": 0.33333, "b": 0.33333, "c": 0.33333}
    assert len(contract.distributions["brightness"]) == len(QUANTILES) and contract.modes == {"L": 1.0}
    same = compare_to_contract(_synthetic_manifest(300, seed=1), contract)
    assert not same.features["shifted"].any(), same.features
    assert same.new_classes == () and same.vanished_classes == () and same.shares["change"].max() < 0.01
    darker = _synthetic_manifest(300, seed=2)
    darker["brightness"] = darker["brightness"] * 0.75  # an exposure change: 25 % darker
    shifted = compare_to_contract(darker, contract).features.set_index("feature")
    assert set(shifted.index[shifted["shifted"]]) == {
        "brightness",
        "embedding",
    }  # contrast and blur did not move
    row = shifted.loc["brightness"]
    assert row["p_value"] < 1e-6 and row["statistic"] > 0.2 and row["psi"] > 0.25


# --------------------------------------------------------------------------- the stage, end to end


def _smooth_grey(rng: np.random.Generator, level: float) -> np.ndarray:
    """300x300 smooth texture (upsampled 6x6 noise): low Laplacian variance, like cast metal."""
    coarse = rng.normal(level, 18.0, size=(6, 6)).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((300, 300), Image.Resampling.BICUBIC))


@pytest.fixture()
def inspection_project(tmp_path: Path) -> Params:
    """An ingested image folder of 300x300 smooth grey images, 15:1 imbalance (150 ok, 10 defect)."""
    from components.data.ingest import ingest

    rng = np.random.default_rng(0)
    for label, n, level in (("ok", 150, 120.0), ("defect", 10, 100.0)):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_smooth_grey(rng, level)).save(folder / f"{i:03d}.png")
    ingest(f"imagefolder:{tmp_path / 'images'}", data_dir=tmp_path / "data", seed=0)
    return params_from_dict({
        "project": {"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "outputs"),
                    "state_dir": str(tmp_path / ".imgflow")},
        "validate": _repo_validate_section(),
    })  # fmt: skip


def test_imbalanced_smooth_large_grey_images_pass_then_the_contract_guards_later_versions(
    inspection_project: Params,
) -> None:
    from components.pipeline.stages import run_contract_accept, run_validate

    params = inspection_project
    data = DataPaths(params.project.data_dir)
    contract_file = params.project.data_dir.parent / "data_contract.yaml"  # validate.contract: auto
    assert params.validate_.contract_path(params.project.data_dir) == contract_file
    df = read_manifest(data.manifest)
    assert (df["width"] == 300).all() and (df["blur"] < 20).mean() > 0.5  # "blurry" by the old absolute cut
    result = run_validate(params)  # first version: passes with warnings, writes the contract
    assert result.success and "class_imbalance" in result.warnings
    assert "blurry_fraction" not in result.warnings and result.contract.startswith("wrote")
    report = json.loads(result.report_json.read_text())
    assert report["contract"] == {"status": "written", "path": str(contract_file)}
    imbalance = next(o for o in report["outcomes"] if o["name"] == "class_imbalance")
    assert (
        "train.loss: logit_adjusted" in imbalance["description"]
        and "train.sampler: balanced" in imbalance["description"]
    )
    contract = load_contract(contract_file)
    assert contract is not None and contract.classes == ("defect", "ok")
    # The old absolute cut-off would have refused it: most images are below blur_below (20), the
    # limit is max_blurry_fraction (5 %); judged against this dataset's own spread none is an outlier.
    assert quality_cutoffs(df, params.validate_)["blur_below"] < df["blur"].min()

    # A later version: a new class appears, and the camera got darker.
    new = df.copy()
    new.loc[new.index[:12], "label"] = "scratch"
    new["brightness"] = new["brightness"] * 0.6
    write_manifest(new, data.manifest)
    DatasetInfo(**{**json.loads(data.dataset.read_text()), "classes": ("defect", "ok", "scratch")}).save(
        data.dataset
    )
    with pytest.raises(ValidationFailedError) as failed:
        run_validate(params)
    text = str(failed.value)
    assert "label_in_contract" in text and "scratch" in text and "imgflow contract accept" in text
    assert "no_shift_from_contract" in text and "brightness" in text
    checked = json.loads(result.report_json.read_text())["contract"]  # every test, in the report too
    assert checked["status"] == "checked" and checked["new_classes"] == ["scratch"]
    assert {f["feature"] for f in checked["features"] if f["shifted"]} >= {"brightness"}
    assert "<h2>Data contract</h2>" in result.report_html.read_text()
    # Accepting re-infers it from this version (the checks a user edited are kept).
    raw = yaml.safe_load(contract_file.read_text())
    raw["checks"]["max_share_change"] = 0.2
    contract_file.write_text(yaml.safe_dump(raw))
    accepted = run_contract_accept(params)
    assert accepted["classes"] == ["defect", "ok", "scratch"]
    again = load_contract(contract_file)
    assert again is not None and "scratch" in again.classes and again.checks.max_share_change == 0.2


# --------------------------------------------------------------------------- bad edits


def test_bad_contract_edits_are_exit_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "data_contract.yaml"
    write_contract(path, infer_contract(_synthetic_manifest(30, seed=3), classes=("a", "b", "c")))
    raw = yaml.safe_load(path.read_text())
    raw["checks"]["alpah"] = 0.05  # a typo
    raw["checks"]["max_psi"] = "lots"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"validate": {"contract": str(path)}}))
    proc = run_cli("contract", "show", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "checks.alpah: unknown key" in proc.stderr and "checks.max_psi" in proc.stderr
    assert "Traceback" not in proc.stderr
    raw = yaml.safe_load(path.read_text())
    del raw["checks"]["alpah"], raw["checks"]["max_psi"]
    raw["distributions"]["brightness"] = list(reversed(raw["distributions"]["brightness"]))
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"distributions: .*brightness: quantiles must not decrease"):
        load_contract(path)
    path.write_text("classes: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_contract(path)


def test_the_same_images_train_at_the_size_auto_chose_above_28px(
    inspection_project: Params, tmp_path: Path
) -> None:
    """The issue's other half: the recipe resolved on these real 300x300 images (auto) is a pretrained
    backbone above 28 px with imbalance handling, and the trainer's own model and loaders take a real
    optimisation step at that size (finite loss, weights move)."""
    import torch
    import torch.nn.functional as F

    from components.core.config import TrainConfig
    from components.train import torch_recipe as tr
    from components.train.auto_recipe import Device, resolve_for_data
    from components.train.recipe import build_recipe

    data = DataPaths(inspection_project.project.data_dir)
    resolved = resolve_for_data(TrainConfig(batch_size=4), data, device=Device(threads=2))
    cfg = resolved.config
    assert cfg.input_size > 28 and cfg.pretrained and cfg.loss == "logit_adjusted"
    recipe = build_recipe(cfg, data, seed=0, weights_dir=tmp_path / "weights")
    model, spec = tr.build_model(recipe)
    train_loader, _ = tr.build_loaders(recipe, spec.data_config)
    x, y = next(iter(train_loader))
    assert tuple(x.shape[-2:]) == (cfg.input_size, cfg.input_size) and x.shape[1] == 1
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
