"""Promotion against a real `mlflow server` on 127.0.0.1 (and the local sqlite store): aliases as
stages, refusal of failed gates, the promotion lock under concurrency, the log, rollback, and a
server that goes away mid-way."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from components.core.errors import TrackingError
from components.registry import promotion_log, registry, tracking
from components.registry.registry import CANDIDATE, CHALLENGER, CHAMPION
from tests.conftest import (
    BIN,
    REPO,
    free_port,
    run_cli,
    start_mlflow_server,
    stop_process_group,
    write_small_params,
)

FAST = registry.Retry(attempts=2, backoff_s=0.1)


def _use(uri: str, tmp_path: Path) -> None:
    tracking.configure(uri, state_dir=tmp_path)


def _new_version(
    name: str, *, passed: bool, failed: str = "", artifacts: Path | None = None, record: bool = True
) -> str:
    """A registered version with the gate tags run_register writes, recorded as run_register does
    (``record=False``: not recorded, no alias moved, nothing logged).

    ``artifacts``: where a local (sqlite) store keeps artifacts; a server uses its own."""
    client = MlflowClient()
    exp = tracking.ensure_experiment("registry-tests", artifact_root=artifacts)
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    tags = {"gates_passed": str(passed).lower(), "failed_gates": failed, "test_accuracy": "0.9000"}
    mv = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )
    if record:
        registry.record_registration(name, str(mv.version), gates_passed=passed, retry=FAST)
    return str(mv.version)


def test_aliases_promote_refuse_force_rollback_and_log(mlflow_server: dict, tmp_path: Path) -> None:
    _use(mlflow_server["uri"], tmp_path)
    name = "reg-flow"
    v1 = _new_version(name, passed=True)
    v2 = _new_version(name, passed=False, failed="min_accuracy")
    assert registry.aliases(name) == {CANDIDATE: v2, CHALLENGER: v1, CHAMPION: None}

    registry.promote(name, v1, reason="first")
    with pytest.raises(registry.PromotionRefusedError, match="did not pass its gates.*min_accuracy"):
        registry.promote(name, v2)
    with pytest.raises(registry.PromotionRefusedError, match="--force needs --reason"):
        registry.promote(name, v2, force=True)
    with pytest.raises(registry.PromotionRefusedError, match="no version 99"):
        registry.promote(name, "99")
    assert registry.aliases(name)[CHAMPION] == v1  # refusals move nothing

    forced = registry.promote(name, v2, force=True, reason="hotfix approved by QA")
    assert forced["forced"] is True and forced["from"] == v1
    v3 = _new_version(name, passed=True)
    registry.promote(name, v3)
    assert registry.aliases(name) == {CANDIDATE: v3, CHALLENGER: v3, CHAMPION: v3}

    assert registry.rollback(name, reason="v3 misbehaves")["to"] == v2
    assert registry.rollback(name)["to"] == v1  # one further back
    with pytest.raises(registry.PromotionRefusedError, match="no previous champion"):
        registry.rollback(name)

    log = registry.read_log(name)
    champion_moves = [(e["action"], e["from"], e["to"]) for e in log if e["alias"] == CHAMPION]
    assert champion_moves == [
        ("promote", None, v1), ("promote", v1, v2), ("promote", v2, v3),
        ("rollback", v3, v2), ("rollback", v2, v1),
    ]  # fmt: skip
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    forced_entry = next(e for e in log if e.get("forced"))
    assert forced_entry["why"] == "hotfix approved by QA" and forced_entry["gates"]["failed"] == [
        "min_accuracy"
    ]
    assert all(e["who"] and e["when"] for e in log)
    # The lock is released after every move (no registered model left behind).
    assert not MlflowClient().search_registered_models(f"name='{name}{registry.LOCK_SUFFIX}'")


def test_lock_excludes_concurrent_writers(mlflow_server: dict, tmp_path: Path) -> None:
    """Read-modify-write of a counter under the lock from 6 threads: no update is lost."""
    _use(mlflow_server["uri"], tmp_path)
    name = "reg-lock"
    client = MlflowClient()
    client.create_registered_model(name, tags={"counter": "0"})
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            barrier.wait()
            for _ in range(2):
                with registry.promotion_lock(name, retry=FAST):
                    n = int(client.get_registered_model(name).tags["counter"])
                    client.set_registered_model_tag(name, "counter", str(n + 1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert client.get_registered_model(name).tags["counter"] == "12"


class _CreateRacesARelease(MlflowClient):
    """The first create of the lock gets the answer MLflow's SQL store gives when the lock existed
    at insert time and its holder deleted it before the store's follow-up lookup (seen in CI)."""

    raced = False

    def create_registered_model(self, name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.endswith(registry.LOCK_SUFFIX) and not self.raced:
            self.raced = True
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
        return super().create_registered_model(name, *args, **kwargs)


def test_lock_retries_when_a_release_races_the_take(mlflow_server: dict, tmp_path: Path) -> None:
    _use(mlflow_server["uri"], tmp_path)
    client = _CreateRacesARelease()
    with registry.promotion_lock("reg-lock-race", client=client, retry=FAST, timeout_s=10) as token:
        held = client.get_registered_model(f"reg-lock-race{registry.LOCK_SUFFIX}").tags
        assert client.raced and held["token"] == token
    assert not client.search_registered_models(f"name='reg-lock-race{registry.LOCK_SUFFIX}'")


def test_concurrent_promotions_exactly_one_wins(mlflow_server: dict, tmp_path: Path) -> None:
    """Two pipelines evaluated against champion v1 finish together: one becomes champion, the
    other is told it lost, and the alias and the log agree on the winner."""
    _use(mlflow_server["uri"], tmp_path)
    name = "reg-race"
    base = _new_version(name, passed=True)
    registry.promote(name, base)
    for _ in range(2):  # two rounds: either thread may win
        current = registry.aliases(name)[CHAMPION]
        outcome = _race(name, [_new_version(name, passed=True), _new_version(name, passed=True)], current)
        winners = [v for v, r in outcome.items() if isinstance(r, dict)]
        losers = [v for v, r in outcome.items() if isinstance(r, registry.PromotionConflictError)]
        assert len(winners) == 1 and len(losers) == 1, outcome
        assert registry.aliases(name)[CHAMPION] == winners[0]
        last = [e for e in registry.read_log(name) if e["alias"] == CHAMPION][-1]
        assert (last["from"], last["to"]) == (current, winners[0])


def _race(name: str, versions: list[str], expected: str | None) -> dict[str, object]:
    """Promote ``versions`` at once from threads, each expecting ``expected`` as the champion."""
    barrier = threading.Barrier(len(versions))
    outcome: dict[str, object] = {}

    def go(version: str) -> None:
        barrier.wait()
        try:
            outcome[version] = registry.promote(name, version, expected_from=expected, retry=FAST)
        except registry.PromotionConflictError as e:
            outcome[version] = e

    threads = [threading.Thread(target=go, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcome


def test_stale_lock_of_a_dead_holder_is_broken(mlflow_server: dict, tmp_path: Path) -> None:
    _use(mlflow_server["uri"], tmp_path)
    name = "reg-stale"
    v1 = _new_version(name, passed=True)
    MlflowClient().create_registered_model(
        f"{name}{registry.LOCK_SUFFIX}", tags={"token": "dead", "owner": "crashed", "expires": "1"}
    )
    assert registry.promote(name, v1, lock_timeout_s=10)["to"] == v1


@pytest.mark.slow  # two extra server starts
def test_server_down_fails_clearly_and_moves_no_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    store, port = tmp_path / "store", free_port()
    proc = start_mlflow_server(store, port)
    try:
        _use(f"http://127.0.0.1:{port}", tmp_path)
        name = "reg-down"
        v1 = _new_version(name, passed=True)
        registry.promote(name, v1)
        v2 = _new_version(name, passed=True)
        log_before = registry.read_log(name)
    finally:
        stop_process_group(proc)
    with pytest.raises(TrackingError, match=r"MLflow call failed .*Is the tracking server"):
        registry.promote(name, v2, retry=FAST)
    with pytest.raises(TrackingError):
        registry.rollback(name, retry=FAST)
    proc = start_mlflow_server(store, port)  # the same store
    try:
        assert registry.aliases(name) == {CANDIDATE: v2, CHALLENGER: v2, CHAMPION: v1}
        assert registry.read_log(name) == log_before
    finally:
        stop_process_group(proc)


def test_local_sqlite_store_promotes_under_the_lock(tmp_path: Path) -> None:
    _use(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    name = "reg-local"
    art = tmp_path / "artifacts"
    v1, v2 = _new_version(name, passed=True, artifacts=art), _new_version(name, passed=True, artifacts=art)
    outcome = _race(name, [v1, v2], None)
    won = [r for r in outcome.values() if isinstance(r, dict)]
    assert len(won) == 1 and registry.aliases(name)[CHAMPION] == won[0]["to"], outcome
    other = v2 if won[0]["to"] == v1 else v1
    registry.promote(name, other)
    assert registry.rollback(name)["to"] == won[0]["to"]


@pytest.mark.slow  # four CLI processes (~6 s each even on an idle machine)
def test_cli_promote_rollback_history(mlflow_server: dict, tmp_path: Path) -> None:
    _use(mlflow_server["uri"], tmp_path)
    write_small_params(tmp_path)  # register.model_name: imgflow-test
    name = "imgflow-test"
    v1, v2 = _new_version(name, passed=True), _new_version(name, passed=False, failed="max_ece")
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}

    ok = run_cli("promote", v1, "--json", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["to"] == v1
    refused = run_cli("promote", v2, cwd=tmp_path, env=env)
    assert (
        refused.returncode == 2 and "did not pass its gates" in refused.stderr and "max_ece" in refused.stderr
    )
    registry.promote(name, v2, force=True, reason="QA signed off")  # (the CLI flags map 1:1)
    back = run_cli("rollback", "--reason", "bad canary", cwd=tmp_path, env=env)
    assert back.returncode == 0 and f"-> {v1}" in back.stdout, back.stderr
    hist = run_cli("models", "history", "--json", cwd=tmp_path, env=env)
    assert hist.returncode == 0, hist.stderr
    moves = [(e["action"], e["to"], e["why"]) for e in json.loads(hist.stdout) if e["alias"] == CHAMPION]
    assert moves == [("promote", v1, None), ("promote", v2, "QA signed off"), ("rollback", v1, "bad canary")]
    table = run_cli("models", cwd=tmp_path, env=env)
    assert table.returncode == 0 and "champion" in table.stdout


# --------------------------------------------------------------------------- the registry page


def _promotion_runs(name: str) -> list:
    exp = MlflowClient().get_experiment_by_name(promotion_log.experiment_name(name))
    assert exp is not None, "no promotions experiment"
    return MlflowClient().search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_log_is_one_run_per_event_not_model_tags(
    mlflow_server: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each alias move is a finished run in ``<name>-promotions`` whose name and params say what
    moved; the registered model carries no log tags; nothing is printed (no "View run" lines)."""
    _use(mlflow_server["uri"], tmp_path)
    name = "reg-page"
    v1, v2 = _new_version(name, passed=True), _new_version(name, passed=False, failed="max_ece")
    registry.promote(name, v1, reason="first champion")
    registry.promote(name, v2, force=True, reason="QA signed off")
    registry.rollback(name, reason="canary errors")
    capfd.readouterr()

    log = registry.read_log(name)
    runs = _promotion_runs(name)
    assert [json.loads(r.data.tags[promotion_log.ENTRY_TAG]) for r in runs] == log
    assert [r.info.run_name for r in runs if r.data.params["alias"] == CHAMPION] == [
        f"#{log[-3]['seq']} champion: none → v{v1} (promote)",
        f"#{log[-2]['seq']} champion: v{v1} → v{v2} (promote, forced)",
        f"#{log[-1]['seq']} champion: v{v2} → v{v1} (rollback)",
    ]
    forced = runs[-2].data.params
    assert forced == {**forced, "action": "promote", "version": v2, "previous": v1, "reason": "QA signed off",
                      "forced": "true", "gates_passed": "false", "failed_gates": "max_ece"}  # fmt: skip
    assert forced["actor"] == registry.default_actor()
    assert all(r.info.status == "FINISHED" for r in runs)
    note = runs[-2].data.tags["mlflow.note.content"]
    assert "**Forced**" in note and "Reason: QA signed off" in note and "FAILED (`max_ece`)" in note
    tags = MlflowClient().get_registered_model(name).tags
    assert not [k for k in tags if k.startswith(registry.LOG_PREFIX)]
    assert "View run" not in capfd.readouterr().out

    # Deleting the experiment in the UI neither erases nor renumbers the log: the next move restores it.
    exp = MlflowClient().get_experiment_by_name(promotion_log.experiment_name(name))
    MlflowClient().delete_experiment(exp.experiment_id)
    assert registry.read_log(name) == log
    registry.promote(name, v2, force=True, reason="again")
    assert MlflowClient().get_experiment(exp.experiment_id).lifecycle_stage == "active"
    assert [e["seq"] for e in registry.read_log(name)] == list(range(1, len(log) + 2))


def _legacy_entry(seq: int, action: str, alias: str, frm: str | None, to: str) -> dict:
    """An entry as the tag-based log (before the promotions experiment) wrote it."""
    return {"seq": seq, "action": action, "alias": alias, "from": frm, "to": to, "who": "ops@old-host",
            "when": f"2026-01-0{seq}T10:00:00+00:00", "why": "legacy", "forced": False,
            "gates": {"passed": True, "failed": [], "test_accuracy": "0.9000", "test_mAP": None}}  # fmt: skip


def test_old_tag_log_is_read_then_moved_into_runs(mlflow_server: dict, tmp_path: Path) -> None:
    """A registry written by the tag-based log: read as it is, rollback follows it, and the first
    write under the lock copies its entries into runs (same seq and time) and removes the tags -- also
    when an earlier copy was cut short (a run exists for an entry whose tag is still there)."""
    _use(mlflow_server["uri"], tmp_path)
    name, client = "reg-legacy", MlflowClient()
    v1, v2 = _new_version(name, passed=True, record=False), _new_version(name, passed=True, record=False)
    old = [_legacy_entry(1, "promote", CHAMPION, None, v1), _legacy_entry(2, "promote", CHAMPION, v1, v2)]
    for e in old:
        client.set_registered_model_tag(name, f"{registry.LOG_PREFIX}{e['seq']:06d}", json.dumps(e))
    client.set_registered_model_alias(name, CHAMPION, v2)
    assert registry.read_log(name) == old

    # A copy cut short earlier: entry 1 already has its run, its tag is still there.
    exp_id = promotion_log.ensure_experiment(client, name, FAST)
    promotion_log._write_run(client, name, exp_id, old[0], FAST)
    assert registry.read_log(name) == old  # no duplicate

    back = registry.rollback(name, reason="after the upgrade")
    assert (back["seq"], back["from"], back["to"]) == (3, v2, v1)
    log = registry.read_log(name)
    assert log[:2] == old and log[2]["why"] == "after the upgrade"
    assert not [k for k in client.get_registered_model(name).tags if k.startswith(registry.LOG_PREFIX)]
    runs = _promotion_runs(name)
    assert sorted(int(r.data.params["seq"]) for r in runs) == [1, 2, 3]
    assert runs[0].info.start_time == int(datetime.fromisoformat(old[0]["when"]).timestamp()) * 1000 + 1


CARD = {"task": "single-label", "classes": ("T-shirt/top", "Trouser", "Shirt"), "data_version": "d41d8cd9",
        "git_commit": "0123456789abcdef", "headline": "accuracy 0.9312"}  # fmt: skip


def _training_run() -> tuple[str, str]:
    """A training run holding a (stand-in) logged model and gate report: (run id, model uri)."""
    client = MlflowClient()
    run = client.create_run(tracking.ensure_experiment("registry-tests"))
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.log_text(run.info.run_id, "<h1 id=verdict>PASSED</h1>", "evaluate/report.html")
    return run.info.run_id, f"{run.info.artifact_uri}/model"


def test_register_version_describes_the_model_and_returns_the_record(
    mlflow_server: dict, tmp_path: Path
) -> None:
    _use(mlflow_server["uri"], tmp_path)
    name, client = "reg-described", MlflowClient()
    failed_card = registry.ModelCard(
        **CARD, gates_passed=False, gate_verdict="FAILED: 1 of 5 gates failed (min_class_recall[Shirt]).",
        failed_gates=("recall of 'Shirt' 0.58 < 0.60",),
    )  # fmt: skip
    run_id, uri = _training_run()
    reg = registry.register_version(uri, name=name, run_id=run_id, tags={"gates_passed": "false"},
                                    card=failed_card, auto_promote=True, retry=FAST)  # fmt: skip
    assert (reg.version, reg.aliases, reg.gates_passed, reg.promoted) == ("1", (CANDIDATE,), False, False)
    assert reg.to_dict() == {
        "name": name, "version": "1", "aliases": [CANDIDATE], "model_uri": uri, "run_id": run_id,
        "champion_uri": f"models:/{name}@champion", "promotion": {"promoted": False},
        "gates_passed": False, "failed_gates": ["recall of 'Shirt' 0.58 < 0.60"],
    }  # fmt: skip

    described = client.get_model_version(name, "1").description
    experiment = client.get_run(run_id).info.experiment_id
    assert described.startswith("Gates: FAILED — 1 of 5 gates failed (min_class_recall[Shirt]).")
    assert "- recall of 'Shirt' 0.58 < 0.60" in described and "`d41d8cd9`" in described
    assert f"(#/experiments/{experiment}/runs/{run_id}/artifacts/evaluate/report.html)" in described
    assert f"[{run_id}](#/experiments/{experiment}/runs/{run_id})" in described
    assert "T-shirt/top, Trouser, Shirt" in described and "single-label, 3 classes" in described

    passed_card = registry.ModelCard(
        **CARD, gates_passed=True, gate_verdict="PASSED: all 5 blocking gates hold."
    )
    run_id, uri = _training_run()
    reg = registry.register_version(uri, name=name, run_id=run_id, tags={"gates_passed": "true"},
                                    card=passed_card, auto_promote=True, expected_from=None, retry=FAST)  # fmt: skip
    assert (reg.version, reg.aliases, reg.promoted) == ("2", (CANDIDATE, CHALLENGER, CHAMPION), True)
    assert reg.to_dict()["promotion"] == {"promoted": True, "from": None}
    model = client.get_registered_model(name).description
    log_exp = client.get_experiment_by_name(promotion_log.experiment_name(name)).experiment_id
    assert f"[{name}-promotions](#/experiments/{log_exp}/runs)" in model
    assert (
        "**single-label**, 3 classes" in model and "[version 2](#/models/reg-described/versions/2)" in model
    )
    assert "gates passed" in model

    run_id, uri = _training_run()  # evaluated against v1, but v2 is champion now
    reg = registry.register_version(uri, name=name, run_id=run_id, tags={"gates_passed": "true"},
                                    card=passed_card, auto_promote=True, expected_from="1", retry=FAST)  # fmt: skip
    assert (reg.version, reg.promoted, reg.aliases) == ("3", False, (CANDIDATE, CHALLENGER))
    assert "another promotion won" in (reg.conflict or "") and registry.aliases(name)[CHAMPION] == "2"


@pytest.mark.slow  # its own server, a dozen registry calls, three Chromium page loads (~1.5 min)
def test_registry_pages_render_readably_in_chromium(tmp_path: Path) -> None:
    """scripts/screenshot_mlflow.py --demo: the model page shows its rendered description and no
    promotion-log JSON, a failed version's page its gate verdict, the promotions experiment a run per
    move (skipped without Chromium, like the other screenshot checks)."""
    out = tmp_path / "model.png"
    shot = subprocess.run(
        [str(BIN / "python"), str(REPO / "scripts" / "screenshot_mlflow.py"), "--demo", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = [json.loads(line) for line in shot.stdout.splitlines() if line.startswith("{")]
    if results and results[0]["status"] == "skipped":
        pytest.skip(results[0]["reason"])
    assert shot.returncode == 0 and [r["status"] for r in results] == ["ok"] * 3, shot.stdout + shot.stderr
    for r in results:
        assert Path(r["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
