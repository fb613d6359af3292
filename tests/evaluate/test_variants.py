"""Deployment variants: every row measured on the same real images, finite numbers, rows added by callers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from components.core.config import load_params
from components.evaluate.variants import (
    Variant,
    cpu_features,
    format_table,
    predictor_preprocess,
    variants_section,
)
from components.model.checkpoint import Predictor
from tests.conftest import fmnist_arrays


def msp_variant(predictor: Predictor) -> Variant:
    """A caller's own row (as the distilled student and the ensemble add theirs): the fp32 model with
    one minus its top probability as OOD score."""
    import torch

    def proba(x: np.ndarray) -> np.ndarray:
        return predictor.score_batch(torch.from_numpy(x)).probs

    return Variant("fp32 + msp", "PyTorch", 1, predictor_preprocess(predictor), proba,
                   lambda x: 1 - proba(x).max(1), note="caller-made")  # fmt: skip


def test_every_variant_measured_on_the_same_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    from components.core.jsonio import write_json
    from components.evaluate.gate_report import add_variants_section
    from components.pipeline.models import run_variants
    from tests.model.test_embedding_store import write_data_dir

    x, y = fmnist_arrays("t10k", 140)
    write_data_dir(tmp_path / "data", x, y, ["val"] * 40 + ["test"] * 100)
    params = load_params("params.yaml", [f"project.data_dir={tmp_path / 'data'}",
                                         f"project.output_dir={tmp_path / 'out'}"])  # fmt: skip
    extra = msp_variant(Predictor.from_dir(tiny_model_dir))
    table = run_variants(params, model=str(tiny_model_dir), repeats=3, threads=1, extra=[extra])
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["fp32", "fp32 ONNX", "int8 ONNX", "flip-TTA", "fp32 + msp"]
    assert table["images"] == 100 and table["threads"] == 1 and table["batch"] == 64
    for r in rows.values():
        lat = r["latency_ms"]
        numbers = [r["accuracy"], r["nll"], r["ece"], lat["1"]["p50"], lat["1"]["p95"], lat["64"]["p50"]]
        assert all(math.isfinite(v) and v >= 0 for v in numbers) and r["size_bytes"] > 0
        assert lat["1"]["p50"] <= lat["1"]["p95"]
    # the same model three ways: the same decisions; ONNX = PyTorch to float precision
    assert rows["fp32 ONNX"]["accuracy"] == rows["fp32"]["accuracy"] == rows["fp32 + msp"]["accuracy"]
    assert rows["fp32 ONNX"]["nll"] == pytest.approx(rows["fp32"]["nll"], abs=1e-4)
    assert abs(rows["int8 ONNX"]["accuracy"] - rows["fp32"]["accuracy"]) <= 0.05
    assert rows["fp32 ONNX"]["size_bytes"] >= 3 * rows["int8 ONNX"]["size_bytes"]
    # no detector in the tiny model: no AUROC for the standard rows (and no OOD images loaded for them)
    assert all(rows[n]["ood_auroc"] is None for n in ("fp32", "fp32 ONNX", "int8 ONNX", "flip-TTA"))
    assert table["ood_images"] == 0 and rows["fp32 + msp"]["ood_auroc"] is None
    saved = json.loads((tmp_path / "out" / "variants" / "variants.json").read_text())
    assert saved["rows"] == table["rows"] and "gate_report" not in saved["files"]
    text = format_table(table)
    assert "avx512_vnni" in text and all(name in text for name in rows)
    html = variants_section(table)
    assert html is not None and html.title == "Deployment variants" and "int8 ONNX" in html.body
    # with an evaluate report present, the table becomes its "Deployment variants" section
    assert add_variants_section(tmp_path / "none", table) is None
    write_json(tmp_path / "report" / "report.json", minimal_report())
    page = add_variants_section(tmp_path / "report", table)
    assert page is not None and "Deployment variants" in page.read_text() and "int8 ONNX" in page.read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["variants"]["rows"] == table["rows"]


def minimal_report() -> dict:
    """The smallest report.json the gate report renders: a passed verdict, no evidence sections."""
    metrics = dict.fromkeys(("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "nll", "brier"), 0.5)
    return {"verdict": "PASSED", "passed": True, "task": "singlelabel", "context": {"model": "tiny"}, "gates": [],
            "not_applicable": [], "metrics": {**metrics, "n": 100, "per_class": []}}  # fmt: skip


def test_ood_auroc_of_a_row_with_an_ood_score(tiny_model_dir: Path) -> None:
    from components.evaluate.variants import (
        LatencyConfig,
        VariantData,
        measure_variants,
        torch_threads,
    )
    from tests.conftest import png_bytes

    x, y = fmnist_arrays("t10k", 60)
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    data = VariantData([png_bytes(a) for a in x], y, [png_bytes(a) for a in noise], "noise")
    with torch_threads(1):
        table = measure_variants([msp_variant(Predictor.from_dir(tiny_model_dir))], data,
                                 latency=LatencyConfig(repeats=3, warmup=1, batch=8))  # fmt: skip
    row = table.rows[0]
    assert row.ood_auroc is not None and 0.0 <= row.ood_auroc <= 1.0 and table.ood_images == 40
    assert set(row.latency_ms) == {"1", "8"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    cpu = cpu_features(info)
    assert cpu["model"] == "Test CPU" and cpu["flags"]["avx512_vnni"] and not cpu["flags"]["amx_int8"]
    assert cpu_features(tmp_path / "missing") == {"model": "unknown", "flags": {}}


def test_compare_puts_another_model_in_the_same_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``imgflow variants --compare``: another model (a distilled student, an ensemble) is a row measured on
    the same images; a model with other classes is refused naming both class lists."""
    import shutil

    from components.core.errors import ConfigError
    from components.pipeline.models import run_variants
    from tests.model.test_embedding_store import write_data_dir

    x, y = fmnist_arrays("t10k", 90)
    write_data_dir(tmp_path / "data", x, y, ["val"] * 30 + ["test"] * 60)
    params = load_params("params.yaml", [f"project.data_dir={tmp_path / 'data'}",
                                         f"project.output_dir={tmp_path / 'out'}"])  # fmt: skip
    table = run_variants(
        params, model=str(tiny_model_dir), repeats=3, threads=1, compare=[str(tiny_model_dir)]
    )
    rows = {r["name"]: r for r in table["rows"]}
    assert rows[str(tiny_model_dir)]["accuracy"] == rows["fp32"]["accuracy"] and table["images"] == 60
    assert rows[str(tiny_model_dir)]["size_bytes"] > 0
    other = tmp_path / "other-classes"
    shutil.copytree(tiny_model_dir, other)
    spec = json.loads((other / "model.json").read_text())
    spec["classes"] = [f"renamed {c}" for c in spec["classes"]]
    (other / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="differ from the compared model"):
        run_variants(params, model=str(tiny_model_dir), repeats=3, threads=1, compare=[str(other)])
