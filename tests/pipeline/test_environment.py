"""The entry points read the environment and pass values down; the components never read it."""

from __future__ import annotations

import re
from pathlib import Path

from components.core.config import load_params, params_from_dict
from flows.environment import behind_proxy, ray_options, with_environment
from tests.conftest import REPO


def test_mlflow_tracking_uri_fills_an_unset_register_tracking_uri() -> None:
    params = params_from_dict({})  # defaults: register.tracking_uri is None
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert with_environment(params, env).register_.tracking_uri == "http://127.0.0.1:5000"
    assert with_environment(params, {}).register_.tracking_uri is None
    explicit = params_from_dict({"register": {"tracking_uri": "sqlite:///x.db"}})
    assert with_environment(explicit, env).register_.tracking_uri == "sqlite:///x.db"  # params win
    assert with_environment(params, env).train == params.train  # nothing else changes


def test_proxy_and_ray_options_come_from_the_given_environment() -> None:
    assert behind_proxy({"HTTPS_PROXY": "http://proxy:3128"}) and behind_proxy({"https_proxy": "x"})
    assert not behind_proxy({"HTTPS_PROXY": ""}) and not behind_proxy({})
    options = ray_options(verbose=True, environ={"RAY_ADDRESS": "127.0.0.1:6379"})
    assert options.address == "127.0.0.1:6379" and options.verbose
    assert ray_options(environ={}).address is None


def test_no_component_outside_the_ray_adapter_reads_the_environment() -> None:
    """``components/`` takes settings as arguments; only the Ray adapter sets Ray's own variables."""
    reads = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "components").rglob("*.py"))
        if path.name != "ray_adapter.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if reads.search(line.split("#")[0])
    ]
    assert offenders == []


def test_prefect_environment_one_home_per_project(tmp_path: Path) -> None:
    """Without a Prefect of the user's, runs use the project's own home (``<state_dir>/prefect``), the
    database ``make ui`` serves; a user's API URL, home or profile is left alone; the project's running
    ``make ui`` server is reported to directly."""
    import os

    from flows.environment import prefect_environment

    state = tmp_path / "state"
    params = load_params(REPO / "params.yaml", [f"project.state_dir={state}"])
    user = tmp_path / "user"
    assert prefect_environment(params, {}, user_home=user) == {"PREFECT_HOME": str(state / "prefect")}
    assert prefect_environment(params, {"PREFECT_API_URL": "http://127.0.0.1:1/api"}, user_home=user) == {}
    assert prefect_environment(params, {"PREFECT_HOME": str(tmp_path)}, user_home=user) == {}
    (user / ".prefect").mkdir(parents=True)
    (user / ".prefect" / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://127.0.0.1:2/api"\n'
    )
    assert prefect_environment(params, {}, user_home=user) == {}
    assert prefect_environment(params, {"PREFECT_PROFILE": "other"}, user_home=user)["PREFECT_HOME"]
    ui = state / "ui"
    ui.mkdir(parents=True)
    (ui / "prefect_api_url").write_text("http://127.0.0.1:4200/api\n")
    (ui / "pids").write_text(f"prefect {os.getpid()}\nmlflow {os.getpid()}\n")  # a live process
    live = prefect_environment(params, {}, user_home=tmp_path)
    assert live == {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    (ui / "pids").write_text("prefect 999999999\n")  # not alive: back to the project's home
    assert prefect_environment(params, {}, user_home=tmp_path) == {"PREFECT_HOME": str(state / "prefect")}
