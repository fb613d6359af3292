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
  (passed down as a value, never folded into the params, so it is never logged with them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from components.core.config import Params

if TYPE_CHECKING:
    from components.train.ray_adapter import RayOptions

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")
WEBHOOK_ENV = "IMGFLOW_WEBHOOK_URL"
SERVE_TOKEN_ENV = "IMGFLOW_SERVE_TOKEN"


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
