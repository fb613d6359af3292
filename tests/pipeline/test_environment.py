"""The entry points read the environment and pass values down; the components never read it."""

from __future__ import annotations

import re

from components.core.config import params_from_dict
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
