"""The scheduled no-op of issue 21 on its own: ``imgflow pipeline`` with nothing changed must answer
"up to date" within 5 s of flow run (Prefect's start excluded), on all 70,000 Fashion-MNIST images.

:mod:`bench.bench_pipeline` times one no-op after its two full trainings (~35 minutes on 2 cores). This
one gets there in minutes: a fresh project with the repo's ``params.yaml``, the whole dataset, and a
1-epoch model without the corruption sweep and the attacks, the gates open (a no-op does not depend on
the recipe; only a champion makes the next run one). Then ``imgflow pipeline`` ``REPEATS`` times,
nothing changed, each a fresh process with the same ``--set``s; each run's stage seconds come from the
project's Prefect database, as in :mod:`bench.bench_pipeline`. The figures are the medians.

``--quick``: 100 images per class (a smoke test; ``passed`` is null).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.bench_pipeline import NOOP_FLOW_TARGET_S, QUICK_GATES, QUICK_PER_CLASS, REPO, _noop, _run

REPEATS = 3
OVERRIDES = ("train.epochs=1", "evaluate.robustness.enabled=false", "evaluate.adversarial.enabled=false")


def _write_params(project: Path, *, quick: bool) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["gates"].update(QUICK_GATES)
    if quick:
        params["ingest"]["max_per_class"] = QUICK_PER_CLASS
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(quick: bool = False) -> dict[str, Any]:
    overrides = list(OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-noop-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        _write_params(project, quick=quick)
        print(
            f"training a champion: imgflow pipeline {' '.join('--set ' + o for o in overrides)}", flush=True
        )
        first = _run(project, overrides)
        if first["status"] != "trained":
            raise RuntimeError(f"the first run did not train a champion: {first}")
        runs = [_noop(project, overrides) for _ in range(REPEATS)]
    if any(r["status"] != "up to date" for r in runs):
        raise RuntimeError(f"a second run was not a no-op: {[r['status'] for r in runs]}")

    def median(key: str, stage: str | None = None) -> float:
        return statistics.median(r["stages"].get(stage, 0.0) if stage else r[key] for r in runs)

    flow = median("flow_s")
    figures = [
        {"name": "no-op flow run (Prefect start excluded), median", "value": flow, "unit": "s",
         "target": f"<= {NOOP_FLOW_TARGET_S:.0f}", "passed": None if quick else flow <= NOOP_FLOW_TARGET_S},
        {"name": "no-op wall, median", "value": median("wall_s"), "unit": "s", "target": "", "passed": None},
        *({"name": f"no-op stage {stage}, median", "value": median("", stage), "unit": "s", "target": "",
           "passed": None} for stage in ("before_flow", "ingest", "freshness", "after_flow")),
    ]  # fmt: skip
    return {"quick": quick, "overrides": overrides, "training_run_wall_s": first["wall_s"], "runs": runs,
            "figures": figures}  # fmt: skip
