"""infra/: what can be checked without a container engine or a cluster.

- compose.yaml parses; every service it names (depends_on, YAML anchors merged), volume and env file
  exists; every ``${VAR}`` it interpolates is in ``.env.example``; bind-mounted files exist.
- The Kubernetes manifests validate against Kubernetes' own schemas (kubernetes-validate, bundled,
  offline, strict: unknown fields are errors). The RayCluster custom resource is validated against a
  vendored structural subset of KubeRay's CRD schema, and each of its pod templates against
  Kubernetes' PodTemplateSpec schema.
- Every file the Dockerfile COPYs exists in its build context; the image installs the lock.
"""

from __future__ import annotations

import json
import re
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | dict) else [value]


def test_compose_references_only_defined_services_volumes_and_env_files(compose: dict) -> None:
    services, volumes = compose["services"], set(compose.get("volumes", {}))
    assert {
        "postgres",
        "minio",
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "ray-head",
        "ray-worker",
    } <= set(services)
    for name, svc in services.items():
        for dep in _as_list(svc.get("depends_on")):
            assert dep in services, f"{name} depends on undefined service {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                assert (INFRA / source).resolve().exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undefined volume {source}"
        for env_file in _as_list(svc.get("env_file")):
            assert env_file == ".env", f"{name}: env file {env_file} (only infra/.env is read)"
        if "build" in svc:
            context = (INFRA / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file()
    # Secrets come from infra/.env: never committed, its template is.
    assert (INFRA / ".env.example").is_file()
    assert {"infra/.env", "/infra/.env"} & set((REPO / ".gitignore").read_text().split())
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", (INFRA / "compose.yaml").read_text()))
    used |= set(re.findall(r"\$\$\{([A-Z_][A-Z0-9_]*)\}", (INFRA / "compose.yaml").read_text()))
    example = {
        line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line
    }
    assert used and used <= example, f"not in .env.example: {sorted(used - example)}"


def test_compose_publishes_ports_on_loopback_only(compose: dict) -> None:
    ports = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)


def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_their_schemas() -> None:
    docs = _k8s_docs()
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"]
    for _name, doc in docs:
        if doc["kind"] == "RayCluster":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # A broken manifest is caught (the check is real): a typo'd field and a wrong type.
    _, deployment = next((n, d) for n, d in docs if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_raycluster_has_cpu_and_gpu_groups_and_valid_pod_templates() -> None:
    schema = json.loads((INFRA / "k8s" / "schemas" / "raycluster-v1.schema.json").read_text())
    (ray,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    jsonschema.Draft202012Validator(schema).validate(ray)
    spec = ray["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"])
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in groups.values())]
    for template in templates:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(ray))
    bad["spec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-cpus": 4}  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_every_file_the_dockerfile_copies_exists() -> None:
    copies = [shlex.split(rest) for op, rest in _dockerfile_instructions() if op == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the build context"
    runs = " ".join(rest for op, rest in _dockerfile_instructions() if op == "RUN")
    assert "-r requirements.lock" in runs and "pip install --no-deps ." in runs
    extra = (INFRA / "docker" / "requirements-infra.txt").read_text()
    assert all("==" in line.split("#")[0] for line in extra.splitlines() if line.split("#")[0].strip())


def test_readme_explains_how_to_point_imgflow_at_the_services() -> None:
    text = (INFRA / "README.md").read_text()
    for needle in (
        "RAY_ADDRESS",
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "dvc remote",
        "compose.yaml",
        "k8s/",
    ):
        assert needle in text, needle
