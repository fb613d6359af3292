"""The command line as a user meets it: instant help, clear errors, documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from components.data.manifest import DataPaths, read_manifest, write_manifest
from tests.conftest import REPO, run_cli, write_small_params


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'timm', 'mlflow', 'ray', 'prefect', 'great_expectations') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


EXIT = """
import atexit, gc, sys
from pathlib import Path

out = Path(sys.argv[1])
atexit.register(lambda: out.write_text(str(gc.get_freeze_count())))  # before main's: runs after it
sys.argv = ["imgflow", "models", "--help"]
from flows.cli import main

main()
"""


def test_exit_freezes_what_is_alive_after_the_other_exit_handlers(tmp_path: Path) -> None:
    """The CLI's last exit handler freezes the objects still alive (the interpreter's final collections
    then skip them: seconds with torch and Prefect loaded); the handlers registered before it still run,
    with the frozen objects intact."""
    out = tmp_path / "frozen.txt"
    run = subprocess.run([sys.executable, "-c", EXIT, str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--params" in run.stdout
    assert int(out.read_text()) > 1000


def test_every_command_has_help_with_params_and_set() -> None:
    for cmd in ("ingest", "validate", "train", "evaluate", "register", "pipeline", "models"):
        proc = run_cli(cmd, "--help", cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert "--params" in proc.stdout and "--set" in proc.stdout and "--json" in proc.stdout


def test_unknown_key_is_exit_2_naming_it(tmp_path: Path) -> None:
    proc = run_cli("ingest", "--set", "ingest.max_per_clas=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "ingest.max_per_clas: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("validate", cwd=tmp_path)
    assert proc.returncode == 2 and "run `imgflow ingest` first" in proc.stderr


def test_ingest_json_then_validation_failure_is_exit_4(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=6)
    proc = run_cli("ingest", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ingested"] == 120 and summary["seen"] == summary["ingested"] + summary["quarantined"]
    ok = run_cli("validate", "--json", cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["success"] is True
    # Break the data: every 'Bag' in val disappears, so a class is missing from a split.
    data = DataPaths(tmp_path / "data")
    df = read_manifest(data.manifest)
    write_manifest(pd.DataFrame(df[~((df["split"] == "val") & (df["label"] == "Bag"))]), data.manifest)
    bad = run_cli("validate", cwd=tmp_path)
    assert bad.returncode == 4
    assert "class_present_in_val" in bad.stderr and "Bag" in bad.stderr
    assert (tmp_path / "outputs/validate/report.html").read_text().count("FAILED") >= 1
