"""The repo's dvc.yaml really drives the pipeline: repro, no-op repro, and param-scoped reruns."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, write_small_params

pytestmark = pytest.mark.e2e


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(cwd / ".prefect"))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


def test_dvc_repro_reruns_only_what_changed(copy_repo_files) -> None:
    project = copy_repo_files("dvc.yaml", "components")
    # Gates at 0: this test is about DVC staleness; a tiny 1-epoch model would fail real gates (exit 3).
    # One corruption family, no attacks, no MNIST OOD reference in its two evaluate runs (dvc.yaml
    # still gets every declared output): the e2e pipeline run (tests/pipeline/test_pipeline_e2e.py)
    # checks the full sweeps.
    write_small_params(
        project, max_per_class=12, epochs=1, train={"workers": 1}, gates={"min_accuracy": 0.0},
        evaluate={"robustness": {"max_images": 30, "families": ["contrast"]}, "adversarial": {"enabled": False}},
        ood={"reference": "none"},
    )  # fmt: skip
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        assert _run(cmd, project).returncode == 0
    shutil.copy2(REPO / ".dvc" / "config", project / ".dvc" / "config")  # the repo's default local remote

    first = _run([str(BIN / "dvc"), "repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _ran(first.stdout) == {"ingest", "validate", "audit", "baseline", "train", "evaluate", "register"}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    manifest_md5 = next(
        o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/manifest.parquet"
    )
    run = yaml.safe_load((project / "outputs/train/run.json").read_text())
    assert run["data_version"] == manifest_md5  # the MLflow run records DVC's hash of the manifest

    second = _run([str(BIN / "dvc"), "repro"], project)
    assert second.returncode == 0 and _ran(second.stdout) == set(), second.stdout

    # An evaluate param: evaluate and what reads its outputs run again; the model is not retrained.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["robustness"]["max_images"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([str(BIN / "dvc"), "repro"], project)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert _ran(third.stdout) == {"evaluate", "register"}
    assert yaml.safe_load((project / "outputs/train/run.json").read_text()) == run  # the same training run

    metrics = _run([str(BIN / "dvc"), "metrics", "show", "--json"], project)
    assert metrics.returncode == 0 and "accuracy" in metrics.stdout

    push = _run([str(BIN / "dvc"), "push"], project)  # no credentials: a local-folder remote
    assert push.returncode == 0, push.stderr
    remote = project / ".imgflow" / "dvc-remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 24  # the image store, manifest, model
