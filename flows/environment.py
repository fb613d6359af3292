"""What imgflow takes from the environment, read here in the entry points and passed down as values:
the components below never read environment variables themselves.

- ``$MLFLOW_TRACKING_URI``: the MLflow store when ``register.tracking_uri`` is unset (folded into
  the params, so every stage and ``imgflow tune`` use it);
- ``$HTTPS_PROXY`` / ``$https_proxy`` / ``$ALL_PROXY``: a proxy stands between imgflow and the
  hub, so the CLIP baseline does not judge the hub unreachable by a direct probe;
- ``$RAY_ADDRESS``, ``$IMGFLOW_RAY_DASHBOARD``, ``$IMGFLOW_WORKER_EVENTS``: which Ray to use and
  what it shows (:class:`components.train.ray_adapter.RayOptions`);
- ``$IMGFLOW_WEBHOOK_URL``: where the notify task posts when ``notify.webhook_url`` is unset (passed
  to the task as a value, not folded into the params, so it is never logged with them);
- ``$IMGFLOW_SERVE_TOKEN``: the bearer token ``imgflow serve`` requires when ``serve.token`` is unset
  (passed down as a value, never folded into the params, so it is never logged with them);
- ``$PREFECT_API_URL`` / ``$PREFECT_HOME`` / ``$PREFECT_PROFILE``: which Prefect the flows report to. When
  the user names none, the project's own home ``<state_dir>/prefect`` (or the server ``make ui`` runs for
  the project) is used, so ad-hoc runs, scheduled runs and ``make ui`` share one history
  (:func:`prefect_environment`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from components.core.config import Params

if TYPE_CHECKING:
    from components.train.ray_adapter import RayOptions

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")
WEBHOOK_ENV = "IMGFLOW_WEBHOOK_URL"
SERVE_TOKEN_ENV = "IMGFLOW_SERVE_TOKEN"
PREFECT_API_ENV = "PREFECT_API_URL"
PREFECT_HOME_ENV = "PREFECT_HOME"
UI_API_FILE = "prefect_api_url"
"""Written by ``scripts/ui.sh`` under ``<state_dir>/ui/`` while its Prefect server runs."""


def with_environment(params: Params, environ: Mapping[str, str] = os.environ) -> Params:
    """``params`` with ``register.tracking_uri`` taken from ``$MLFLOW_TRACKING_URI`` when the params
    leave it unset (an explicit value in params.yaml or ``--set`` wins)."""
    uri = environ.get(TRACKING_URI_ENV)
    if params.register_.tracking_uri or not uri:
        return params
    register = params.register_.model_copy(update={"tracking_uri": uri})
    return params.model_copy(update={"register_": register})


def webhook_url(params: Params, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where notifications go: ``notify.webhook_url``, else ``$IMGFLOW_WEBHOOK_URL``; None: nowhere."""
    return params.notify.webhook_url or environ.get(WEBHOOK_ENV) or None


def serve_token(params: Params, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token ``imgflow serve`` requires: ``serve.token``, else ``$IMGFLOW_SERVE_TOKEN``; None: open."""
    return params.serve.token or environ.get(SERVE_TOKEN_ENV) or None


def behind_proxy(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a proxy is configured for outgoing HTTPS."""
    return any(environ.get(name) for name in PROXY_ENVS)


def ray_options(*, verbose: bool = False, environ: Mapping[str, str] = os.environ) -> RayOptions:
    """Which Ray to use and what it shows; ``verbose``: Ray's own INFO lines on the console."""
    from components.train.ray_adapter import RayOptions

    return RayOptions.from_env(environ, verbose=verbose)


def prefect_environment(
    params: Params, environ: Mapping[str, str] = os.environ, *, user_home: Path | None = None
) -> dict[str, str]:
    """The Prefect variables to set before Prefect is imported, so every run of this project lands in one
    history: nothing when the user chose a Prefect (``$PREFECT_API_URL``, ``$PREFECT_HOME``, or an API URL
    in the active profile of ``~/.prefect/profiles.toml``); the API of the server ``make ui`` runs for
    this project when it is up; else ``PREFECT_HOME=<state_dir>/prefect``, the home whose database the
    ephemeral runs write and ``make ui`` later serves."""
    if environ.get(PREFECT_API_ENV) or environ.get(PREFECT_HOME_ENV):
        return {}
    if _profile_api_url(user_home or Path.home(), environ.get("PREFECT_PROFILE")):
        return {}
    state = Path(params.project.state_dir).resolve()
    ui_api = _running_ui_api(state / "ui")
    if ui_api:
        return {PREFECT_API_ENV: ui_api}
    return {PREFECT_HOME_ENV: str(state / "prefect")}


def _profile_api_url(user_home: Path, profile: str | None) -> str | None:
    """The API URL the user's active Prefect profile sets, if any (an unreadable file counts as none)."""
    url = prefect_profile(user_home / ".prefect" / "profiles.toml", profile).get(PREFECT_API_ENV)
    return str(url) if url else None


def prefect_profile(profiles: Path, profile: str | None) -> dict[str, object]:
    """The settings of the active profile (``profile``, else the file's ``active``, else Prefect's
    default ``ephemeral``) in the Prefect profiles file ``profiles``; {} when it is unreadable or has none."""
    try:
        data = tomllib.loads(profiles.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    settings = data.get("profiles", {}).get(profile or data.get("active") or "ephemeral", {})
    return settings if isinstance(settings, dict) else {}


def _running_ui_api(ui_dir: Path) -> str | None:
    """The API URL of the project's ``make ui`` Prefect server when its recorded process is alive."""
    try:
        url = (ui_dir / UI_API_FILE).read_text().strip()
        pids = dict(line.split()[:2] for line in (ui_dir / "pids").read_text().splitlines() if line.strip())
        os.kill(int(pids["prefect"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return url or None
