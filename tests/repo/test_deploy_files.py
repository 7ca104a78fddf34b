"""The deployment files, validated offline with real parsers and schemas (no Docker, no Kubernetes).

- docker-compose.yml: the official Compose Specification JSON schema (vendored by check-jsonschema),
  with Compose's variable interpolation applied from deploy/compose.env.example, plus what the schema
  cannot see: variables, depends_on, volumes, the shared /data volume, GPUs, secrets, Ray auth.
- deploy/kuberay/: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict mode, the newest
  Kubernetes version it bundles) for the Deployment, Service, ConfigMap, Secrets and the claim.
  The KubeRay RayCluster CRD schema itself is NOT available offline (no package on PyPI ships it):
  the RayCluster's pod templates are validated as real Kubernetes PodTemplateSpecs, and its own
  fields against an explicit allow-list of KubeRay ray.io/v1 field names and types (the long-stable
  subset of RayClusterSpec, HeadGroupSpec, WorkerGroupSpec and AutoscalerOptions).
- deploy/ray-cluster.yaml: Ray's own `ray up` validation (prepare_config + validate_config against
  ray/autoscaler/ray-schema.json of the installed Ray).
- deploy/docker/Dockerfile: parsed with dockerfile-parse; its only Python install step is the README's
  set-up command.
- Every `ray start` flag used anywhere is an option of the installed `ray start`, and every DG2PF_*
  variable is a field (or alias) of dg2pf_service.settings.Settings.

Each check is a function returning a list of problems (tests/support/: deploy_files, compose_checks,
kubernetes_checks, ray_up_checks, dockerfile_checks); the negative cases here mutate a loaded document
and assert that the validator or checker rejects it, so no check can pass vacuously.
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from compose_checks import (
    MissingVariable,
    compose_problems,
    compose_schema_errors,
    compose_validator,
    compose_variables,
    env_map,
    example_env,
    interpolate,
    interpolated_compose,
    parse_env_file,
    raw_compose,
)
from deploy_files import (
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    HEALTHCHECK,
    KUBERAY,
    REQUIRED_SECRETS,
    ROOT,
    START_API,
    VERSION,
    load_yaml_all,
    problems_or_exception,
    settings_env_names,
    settings_from,
    unknown_dg2pf_names,
)
from dockerfile_checks import dockerfile_env, dockerfile_problems, readme_setup_command
from kubernetes_checks import k8s_docs, k8s_errors, kuberay_problems, raycluster_problems
from ray_up_checks import ray_up_config, ray_up_problems, ray_up_validate

# --------------------------------------------------------------------------- compose


def test_compose_matches_the_official_compose_schema():
    validator = compose_validator()
    assert type(validator) is jsonschema.Draft202012Validator  # what the schema's $schema names
    assert compose_schema_errors(raw_compose()) == []
    assert compose_schema_errors(interpolated_compose()) == []


def _case_id(value: Any) -> str:
    """Test ids from the expected message (mutations are functions: no id of their own)."""
    return value.replace("/", ":") if isinstance(value, str) else ""


def _mutate(path: str, value: Any = None, *, delete: bool = False, rename: str | None = None):
    def apply(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if rename is not None:
            node[rename] = node.pop(last)
        elif delete:
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
        return doc

    return apply


@pytest.mark.parametrize(
    "mutation",
    [
        _mutate("services/api/healthcheck", rename="healthchek"),
        _mutate("volumes", rename="volume"),
        _mutate("services/api/depends_on/postgres/condition", "service_healty"),
        _mutate("services/ray-worker-gpu/deploy/resources/reservations/devices/0/capabilities", delete=True),
        _mutate("services/ray-head/healthcheck/interval", 10),
        _mutate("services/postgres/ports", {"5432": 5432}),
    ],
    ids=[
        "misspelled-service-key",
        "misspelled-top-level-key",
        "bad-depends-on-condition",
        "gpu-device-without-capabilities",
        "interval-not-a-duration",
        "ports-as-mapping",
    ],
)
def test_compose_schema_rejects_broken_documents(mutation):
    assert compose_schema_errors(mutation(interpolated_compose()))


def test_compose_semantics():
    assert compose_problems(interpolated_compose()) == []


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (_mutate("services/ray-worker/volumes", ["scratch:/data"]), "does not mount dg2pf-data"),
        (_mutate("services/api/volumes/0", "dg2pf-data:/srv/data"), "does not mount dg2pf-data"),
        (_mutate("services/api/volumes", ["dg2pf-data:/data", "scratch:/scratch"]), "not declared"),
        (_mutate("services/api/depends_on/redis", {"condition": "service_started"}), "no service"),
        (_mutate("services/ray-head/healthcheck", delete=True), "has no healthcheck"),
        (_mutate("services/api/environment/DG2PF_RAY_ADDRESS", "ray-head:6380"), "GCS"),
        (_mutate("services/ray-head/environment/DG2PF_API_TOKENS", "t"), "API's secrets"),
        (_mutate("services/ray-worker/env_file", [".env"]), "API's secrets"),
        (_mutate("services/ray-worker/environment/RAY_AUTH_TOKEN", "other"), "RAY_AUTH_TOKEN"),
        (_mutate("services/ray-head/environment/RAY_AUTH_MODE", "disabled"), "RAY_AUTH_MODE"),
        (_mutate("services/ray-worker-gpu/deploy/resources/reservations/devices/0/driver", "amd"), "nvidia"),
        (_mutate("services/ray-worker-gpu/profiles", ["gpu", "default"]), "gpu profile"),
        (_mutate("services/ray-head/command/5", "--dashboard-hots=0.0.0.0"), "no option --dashboard-hots"),
        (_mutate("services/ray-worker/container_name", "worker"), "--scale"),
        (_mutate("services/api/healthcheck/test", ["CMD", "curl", "-f", "http://localhost:8000/healthz"]), "curl"),
    ],
    ids=_case_id,
)
def test_compose_semantics_reject_broken_documents(mutation, expected):
    problems = problems_or_exception(lambda: compose_problems(mutation(interpolated_compose())))
    assert any(expected in problem for problem in problems), problems


def test_env_example_defines_every_compose_variable():
    used = compose_variables(raw_compose())
    defined = parse_env_file(ENV_EXAMPLE.read_text())
    assert sorted(set(used) - set(defined)) == [], "used in docker-compose.yml, missing from the env example"
    assert sorted(set(defined) - set(used)) == [], "in the env example, unused by docker-compose.yml"
    # .env holds the secrets: never in git, never in the image's build context.
    assert "/.env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in DOCKERIGNORE.read_text().split()
    # The secrets are required wherever they are used, and the example ships none.
    for secret in REQUIRED_SECRETS:
        assert used[secret] == {":?"}, f"{secret} must always be ${{{secret}:?message}}"
        assert defined[secret] == "", f"the env example must not ship a value for {secret}"


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_compose_fails_clearly_without_a_secret(secret):
    env = example_env()
    env[secret] = ""
    with pytest.raises(MissingVariable, match=rf"{secret} is missing a value: set {secret} in \.env"):
        interpolated_compose(env=env)


def test_a_variable_missing_from_the_env_example_is_caught():
    doc = raw_compose()
    doc["services"]["api"]["environment"]["DG2PF_SERVE_MAX_REPLICAS"] = "${DG2PF_SERVE_MAX_REPLICA:-2}"
    assert "DG2PF_SERVE_MAX_REPLICA" in set(compose_variables(doc)) - set(parse_env_file(ENV_EXAMPLE.read_text()))


def test_interpolation_follows_the_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate("$$HOME ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+a} ${EMPTY+a}", env)
        == "$HOME v v d d  a a"
    )
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?no}", env)
    assert interpolate("${EMPTY?no}", env) == ""


# --------------------------------------------------------------------------- DG2PF_* settings


def script_dg2pf_names(path: Path) -> set[str]:
    return set(re.findall(r"\bDG2PF_[A-Z0-9_]+\b", path.read_text()))


def all_dg2pf_names() -> dict[str, set[str]]:
    compose = interpolated_compose()
    k8s = {
        d["kind"] + "/" + d["metadata"]["name"]: d
        for f in ("config.yaml", "api.yaml")
        for d in load_yaml_all(KUBERAY / f)
    }
    api_container = k8s["Deployment/dg2pf-api"]["spec"]["template"]["spec"]["containers"][0]
    return {
        "docker-compose.yml": {k for s in compose["services"].values() for k in env_map(s)},
        "deploy/compose.env.example": set(parse_env_file(ENV_EXAMPLE.read_text())),
        "deploy/kuberay ConfigMap": set(k8s["ConfigMap/dg2pf-config"]["data"]),
        "deploy/kuberay Secret": set(k8s["Secret/dg2pf-api-secrets"]["stringData"]),
        "deploy/kuberay Deployment env": {e["name"] for e in api_container.get("env", [])},
        "Dockerfile ENV": set(dockerfile_env()),
        "healthcheck.py": script_dg2pf_names(HEALTHCHECK),
        "start-api.sh": script_dg2pf_names(START_API),
    }


def test_every_dg2pf_variable_is_a_setting():
    names = all_dg2pf_names()
    assert all(names.values())
    assert [p for where, n in names.items() for p in unknown_dg2pf_names(n, where)] == []
    assert {"DG2PF_RAY_ADDRESS", "RAY_ADDRESS", "DG2PF_API_TOKENS"} <= settings_env_names()


def test_a_misspelled_setting_is_caught():
    assert unknown_dg2pf_names({"DG2PF_RAY_ADRESS", "DG2PF_PORT"}, "x") == [
        "x: DG2PF_RAY_ADRESS is not a Settings field or alias"
    ]


def test_settings_parse_from_the_compose_api_environment(monkeypatch):
    env = env_map(interpolated_compose()["services"]["api"])
    s = settings_from(env, monkeypatch)
    assert (s.ray_address, s.ray_dashboard_url) == ("ray-head:6379", "http://ray-head:8265")
    assert (str(s.data_dir), s.storage_uri, [str(r) for r in s.data_roots]) == (
        "/data",
        "/data/ray",
        ["/data/datasets"],
    )
    assert s.auth_enabled and s.db_url.startswith("postgresql+psycopg2://dg2pf:")
    assert (s.host, s.port, s.serve_host, s.serve_port) == ("0.0.0.0", 8000, "0.0.0.0", 8001)


def test_settings_parse_from_the_kubernetes_api_environment(monkeypatch):
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in load_yaml_all(KUBERAY / "config.yaml")}
    env = {**docs["ConfigMap/dg2pf-config"]["data"], **docs["Secret/dg2pf-api-secrets"]["stringData"]}
    s = settings_from(env, monkeypatch)
    assert (s.ray_address, s.ray_dashboard_url) == ("dg2pf-head-svc:6379", "http://dg2pf-head-svc:8265")
    assert str(s.data_dir) == "/data" and s.auth_enabled and s.serve_port == 8001


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_match_the_kubernetes_schemas():
    docs = k8s_docs()
    kinds = sorted(k.split("/")[0] for k in docs if not k.startswith("RayCluster/"))
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Secret", "Service"]
    for key, doc in docs.items():
        if not key.startswith("RayCluster/"):
            assert k8s_errors(doc) == [], key


@pytest.mark.parametrize(
    "key, mutation",
    [
        ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/imagePullPolice", "Always")),
        ("Deployment/dg2pf-api", _mutate("spec/selector", delete=True)),
        ("Deployment/dg2pf-api", _mutate("spec/replicas", "one")),
        ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/readinessProbe/httpGet/port", delete=True)),
        ("Service/dg2pf-api", _mutate("spec/ports/0/port", "http")),
        ("PersistentVolumeClaim/dg2pf-data", _mutate("spec/accessModes", "ReadWriteMany")),
        ("ConfigMap/dg2pf-config", _mutate("data/DG2PF_PORT", 8000)),
        ("Secret/dg2pf-ray-token", _mutate("stringdata", {})),
    ],
    ids=[
        "unknown-container-field",
        "no-selector",
        "replicas-not-int",
        "probe-without-port",
        "port-not-int",
        "access-modes-not-list",
        "configmap-value-not-string",
        "unknown-secret-field",
    ],
)
def test_kubernetes_schemas_reject_broken_manifests(key, mutation):
    assert k8s_errors(mutation(k8s_docs()[key]))


def test_raycluster_fields_and_pod_templates():
    assert raycluster_problems(k8s_docs()["RayCluster/dg2pf"]) == []


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (_mutate("spec/workerGroupSpecs", rename="workerGroupSpec"), "unknown field 'workerGroupSpec'"),
        (_mutate("spec/headGroupSpec/rayStartParams/num-cpus", 0), "must be a string"),
        (_mutate("spec/headGroupSpec/rayStartParams/dashbord-host", "0.0.0.0"), "no option --dashbord-host"),
        (_mutate("spec/workerGroupSpecs/1/minReplicas", 5), "minReplicas <= replicas"),
        (_mutate("spec/workerGroupSpecs/0/maxReplicas", "8"), "integers"),
        (_mutate("spec/workerGroupSpecs/0/template/spec/containers/0/imagePullPolice", "Always"), "template"),
        (
            _mutate(
                "spec/headGroupSpec/template/spec/volumes/0/persistentVolumeClaim/claim",
                "x",
            ),
            "template",
        ),
        (_mutate("spec/autoscalerOptions/env/1/valueFrom/secretKeyRef/key", delete=True), "autoscalerOptions"),
        (_mutate("spec/autoscalerOptions/upscalingMode", "Fast"), "upscalingMode"),
        (_mutate("spec/rayVersion", "2.59.0"), "rayVersion"),
        (_mutate("spec/headGroupSpec", delete=True), "headGroupSpec: required"),
    ],
    ids=_case_id,
)
def test_raycluster_checks_reject_broken_documents(mutation, expected):
    problems = problems_or_exception(lambda: raycluster_problems(mutation(k8s_docs()["RayCluster/dg2pf"])))
    assert any(expected in problem for problem in problems), problems


def test_kuberay_cross_resource_checks():
    assert kuberay_problems(k8s_docs()) == []
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["api.yaml", "config.yaml", "raycluster.yaml"]
    assert all((KUBERAY / r).is_file() for r in kustomization["resources"])
    assert kustomization["images"] == [{"name": "dg2pf", "newName": "dg2pf", "newTag": VERSION}]


@pytest.mark.parametrize(
    "key, mutation, expected",
    [
        ("ConfigMap/dg2pf-config", _mutate("data/DG2PF_RAY_ADDRESS", "dg2pf-head:6379"), "GCS"),
        (
            "RayCluster/dg2pf",
            _mutate("spec/workerGroupSpecs/1/template/spec/containers/0/volumeMounts/0/mountPath", "/mnt"),
            "does not mount",
        ),
        (
            "RayCluster/dg2pf",
            _mutate("spec/workerGroupSpecs/0/template/spec/containers/0/env/0/value", "disabled"),
            "RAY_AUTH_MODE",
        ),
        ("RayCluster/dg2pf", _mutate("spec/autoscalerOptions/env", []), "autoscaler"),
        (
            "RayCluster/dg2pf",
            _mutate(
                "spec/headGroupSpec/template/spec/containers/0/envFrom", [{"secretRef": {"name": "dg2pf-api-secrets"}}]
            ),
            "must not get",
        ),
        (
            "RayCluster/dg2pf",
            _mutate("spec/workerGroupSpecs/1/template/spec/containers/0/resources/limits", {"cpu": "8"}),
            "GPU worker group",
        ),
        ("RayCluster/dg2pf", _mutate("spec/headGroupSpec/rayStartParams/num-cpus", "4"), "num-cpus"),
        ("PersistentVolumeClaim/dg2pf-data", _mutate("spec/accessModes", ["ReadWriteOnce"]), "ReadWriteMany"),
        (
            "Deployment/dg2pf-api",
            _mutate("spec/template/spec/containers/0/readinessProbe/httpGet/path", "/healthz"),
            "/readyz",
        ),
        ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/image", "dg2pf:0.0.9"), "image"),
    ],
    ids=_case_id,
)
def test_kuberay_checks_reject_broken_manifests(key, mutation, expected):
    docs = k8s_docs()
    docs[key] = mutation(docs[key])
    problems = problems_or_exception(lambda: kuberay_problems(docs))
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_own_validation():
    prepared = ray_up_validate(ray_up_config())
    assert prepared["head_node_type"] == "head"
    assert ray_up_problems(ray_up_config()) == []


@pytest.mark.parametrize(
    "mutation",
    [
        _mutate("head_start_ray_commands", rename="head_start_ray_command"),
        _mutate("available_node_types/gpu-worker/resources", delete=True),
        _mutate("available_node_types/gpu-worker/resources/GPU", 0.5),
        _mutate("docker/image_name", "x"),
        _mutate("available_node_types/cpu-worker/min_workers", 20),
        _mutate("head_node_type", "boss"),
    ],
    ids=[
        "misspelled-key",
        "node-type-without-resources",
        "fractional-resource",
        "unknown-docker-key",
        "min-workers-above-max",
        "unknown-head-type",
    ],
)
def test_ray_up_validation_rejects_broken_configs(mutation):
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(mutation(ray_up_config()))


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (_mutate("setup_commands", ["pip install boto3"]), "installs Python packages"),
        (
            _mutate("worker_start_ray_commands/1", "ray start --address=$RAY_HEAD_IP:6379 --num-cpu=4"),
            "no option --num-cpu",
        ),
        (_mutate("docker/run_options/2", "-e RAY_AUTH_MODE=disabled"), "RAY_AUTH_MODE"),
        (_mutate("docker/image", "rayproject/ray:2.60.0"), "docker.image"),
        (_mutate("available_node_types/head/resources/CPU", 4), "CPU 0"),
    ],
    ids=_case_id,
)
def test_ray_up_checks_reject_broken_configs(mutation, expected):
    problems = ray_up_problems(mutation(ray_up_config()))
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_exactly_the_readme_setup():
    assert readme_setup_command() == "bash scripts/setup.sh"
    assert 'pip install --quiet -e ".[dev]"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            ("RUN bash scripts/setup.sh", "RUN bash scripts/setup.sh && .venv/bin/pip install boto3"),
            "must appear exactly once",
        ),
        (("USER dg2pf", "RUN pip install --no-cache-dir ray\nUSER dg2pf"), "installs Python packages"),
        (("COPY service ./service\n", ""), "nothing COPYs service"),
        (("COPY clients ./clients", "COPY client ./clients"), "does not exist"),
        (("COPY scripts ./scripts\n", ""), "nothing COPYs scripts"),
        (("USER dg2pf", "USER root"), "non-root"),
        (("CMD [", 'ENTRYPOINT ["dg2pf"]\nCMD ['), "ENTRYPOINT"),
        (("ENV PATH=/app/.venv/bin:$PATH", "ENV PATH=/opt/venv/bin:$PATH"), "PATH"),
        (("FROM python:3.11-slim", "FROM python:3.12-slim"), "base image"),
    ],
    ids=_case_id,
)
def test_dockerfile_checks_reject_broken_dockerfiles(edit, expected):
    old, new = edit
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new, 1))
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- container helpers


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("dg2pf_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stub_server():
    """A local HTTP server answering like Ray's dashboard/agent and the API, per `answers`."""
    answers: dict[str, tuple[int, str]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = answers.get(self.path, (404, "not found"))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1], answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "role, answers, healthy",
    [
        ("head", {"/api/gcs_healthz": (200, "success"), "/api/local_raylet_healthz": (200, "success")}, True),
        ("head", {"/api/gcs_healthz": (503, ""), "/api/local_raylet_healthz": (200, "success")}, False),
        ("head", {"/api/gcs_healthz": (200, "success")}, False),
        ("worker", {"/api/local_raylet_healthz": (200, "success")}, True),
        ("worker", {"/api/local_raylet_healthz": (503, "Local Raylet failed")}, False),
        ("api", {"/healthz": (200, '{"status":"ok"}')}, True),
        ("api", {"/healthz": (500, "")}, False),
        ("api-ready", {"/readyz": (503, '{"status":"not_ready"}')}, False),
        ("api-ready", {"/readyz": (200, '{"status":"ready"}')}, True),
    ],
)
def test_healthcheck_script(stub_server, monkeypatch, role, answers, healthy):
    port, table = stub_server
    table.clear()
    table.update(answers)
    for var in ("RAY_DASHBOARD_PORT", "RAY_DASHBOARD_AGENT_LISTEN_PORT", "DG2PF_PORT"):
        monkeypatch.setenv(var, str(port))
    assert load_healthcheck().check(role) is healthy


