"""Per-image cost of each pipeline stage: wall time and peak memory, measured at two sizes.

Runs the real `imgflow` commands (ingest, validate, audit, train, evaluate, predict) in a fresh
project at two dataset sizes (Fashion-MNIST capped per class and split) and fits, per stage,
``cost = fixed + per_image x images`` through the two points: the fixed part is process start, imports,
Ray start-up and model set-up; the slope is what grows with the data. Memory is the peak resident set
of the command's whole process tree (driver, Ray's processes and workers), sampled every 0.1 s.

The projections to 1M and 100M images are arithmetic on these slopes (labelled so in the output):
they assume the per-image cost stays linear, which is exactly what breaks first at scale (see
docs/scaling.md). ``images`` per stage is what the stage touches: the whole dataset for ingest,
validate, audit and predict; the train split x epochs for train; the test split for evaluate.

Usage: ``python -m bench.stage_costs [--quick]`` (writes bench/results/stage_costs.json and prints a
table). Default sizes: 50 and 150 images per class and split (1,000 and 3,000 images); ``--quick``:
20 and 60.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IMGFLOW = str(Path(sys.executable).parent / "imgflow")
STAGES = ("ingest", "validate", "audit", "train", "evaluate", "predict")
PROJECTIONS = (1_000_000, 100_000_000)
_NEEDED = ("ingest", "train")
"""Stages whose output a later stage reads: run (unmeasured) even when not asked for."""


def _params(project: Path, per_class: int) -> None:
    """params.yaml of the repo with the dataset capped, one training epoch, no champion comparison,
    and the gates open (evaluate's exit code is not what is measured)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["max_per_class"] = per_class
    params["train"].update(epochs=1)
    params["evaluate"]["compare_champion"] = False
    params["gates"].update(min_accuracy=0.0, min_class_recall=0.0, max_ece=1.0, min_relative_robustness=0.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _sample_tree(proc: psutil.Process, cpu: dict[int, float]) -> int:
    """The tree's resident set now (bytes); records each process's CPU seconds so far in ``cpu``."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # ended between the listing and the read
            total += p.memory_info().rss
            times = p.cpu_times()
            cpu[p.pid] = times.user + times.system
    return total


def _measure(args: list[str], cwd: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one command and every process it starts.

    CPU seconds (user + system, summed over the tree, each process as last seen by the 0.1 s
    sampling) are what to read on a shared machine: wall time there depends on the other load."""
    env = dict(os.environ, PREFECT_HOME=str(cwd / ".prefect"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    log = cwd / f"{args[0]}.log"
    with open(log, "w") as out:  # a file, not a pipe: a chatty command never blocks on a full pipe
        t0 = time.perf_counter()
        proc = subprocess.Popen([IMGFLOW, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watched, peak, cpu = psutil.Process(proc.pid), 0, dict[int, float]()
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, _sample_tree(watched, cpu))
            time.sleep(0.1)
        seconds = time.perf_counter() - t0
    output = log.read_text()
    if proc.returncode not in (0, 3):  # 3: gates failed, still a full evaluation
        raise RuntimeError(f"imgflow {' '.join(args)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": sum(cpu.values()), "peak_rss_mib": peak / 2**20}


def _counts(project: Path) -> dict[str, int]:
    """Images each stage touches, from the ingested dataset."""
    import pandas as pd

    manifest = pd.read_parquet(project / "data" / "manifest.parquet", columns=["split"])
    splits = manifest["split"].value_counts().to_dict()
    total = len(manifest)
    return {"ingest": total, "validate": total, "audit": total, "train": int(splits.get("train", 0)),
            "evaluate": int(splits.get("test", 0)), "predict": total}  # fmt: skip


def _disk(project: Path) -> dict[str, int]:
    store = sum(p.stat().st_size for p in (project / "data" / "store").rglob("*") if p.is_file())
    return {"store_bytes": store, "manifest_bytes": (project / "data" / "manifest.parquet").stat().st_size}


def _stage_args(stage: str) -> list[str]:
    if stage == "predict":
        return [
            "predict",
            "data/store",
            "--model",
            "outputs/train/model",
            "--out",
            "outputs/predictions.parquet",
        ]
    return [stage]


def measure_size(per_class: int, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """``stages`` once each, in pipeline order, in a fresh project capped at ``per_class`` images per
    class and split (a stage left out is still run when a later one needs its output, unmeasured)."""
    with tempfile.TemporaryDirectory(prefix="imgflow-costs-") as tmp:
        project = Path(tmp)
        _params(project, per_class)
        measured: dict[str, dict[str, float]] = {}
        last = max(STAGES.index(s) for s in stages)
        for stage in STAGES[: last + 1]:
            if stage not in stages and stage not in _NEEDED:
                continue
            result = _measure(_stage_args(stage), project)
            if stage in stages:
                measured[stage] = result
                print(f"  {per_class}/class {stage}: {result}", flush=True)
        counts, disk = _counts(project), _disk(project)
        shutil.rmtree(project / ".imgflow", ignore_errors=True)
    for stage in measured:
        measured[stage]["images"] = counts[stage]
    return {"per_class": per_class, "images": counts["ingest"], "stages": measured, "disk": disk}


def fit(small: dict[str, Any], large: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage: fixed + per-image seconds and MiB through the two sizes, and the projections."""
    out: dict[str, dict[str, float]] = {}
    for stage in large["stages"]:
        a, b = small["stages"][stage], large["stages"][stage]
        dn = b["images"] - a["images"]
        per_image_s = (b["seconds"] - a["seconds"]) / dn
        per_image_cpu = (b["cpu_seconds"] - a["cpu_seconds"]) / dn
        per_image_mib = (b["peak_rss_mib"] - a["peak_rss_mib"]) / dn
        fixed_s = a["seconds"] - per_image_s * a["images"]
        row = {"fixed_s": fixed_s, "per_image_ms": per_image_s * 1e3, "per_image_cpu_ms": per_image_cpu * 1e3,
               "fixed_cpu_s": a["cpu_seconds"] - per_image_cpu * a["images"], "per_image_kib": per_image_mib * 1024,
               "peak_rss_mib_large": b["peak_rss_mib"]}  # fmt: skip
        for n in PROJECTIONS:  # extrapolated, single process/node as measured
            row[f"extrapolated_hours_{n}"] = (
                fixed_s + per_image_s * n * b["images"] / large["images"]
            ) / 3600
        out[stage] = row
    dn = large["images"] - small["images"]
    for key in ("store_bytes", "manifest_bytes"):
        out.setdefault("disk", {})[f"{key}_per_image"] = (large["disk"][key] - small["disk"][key]) / dn
    return out


def _table(fitted: dict[str, dict[str, float]]) -> str:
    head = (
        "stage",
        "fixed s",
        "ms/image",
        "CPU ms/image",
        "KiB/image",
        "peak MiB",
        "1M h (extrap.)",
        "100M h (extrap.)",
    )
    rows = [head]
    for stage in (s for s in STAGES if s in fitted):
        r = fitted[stage]
        rows.append((stage, f"{r['fixed_s']:.1f}", f"{r['per_image_ms']:.2f}", f"{r['per_image_cpu_ms']:.2f}",
                     f"{r['per_image_kib']:.1f}",
                     f"{r['peak_rss_mib_large']:.0f}", f"{r['extrapolated_hours_1000000']:.2f}",
                     f"{r['extrapolated_hours_100000000']:.0f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 and 60 images per class and split")
    parser.add_argument(
        "--sizes", type=int, nargs=2, metavar="N", help="images per class and split, two sizes"
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to measure")
    parser.add_argument("--out", default="stage_costs", help="result name (bench/results/<out>.json)")
    args = parser.parse_args()
    sizes = args.sizes or ((20, 60) if args.quick else (50, 150))
    stages = tuple(s for s in STAGES if s in args.stages)
    t0 = time.perf_counter()
    small, large = (measure_size(n, stages) for n in sizes)
    fitted = fit(small, large)
    result = {
        "name": "stage_costs", "sizes": [small, large], "fitted": fitted, "wall_s": time.perf_counter() - t0,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                    "memory_gib": psutil.virtual_memory().total / 2**30},
        "note": "fixed/per-image from two sizes; the 1M/100M hours are extrapolated, one process/node",
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(_table(fitted))
    disk = fitted["disk"]
    print(
        f"store {disk['store_bytes_per_image']:.0f} B/image, manifest {disk['manifest_bytes_per_image']:.0f} B/row"
    )
    print(f"results: {RESULTS / args.out}.json")


if __name__ == "__main__":
    main()
