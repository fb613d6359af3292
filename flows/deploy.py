"""A Prefect deployment of the pipeline flow with a cron schedule, run by a process work pool.

The deployment's code source is the *project* folder (where ``params.yaml``, ``data/`` and
``outputs/`` live); the flow itself is imported by module path (``flows.pipeline.pipeline``) from
the installed imgflow package. A worker started anywhere that has imgflow installed and sees the
project folder runs it: ``prefect worker start --pool <pool>``. ``prefect.yaml`` in the repo
declares the same deployment for ``prefect deploy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENTRYPOINT = "flows.pipeline.pipeline"
DEFAULT_NAME = "weekly-retrain"
DEFAULT_POOL = "imgflow-process"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool ``name`` (with the process worker's default job template) if it
    does not exist. Returns True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return True
    if pool.type != "process":
        from components.core.errors import ConfigError

        raise ConfigError(
            f"work pool {name!r} exists with type {pool.type!r}; pass a process pool (--work-pool)"
        )
    return False


def deploy_pipeline(
    *,
    cron: str = DEFAULT_CRON,
    name: str = DEFAULT_NAME,
    work_pool: str = DEFAULT_POOL,
    project_dir: Path,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
    timezone: str = "UTC",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create (or update) the deployment ``imgflow-pipeline/<name>`` on the server at
    ``$PREFECT_API_URL`` with a cron schedule; returns its id, schedule and how to run it."""
    from prefect.schedules import Cron

    from components.core.errors import ConfigError
    from flows.pipeline import pipeline

    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as e:
        raise ConfigError(f"bad --cron {cron!r} / --timezone {timezone!r}: {e}") from None
    created_pool = ensure_process_pool(work_pool)
    project_dir = project_dir.resolve()
    source = pipeline.from_source(source=str(project_dir), entrypoint=ENTRYPOINT)
    deployment_id = source.deploy(
        name=name,
        work_pool_name=work_pool,
        schedules=[schedule],
        parameters={"params_path": params_path, "overrides": list(overrides or []), "force": force},
        job_variables={"env": dict(env or {})},
        description=f"imgflow pipeline on {project_dir} ({params_path}); retrains only when data or params changed",
        tags=["imgflow"],
        build=False,
        push=False,
        print_next_steps=False,
    )
    full_name = f"{pipeline.name}/{name}"
    return {
        "deployment_id": str(deployment_id),
        "name": full_name,
        "cron": cron,
        "timezone": timezone,
        "work_pool": work_pool,
        "work_pool_created": created_pool,
        "project_dir": str(project_dir),
        "worker": f"prefect worker start --pool {work_pool}",
        "run_now": f"prefect deployment run '{full_name}'",
    }