def test_healthcheck_script_fails_when_nothing_listens(monkeypatch):
    monkeypatch.setenv("DG2PF_PORT", "1")
    assert load_healthcheck().check("api") is False


@pytest.fixture()
def fake_bin(tmp_path):
    """`ray` and `python` stand-ins that record their arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "python"):
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\n{{ echo "ARGS $*"; env; }} > {tmp_path}/{name}.out\n')
        script.chmod(0o755)
    return tmp_path


def run_start_api(fake: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{fake / 'bin'}:/usr/bin:/bin",
        "DG2PF_RAY_ADDRESS": "ray-head:6379",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "t0k",
        "DG2PF_API_TOKENS": "secret-api-token",
        "DG2PF_DATABASE_URL": "postgresql+psycopg2://u:pw@db/x",
    }
    base.update(env)
    return subprocess.run(
        ["bash", str(START_API), *args],
        env={k: v for k, v in base.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_start_api_runs_the_service_and_no_ray(fake_bin):
    """The API is no Ray node: no `ray` command at all, only the service, with its whole environment."""
    assert "ray start" not in START_API.read_text()
    proc = run_start_api(fake_bin, "--port", "8000")
    assert proc.returncode == 0, proc.stderr
    assert not (fake_bin / "ray.out").exists()
    python_out = (fake_bin / "python.out").read_text()
    assert python_out.splitlines()[0] == "ARGS -m dg2pf_service --port 8000"
    env = set(python_out.splitlines()[1:])
    assert {
        "DG2PF_API_TOKENS=secret-api-token",
        "DG2PF_DATABASE_URL=postgresql+psycopg2://u:pw@db/x",
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN=t0k",
        "DG2PF_RAY_ADDRESS=ray-head:6379",
    } <= env


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RAY_AUTH_MODE": None}, "RAY_AUTH_MODE must be 'token'"),
        ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE must be 'token'"),
        ({"DG2PF_RAY_ADDRESS": None}, "DG2PF_RAY_ADDRESS"),
        # The dashboard URL alone is not enough: without DG2PF_RAY_ADDRESS the service starts a Ray head of its own.
        ({"DG2PF_RAY_ADDRESS": None, "DG2PF_RAY_DASHBOARD_URL": "http://ray-head:8265"}, "DG2PF_RAY_ADDRESS"),
    ],
)
def test_start_api_refuses_without_auth_or_address(fake_bin, env, message):
    proc = run_start_api(fake_bin, **env)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (fake_bin / "ray.out").exists() and not (fake_bin / "python.out").exists()
