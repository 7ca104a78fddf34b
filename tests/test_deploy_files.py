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

Each check is a function returning a list of problems; the negative cases mutate a loaded document
and assert that the validator or checker rejects it, so no check can pass vacuously.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import http.server
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import threading
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "compose.env.example"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBERAY = ROOT / "deploy" / "kuberay"
RAY_UP = ROOT / "deploy" / "ray-cluster.yaml"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
START_API = ROOT / "deploy" / "docker" / "start-api.sh"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(re.sub(r"^ray(\[[^]]*\])?==", "", d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray"))

SHARED_VOLUME, SHARED_PATH = "dg2pf-data", "/data"
API_SECRETS = ("DG2PF_API_TOKENS", "DG2PF_DATABASE_URL")
REQUIRED_SECRETS = ("RAY_AUTH_TOKEN", "DG2PF_API_TOKENS", "POSTGRES_PASSWORD")
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu")
PIP_INSTALL = re.compile(r"\b(pip3?|uv|conda|mamba|poetry|pipenv|easy_install)\b[^&|;]*\b(install|sync|add)\b")


# --------------------------------------------------------------------------- shared helpers


_parsed: dict[Path, list[dict]] = {}


def load_yaml_all(path: Path) -> list[dict]:
    """The documents of a YAML file (parsed once; every caller gets its own copy to mutate)."""
    if path not in _parsed:
        _parsed[path] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return copy.deepcopy(_parsed[path])


def problems_or_exception(check: Callable[[], list[str]]) -> list[str]:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a crash on a mutated document is a rejection too
        return [f"{type(exc).__name__}: {exc}"]


@functools.cache
def ray_start_options() -> set[str]:
    """Every option name of the installed `ray start` (what `ray start --help` prints)."""
    from ray.scripts.scripts import start

    names = {opt for param in start.params for opt in param.opts}
    assert {"--head", "--address", "--block", "--num-cpus", "--dashboard-host", "--log-style"} <= names
    return names


def ray_start_flag_problems(args: list[str], where: str) -> list[str]:
    """The flags of one `ray start ...` argument list that `ray start` does not have."""
    known = ray_start_options()
    return [f"{where}: `ray start` has no option {a.split('=')[0]}" for a in args
            if a.startswith("--") and a.split("=", 1)[0] not in known]


def ray_start_invocations(shell: str) -> list[list[str]]:
    """The argument lists of every `ray start` in a shell command line."""
    words = shlex.split(shell.replace(";", " ; ").replace("&&", " && "))
    out, i = [], 0
    while i < len(words) - 1:
        if words[i] == "ray" and words[i + 1] == "start":
            j = i + 2
            while j < len(words) and words[j] not in (";", "&&", "||", "|"):
                j += 1
            out.append(words[i + 2:j])
            i = j
        else:
            i += 1
    return out


def settings_env_names() -> set[str]:
    """The environment names dg2pf_service.settings.Settings reads: DG2PF_<FIELD> or its aliases."""
    from pydantic import AliasChoices

    from dg2pf_service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias)
        elif field.alias:
            names.add(field.alias)
        else:
            names.add(prefix + name)
    return {n.upper() for n in names}


def unknown_dg2pf_names(names: set[str], where: str) -> list[str]:
    known = settings_env_names()
    return [f"{where}: {n} is not a Settings field or alias" for n in sorted(names)
            if n.upper().startswith("DG2PF_") and n.upper() not in known]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Settings() exactly as the service builds it, from this environment only."""
    from dg2pf_service.settings import Settings

    for key in list(os.environ):
        if key.upper().startswith("DG2PF_") or key.upper() == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


# --------------------------------------------------------------------------- compose


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation (compose-spec "Interpolation"): $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
    ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}."""

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        is_set, current = name in env, env.get(name, "")
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if is_set else arg
        if op == ":?":
            if not current:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current
        if op == "?":
            if not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current
        if op == ":+":
            return arg if current else ""
        if op == "+":
            return arg if is_set else ""
        return current

    return _VAR.sub(sub, value)


def walk_strings(node: Any, fn: Callable[[str], Any]) -> Any:
    if isinstance(node, dict):
        return {k: walk_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [walk_strings(v, fn) for v in node]
    if isinstance(node, str):
        return fn(node)
    return node


def compose_variables(doc: Any) -> dict[str, set[str]]:
    """Every variable the (parsed, so comment-free) compose document interpolates -> its operators."""
    found: dict[str, set[str]] = {}

    def collect(s: str) -> str:
        for m in _VAR.finditer(s):
            if not m.group("escaped"):
                found.setdefault(m.group("name") or m.group("bare"), set()).add(m.group("op") or "")
        return s

    walk_strings(doc, collect)
    return found


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def raw_compose() -> dict:
    return load_yaml_all(COMPOSE)[0]


def example_env(with_secrets: bool = True) -> dict[str, str]:
    """The env example as a user fills it in: the empty secrets get values."""
    env = parse_env_file(ENV_EXAMPLE.read_text())
    if with_secrets:
        env.update({k: f"test-{k.lower()}-0123456789abcdef" for k in REQUIRED_SECRETS})
    return env


def interpolated_compose(doc: dict | None = None, env: dict[str, str] | None = None) -> dict:
    env = example_env() if env is None else env
    return walk_strings(raw_compose() if doc is None else doc, lambda s: interpolate(s, env))


_compose_validator: jsonschema.protocols.Validator | None = None


def compose_validator() -> jsonschema.protocols.Validator:
    """The Compose Specification schema check-jsonschema vendors, with the validator its $schema names."""
    global _compose_validator
    if _compose_validator is None:
        ref = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
        schema = json.loads(ref.read_text())
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _compose_validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return _compose_validator


def compose_schema_errors(doc: dict) -> list[str]:
    return [f"{e.json_path}: {e.message[:200]}" for e in compose_validator().iter_errors(doc)]


def env_map(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, _, rest = v.partition(":")
            mounts.append((source, rest.split(":")[0]))
        else:
            mounts.append((v.get("source", ""), v.get("target", "")))
    return mounts


def command_list(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def compose_problems(doc: dict) -> list[str]:
    """What the Compose schema cannot check (on the interpolated document)."""
    p: list[str] = []
    services = doc.get("services", {})
    declared_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            if dep not in services:
                p.append(f"{name}: depends_on {dep!r}, which is no service")
            elif isinstance(svc["depends_on"], dict) and svc["depends_on"][dep].get("condition") == "service_healthy" \
                    and "healthcheck" not in services[dep]:
                p.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        for source, target in volume_mounts(svc):
            if not source.startswith((".", "/", "~")) and source not in declared_volumes:
                p.append(f"{name}: volume {source!r} is not declared under top-level volumes")
        test = (svc.get("healthcheck") or {}).get("test") or []
        words = shlex.split(test) if isinstance(test, str) else test
        if any(w in ("curl", "wget") or w.startswith(("curl ", "wget ")) for w in words):
            p.append(f"{name}: healthcheck uses curl/wget, which python:3.11-slim lacks")
    # One shared volume at one path in the head, every worker and the API.
    for name in (*RAY_SERVICES, "api"):
        if name not in services:
            p.append(f"service {name} is missing")
        elif (SHARED_VOLUME, SHARED_PATH) not in volume_mounts(services[name]):
            p.append(f"{name}: does not mount {SHARED_VOLUME} at {SHARED_PATH}")
    if p:
        return p
    head, api = services["ray-head"], services["api"]
    head_cmd = command_list(head)
    if head_cmd[:3] != ["ray", "start", "--head"] or "--block" not in head_cmd:
        p.append("ray-head: command is not `ray start --head --block ...`")
    gcs_port = flag(head_cmd, "--port") or "6379"
    dash_port = flag(head_cmd, "--dashboard-port") or "8265"
    if flag(head_cmd, "--dashboard-host") != "0.0.0.0":
        p.append("ray-head: the dashboard (Jobs API) must listen on 0.0.0.0 for the API to reach it")
    for name in ("ray-worker", "ray-worker-gpu"):
        cmd = command_list(services[name])
        if cmd[:2] != ["ray", "start"] or flag(cmd, "--address") != f"ray-head:{gcs_port}" or "--block" not in cmd:
            p.append(f"{name}: command must be `ray start --address=ray-head:{gcs_port} --block ...`")
        deps = services[name].get("depends_on") or {}
        if (deps.get("ray-head") or {}).get("condition") != "service_healthy":
            p.append(f"{name}: must wait for ray-head to be healthy")
        if "container_name" in services[name] or services[name].get("ports"):
            p.append(f"{name}: a fixed container name or published port prevents --scale")
    for name in RAY_SERVICES:
        p += ray_start_flag_problems(command_list(services[name])[2:], name)
    api_env = env_map(api)
    if api_env.get("DG2PF_RAY_ADDRESS") != f"ray-head:{gcs_port}":
        p.append(f"api: DG2PF_RAY_ADDRESS {api_env.get('DG2PF_RAY_ADDRESS')!r} is not ray-head's GCS (ray-head:{gcs_port})")
    if api_env.get("DG2PF_RAY_DASHBOARD_URL") != f"http://ray-head:{dash_port}":
        p.append("api: DG2PF_RAY_DASHBOARD_URL is not ray-head's dashboard")
    if api_env.get("DG2PF_DATA_DIR") != SHARED_PATH:
        p.append(f"api: DG2PF_DATA_DIR must be the shared {SHARED_PATH}")
    if not str(api_env.get("DG2PF_DATABASE_URL", "")).startswith("postgresql+psycopg2://") \
            or "@postgres:5432/" not in api_env.get("DG2PF_DATABASE_URL", ""):
        p.append("api: DG2PF_DATABASE_URL does not point at the postgres service")
    for host_key in ("DG2PF_HOST", "DG2PF_SERVE_HOST"):
        if api_env.get(host_key) != "0.0.0.0":
            p.append(f"api: {host_key} must be 0.0.0.0 in a container")
    serve_port = api_env.get("DG2PF_SERVE_PORT", "8001")
    if not any(str(port).endswith(f":{serve_port}") for port in head.get("ports") or []):
        p.append(f"ray-head: Serve's HTTP port {serve_port} (DG2PF_SERVE_PORT) is not published")
    for dep in ("postgres", "ray-head"):
        if ((api.get("depends_on") or {}).get(dep) or {}).get("condition") != "service_healthy":
            p.append(f"api: must wait for {dep} to be healthy")
    # Token auth on every Ray process, one token; the API's secrets only in the API.
    token = api_env.get("RAY_AUTH_TOKEN")
    for name in (*RAY_SERVICES, "api"):
        env = env_map(services[name])
        if env.get("RAY_AUTH_MODE") != "token":
            p.append(f"{name}: RAY_AUTH_MODE must be token")
        if not env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN") != token:
            p.append(f"{name}: RAY_AUTH_TOKEN missing or different from the API's")
    for name, svc in services.items():
        if name == "api":
            continue
        leaked = [k for k in API_SECRETS if k in env_map(svc)]
        if leaked or svc.get("env_file"):
            p.append(f"{name}: gets the API's secrets ({leaked or 'env_file'})")
    # GPU workers: profile gpu, NVIDIA devices reserved, as many GPUs as Ray is told.
    gpu = services["ray-worker-gpu"]
    if gpu.get("profiles") != ["gpu"]:
        p.append("ray-worker-gpu: must be under the gpu profile only")
    devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        p.append("ray-worker-gpu: no nvidia GPU reservation")
    elif str(devices[0].get("count")) != flag(command_list(gpu), "--num-gpus"):
        p.append("ray-worker-gpu: reserved GPU count differs from --num-gpus")
    if "demo" not in (services.get("demo") or {}).get("profiles", []):
        p.append("demo: the CLI demo service must stay, under the demo profile")
    return p


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


@pytest.mark.parametrize("mutation", [
    _mutate("services/api/healthcheck", rename="healthchek"),
    _mutate("volumes", rename="volume"),
    _mutate("services/api/depends_on/postgres/condition", "service_healty"),
    _mutate("services/ray-worker-gpu/deploy/resources/reservations/devices/0/capabilities", delete=True),
    _mutate("services/ray-head/healthcheck/interval", 10),
    _mutate("services/postgres/ports", {"5432": 5432}),
], ids=["misspelled-service-key", "misspelled-top-level-key", "bad-depends-on-condition",
        "gpu-device-without-capabilities", "interval-not-a-duration", "ports-as-mapping"])
def test_compose_schema_rejects_broken_documents(mutation):
    assert compose_schema_errors(mutation(interpolated_compose()))


def test_compose_semantics():
    assert compose_problems(interpolated_compose()) == []


@pytest.mark.parametrize("mutation, expected", [
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
], ids=_case_id)
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
    assert interpolate("$$HOME ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+a} ${EMPTY+a}", env) == "$HOME v v d d  a a"
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?no}", env)
    assert interpolate("${EMPTY?no}", env) == ""


# --------------------------------------------------------------------------- DG2PF_* settings


def dockerfile_env() -> dict[str, str]:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes())).envs


def script_dg2pf_names(path: Path) -> set[str]:
    return set(re.findall(r"\bDG2PF_[A-Z0-9_]+\b", path.read_text()))


def all_dg2pf_names() -> dict[str, set[str]]:
    compose = interpolated_compose()
    k8s = {d["kind"] + "/" + d["metadata"]["name"]: d for f in ("config.yaml", "api.yaml") for d in load_yaml_all(KUBERAY / f)}
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
    assert unknown_dg2pf_names({"DG2PF_RAY_ADRESS", "DG2PF_PORT"}, "x") == ["x: DG2PF_RAY_ADRESS is not a Settings field or alias"]


def test_settings_parse_from_the_compose_api_environment(monkeypatch):
    env = env_map(interpolated_compose()["services"]["api"])
    s = settings_from(env, monkeypatch)
    assert (s.ray_address, s.ray_dashboard_url) == ("ray-head:6379", "http://ray-head:8265")
    assert (str(s.data_dir), s.storage_uri, [str(r) for r in s.data_roots]) == ("/data", "/data/ray", ["/data/datasets"])
    assert s.auth_enabled and s.db_url.startswith("postgresql+psycopg2://dg2pf:")
    assert (s.host, s.port, s.serve_host, s.serve_port) == ("0.0.0.0", 8000, "0.0.0.0", 8001)


def test_settings_parse_from_the_kubernetes_api_environment(monkeypatch):
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in load_yaml_all(KUBERAY / "config.yaml")}
    env = {**docs["ConfigMap/dg2pf-config"]["data"], **docs["Secret/dg2pf-api-secrets"]["stringData"]}
    s = settings_from(env, monkeypatch)
    assert (s.ray_address, s.ray_dashboard_url) == ("dg2pf-head-svc:6379", "http://dg2pf-head-svc:8265")
    assert str(s.data_dir) == "/data" and s.auth_enabled and s.serve_port == 8001


# --------------------------------------------------------------------------- Kubernetes


K8S_VERSION = kubernetes_validate.latest_version()


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for name in ("config.yaml", "api.yaml", "raycluster.yaml"):
        for d in load_yaml_all(KUBERAY / name):
            docs[f"{d['kind']}/{d['metadata']['name']}"] = d
    return docs


_k8s_results: dict[str, list[str]] = {}


def k8s_errors(resource: dict) -> list[str]:
    """kubernetes-validate's strict check (results remembered per document: the negative cases
    re-check many unchanged pod templates)."""
    key = json.dumps(resource, sort_keys=True)
    if key not in _k8s_results:
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
            _k8s_results[key] = []
        except kubernetes_validate.ValidationError as exc:
            _k8s_results[key] = [f"{'.'.join(map(str, exc.path))}: {exc.message[:200]}"]
    return list(_k8s_results[key])


def test_kubernetes_manifests_match_the_kubernetes_schemas():
    docs = k8s_docs()
    kinds = sorted(k.split("/")[0] for k in docs if not k.startswith("RayCluster/"))
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Secret", "Service"]
    for key, doc in docs.items():
        if not key.startswith("RayCluster/"):
            assert k8s_errors(doc) == [], key


@pytest.mark.parametrize("key, mutation", [
    ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/imagePullPolice", "Always")),
    ("Deployment/dg2pf-api", _mutate("spec/selector", delete=True)),
    ("Deployment/dg2pf-api", _mutate("spec/replicas", "one")),
    ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/readinessProbe/httpGet/port", delete=True)),
    ("Service/dg2pf-api", _mutate("spec/ports/0/port", "http")),
    ("PersistentVolumeClaim/dg2pf-data", _mutate("spec/accessModes", "ReadWriteMany")),
    ("ConfigMap/dg2pf-config", _mutate("data/DG2PF_PORT", 8000)),
    ("Secret/dg2pf-ray-token", _mutate("stringdata", {})),
], ids=["unknown-container-field", "no-selector", "replicas-not-int", "probe-without-port", "port-not-int",
        "access-modes-not-list", "configmap-value-not-string", "unknown-secret-field"])
def test_kubernetes_schemas_reject_broken_manifests(key, mutation):
    assert k8s_errors(mutation(k8s_docs()[key]))


# The KubeRay ray.io/v1 fields this project may use (the CRD is not available offline; these names
# and types are those of KubeRay's RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions).
RAYCLUSTER_TOP = {"apiVersion", "kind", "metadata", "spec"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy"}


def pod_template_errors(template: dict, where: str) -> list[str]:
    """A pod template checked as the real Kubernetes PodTemplateSpec (wrapped in a v1 PodTemplate)."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    return [f"{where}: {e}" for e in k8s_errors(wrapped)]


def raycluster_problems(rc: dict) -> list[str]:
    ray_version = importlib.metadata.version("ray")
    p: list[str] = []

    def only(node: Any, allowed: set[str], where: str) -> None:
        if not isinstance(node, dict):
            p.append(f"{where}: not a mapping")
            return
        p.extend(f"{where}: unknown field {k!r}" for k in sorted(set(node) - allowed))

    def start_params(params: Any, where: str) -> None:
        if not isinstance(params, dict):
            p.append(f"{where}.rayStartParams: required mapping")
            return
        for k, v in params.items():
            if not isinstance(v, str):
                p.append(f"{where}.rayStartParams.{k}: value must be a string, got {type(v).__name__}")
        p.extend(ray_start_flag_problems([f"--{k}" for k in params], f"{where}.rayStartParams"))

    only(rc, RAYCLUSTER_TOP, "RayCluster")
    if (rc.get("apiVersion"), rc.get("kind")) != ("ray.io/v1", "RayCluster"):
        p.append("RayCluster: apiVersion/kind must be ray.io/v1 RayCluster")
    spec = rc.get("spec") or {}
    only(spec, RAYCLUSTER_SPEC, "spec")
    if spec.get("rayVersion") != ray_version or ray_version != RAY_PIN:
        p.append(f"spec.rayVersion {spec.get('rayVersion')!r}: must be the installed and pinned Ray ({ray_version}, {RAY_PIN})")
    if not isinstance(spec.get("enableInTreeAutoscaling", False), bool):
        p.append("spec.enableInTreeAutoscaling: must be a boolean")
    options = spec.get("autoscalerOptions")
    if options is not None:
        only(options, AUTOSCALER_OPTIONS, "spec.autoscalerOptions")
        if options.get("upscalingMode", "Default") not in ("Default", "Aggressive", "Conservative"):
            p.append("spec.autoscalerOptions.upscalingMode: not Default/Aggressive/Conservative")
        if not isinstance(options.get("idleTimeoutSeconds", 0), int):
            p.append("spec.autoscalerOptions.idleTimeoutSeconds: must be an integer")
        # env, envFrom, resources and securityContext are core/v1 types: check them in a container.
        container = {"name": "autoscaler", "image": "x",
                     **{k: options[k] for k in ("env", "envFrom", "resources", "securityContext", "volumeMounts") if k in options}}
        p.extend(pod_template_errors({"spec": {"containers": [container]}}, "spec.autoscalerOptions"))
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        p.append("spec.headGroupSpec: required")
    else:
        only(head, HEAD_GROUP, "spec.headGroupSpec")
        if head.get("serviceType", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer"):
            p.append("spec.headGroupSpec.serviceType: not a Service type")
        start_params(head.get("rayStartParams"), "spec.headGroupSpec")
        p.extend(pod_template_errors(head.get("template"), "spec.headGroupSpec.template"))
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(set(names)) != len(names):
        p.append("spec.workerGroupSpecs: groupName must be unique")
    for i, group in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        only(group, WORKER_GROUP, where)
        if not isinstance(group.get("groupName"), str):
            p.append(f"{where}.groupName: required string")
        counts = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
            p.append(f"{where}: minReplicas, replicas and maxReplicas must be integers >= 0")
        elif not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            p.append(f"{where}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
        start_params(group.get("rayStartParams"), where)
        p.extend(pod_template_errors(group.get("template"), f"{where}.template"))
    return p


def test_raycluster_fields_and_pod_templates():
    assert raycluster_problems(k8s_docs()["RayCluster/dg2pf"]) == []


@pytest.mark.parametrize("mutation, expected", [
    (_mutate("spec/workerGroupSpecs", rename="workerGroupSpec"), "unknown field 'workerGroupSpec'"),
    (_mutate("spec/headGroupSpec/rayStartParams/num-cpus", 0), "must be a string"),
    (_mutate("spec/headGroupSpec/rayStartParams/dashbord-host", "0.0.0.0"), "no option --dashbord-host"),
    (_mutate("spec/workerGroupSpecs/1/minReplicas", 5), "minReplicas <= replicas"),
    (_mutate("spec/workerGroupSpecs/0/maxReplicas", "8"), "integers"),
    (_mutate("spec/workerGroupSpecs/0/template/spec/containers/0/imagePullPolice", "Always"), "template"),
    (_mutate("spec/headGroupSpec/template/spec/volumes/0/persistentVolumeClaim/claim", "x",), "template"),
    (_mutate("spec/autoscalerOptions/env/1/valueFrom/secretKeyRef/key", delete=True), "autoscalerOptions"),
    (_mutate("spec/autoscalerOptions/upscalingMode", "Fast"), "upscalingMode"),
    (_mutate("spec/rayVersion", "2.59.0"), "rayVersion"),
    (_mutate("spec/headGroupSpec", delete=True), "headGroupSpec: required"),
], ids=_case_id)
def test_raycluster_checks_reject_broken_documents(mutation, expected):
    problems = problems_or_exception(lambda: raycluster_problems(mutation(k8s_docs()["RayCluster/dg2pf"])))
    assert any(expected in problem for problem in problems), problems


def pod_specs(docs: dict) -> dict[str, dict]:
    rc = docs["RayCluster/dg2pf"]["spec"]
    pods = {"api": docs["Deployment/dg2pf-api"]["spec"]["template"]["spec"],
            "ray-head": rc["headGroupSpec"]["template"]["spec"]}
    pods.update({f"ray-worker-{g['groupName']}": g["template"]["spec"] for g in rc["workerGroupSpecs"]})
    return pods


def k8s_env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def kuberay_problems(docs: dict) -> list[str]:
    """Cross-resource checks of deploy/kuberay (names, ports, the shared claim, auth, secrets)."""
    p: list[str] = []
    rc, config = docs["RayCluster/dg2pf"], docs["ConfigMap/dg2pf-config"]["data"]
    pvc = docs["PersistentVolumeClaim/dg2pf-data"]
    head_svc = f"{rc['metadata']['name']}-head-svc"
    head = rc["spec"]["headGroupSpec"]
    head_ports = {port["containerPort"] for port in head["template"]["spec"]["containers"][0].get("ports", [])}
    if config.get("DG2PF_RAY_ADDRESS") != f"{head_svc}:6379" or 6379 not in head_ports:
        p.append(f"ConfigMap: DG2PF_RAY_ADDRESS must be {head_svc}:6379 (the head's GCS)")
    if config.get("DG2PF_RAY_DASHBOARD_URL") != f"http://{head_svc}:8265" or 8265 not in head_ports:
        p.append(f"ConfigMap: DG2PF_RAY_DASHBOARD_URL must be http://{head_svc}:8265")
    if int(config.get("DG2PF_SERVE_PORT", 8001)) not in head_ports:
        p.append("RayCluster: the head container does not expose DG2PF_SERVE_PORT (Serve runs on the head)")
    if config.get("DG2PF_DATA_DIR") != SHARED_PATH:
        p.append(f"ConfigMap: DG2PF_DATA_DIR must be {SHARED_PATH}")
    if head["rayStartParams"].get("num-cpus") != "0" or head["rayStartParams"].get("dashboard-host") != "0.0.0.0":
        p.append("RayCluster: the head needs num-cpus '0' and dashboard-host '0.0.0.0'")
    if "ReadWriteMany" not in pvc["spec"]["accessModes"]:
        p.append("PVC: must be ReadWriteMany (every node mounts it)")
    token_ref = {"secretKeyRef": {"name": "dg2pf-ray-token", "key": "auth_token"}}
    if docs["Secret/dg2pf-ray-token"]["stringData"].keys() != {"auth_token"}:
        p.append("Secret dg2pf-ray-token: must hold exactly auth_token")
    auto_env = k8s_env(rc["spec"].get("autoscalerOptions") or {})
    if not rc["spec"].get("enableInTreeAutoscaling") or auto_env.get("RAY_AUTH_MODE") != "token" \
            or auto_env.get("RAY_AUTH_TOKEN") != token_ref:
        p.append("RayCluster: the autoscaler sidecar needs RAY_AUTH_MODE=token and the Ray token")
    gpu_groups = [g for g in rc["spec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})]
    if not gpu_groups or any(g["minReplicas"] != 0 for g in gpu_groups):
        p.append("RayCluster: needs a GPU worker group (nvidia.com/gpu limit) scaling from minReplicas 0")
    if len(rc["spec"]["workerGroupSpecs"]) == len(gpu_groups):
        p.append("RayCluster: needs a CPU worker group too")
    for name, pod in pod_specs(docs).items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if claims.get(mounts.get(SHARED_PATH)) != pvc["metadata"]["name"]:
            p.append(f"{name}: does not mount the claim {pvc['metadata']['name']} at {SHARED_PATH}")
        env = k8s_env(container)
        if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN") != token_ref:
            p.append(f"{name}: needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from Secret dg2pf-ray-token")
        if container.get("image") != f"dg2pf:{VERSION}":
            p.append(f"{name}: image {container.get('image')!r} is not dg2pf:{VERSION}")
        probes = json.dumps([container.get(k) for k in ("readinessProbe", "livenessProbe")])
        if "null" in probes or "wget" in probes or "curl" in probes:
            p.append(f"{name}: needs readiness and liveness probes that do not use wget/curl")
        if name != "api":
            refs = json.dumps(container)
            if "dg2pf-api-secrets" in refs or "dg2pf-config" in refs or any(k.startswith("DG2PF_") for k in env):
                p.append(f"{name}: a Ray pod must not get the API's settings or secrets")
    api = docs["Deployment/dg2pf-api"]["spec"]["template"]["spec"]["containers"][0]
    sources = {next(iter(s.values()))["name"] for s in api.get("envFrom", [])}
    if sources != {"dg2pf-config", "dg2pf-api-secrets"}:
        p.append(f"api: envFrom must be the ConfigMap and the API Secret, got {sources}")
    if (api["readinessProbe"].get("httpGet") or {}).get("path") != "/readyz" \
            or (api["livenessProbe"].get("httpGet") or {}).get("path") != "/healthz":
        p.append("api: readiness on /readyz, liveness on /healthz")
    if docs["Deployment/dg2pf-api"]["spec"]["replicas"] != 1:
        p.append("api: one replica (it runs the scheduler)")
    return p


def test_kuberay_cross_resource_checks():
    assert kuberay_problems(k8s_docs()) == []
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["api.yaml", "config.yaml", "raycluster.yaml"]
    assert all((KUBERAY / r).is_file() for r in kustomization["resources"])
    assert kustomization["images"] == [{"name": "dg2pf", "newName": "dg2pf", "newTag": VERSION}]


@pytest.mark.parametrize("key, mutation, expected", [
    ("ConfigMap/dg2pf-config", _mutate("data/DG2PF_RAY_ADDRESS", "dg2pf-head:6379"), "GCS"),
    ("RayCluster/dg2pf", _mutate("spec/workerGroupSpecs/1/template/spec/containers/0/volumeMounts/0/mountPath", "/mnt"), "does not mount"),
    ("RayCluster/dg2pf", _mutate("spec/workerGroupSpecs/0/template/spec/containers/0/env/0/value", "disabled"), "RAY_AUTH_MODE"),
    ("RayCluster/dg2pf", _mutate("spec/autoscalerOptions/env", []), "autoscaler"),
    ("RayCluster/dg2pf", _mutate("spec/headGroupSpec/template/spec/containers/0/envFrom", [{"secretRef": {"name": "dg2pf-api-secrets"}}]), "must not get"),
    ("RayCluster/dg2pf", _mutate("spec/workerGroupSpecs/1/template/spec/containers/0/resources/limits", {"cpu": "8"}), "GPU worker group"),
    ("RayCluster/dg2pf", _mutate("spec/headGroupSpec/rayStartParams/num-cpus", "4"), "num-cpus"),
    ("PersistentVolumeClaim/dg2pf-data", _mutate("spec/accessModes", ["ReadWriteOnce"]), "ReadWriteMany"),
    ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/readinessProbe/httpGet/path", "/healthz"), "/readyz"),
    ("Deployment/dg2pf-api", _mutate("spec/template/spec/containers/0/image", "dg2pf:0.0.9"), "image"),
], ids=_case_id)
def test_kuberay_checks_reject_broken_manifests(key, mutation, expected):
    docs = k8s_docs()
    docs[key] = mutation(docs[key])
    problems = problems_or_exception(lambda: kuberay_problems(docs))
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- ray up


def ray_up_config() -> dict:
    return load_yaml_all(RAY_UP)[0]


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: prepare_config, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_up_problems(config: dict) -> list[str]:
    p: list[str] = []
    docker = config.get("docker") or {}
    image = docker.get("image", "")
    if not image.endswith(f"/dg2pf:{VERSION}"):
        p.append(f"docker.image {image!r}: must be the dg2pf:{VERSION} image from a registry")
    run_options = " ".join(docker.get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options:
        p.append("docker.run_options: every container needs RAY_AUTH_MODE=token")
    if f":{SHARED_PATH}" not in run_options:
        p.append(f"docker.run_options: the shared file system must be mounted at {SHARED_PATH}")
    if (config.get("file_mounts") or {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        p.append("file_mounts: the Ray token (~/.ray/auth_token) must reach every node")
    commands = {k: v for k, v in config.items() if k.endswith("_commands")}
    for node_type, spec in (config.get("available_node_types") or {}).items():
        commands.update({f"{node_type}.{k}": v for k, v in spec.items() if k.endswith("_commands")})
    for key, lines in commands.items():
        for line in lines or []:
            if PIP_INSTALL.search(line):
                p.append(f"{key}: installs Python packages ({line!r}); the image holds everything")
            for args in ray_start_invocations(line):
                p.extend(ray_start_flag_problems(args, key))
    head_lines = " ".join(config.get("head_start_ray_commands", []))
    if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_lines or "--dashboard-host=0.0.0.0" not in head_lines:
        p.append("head_start_ray_commands: needs --autoscaling-config and --dashboard-host=0.0.0.0")
    if "--address=$RAY_HEAD_IP:6379" not in " ".join(config.get("worker_start_ray_commands", [])):
        p.append("worker_start_ray_commands: must join $RAY_HEAD_IP:6379")
    types = config.get("available_node_types") or {}
    if types.get(config.get("head_node_type"), {}).get("resources", {}).get("CPU") != 0:
        p.append("the head node type must offer CPU 0")
    if not any(t.get("resources", {}).get("GPU") for t in types.values()):
        p.append("no GPU worker node type")
    return p


def test_ray_up_config_passes_rays_own_validation():
    prepared = ray_up_validate(ray_up_config())
    assert prepared["head_node_type"] == "head"
    assert ray_up_problems(ray_up_config()) == []


@pytest.mark.parametrize("mutation", [
    _mutate("head_start_ray_commands", rename="head_start_ray_command"),
    _mutate("available_node_types/gpu-worker/resources", delete=True),
    _mutate("available_node_types/gpu-worker/resources/GPU", 0.5),
    _mutate("docker/image_name", "x"),
    _mutate("available_node_types/cpu-worker/min_workers", 20),
    _mutate("head_node_type", "boss"),
], ids=["misspelled-key", "node-type-without-resources", "fractional-resource", "unknown-docker-key",
        "min-workers-above-max", "unknown-head-type"])
def test_ray_up_validation_rejects_broken_configs(mutation):
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(mutation(ray_up_config()))


@pytest.mark.parametrize("mutation, expected", [
    (_mutate("setup_commands", ["pip install boto3"]), "installs Python packages"),
    (_mutate("worker_start_ray_commands/1", "ray start --address=$RAY_HEAD_IP:6379 --num-cpu=4"), "no option --num-cpu"),
    (_mutate("docker/run_options/2", "-e RAY_AUTH_MODE=disabled"), "RAY_AUTH_MODE"),
    (_mutate("docker/image", "rayproject/ray:2.60.0"), "docker.image"),
    (_mutate("available_node_types/head/resources/CPU", 4), "CPU 0"),
], ids=_case_id)
def test_ray_up_checks_reject_broken_configs(mutation, expected):
    problems = ray_up_problems(mutation(ray_up_config()))
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- Dockerfile


def readme_setup_command() -> str:
    """The README's set-up command: from the first bash block under "Two commands" (its quick start),
    either `bash scripts/setup.sh` itself or the set-up step every quick-start script runs first."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    if "bash scripts/setup.sh" in commands:
        return "bash scripts/setup.sh"
    steps = set()
    for command in commands:
        script = re.fullmatch(r"bash (scripts/[\w.-]+\.sh)", command)
        assert script, f"quick-start command {command!r} is not `bash scripts/X.sh`"
        lines = [ln.strip() for ln in (ROOT / script.group(1)).read_text().splitlines()]
        body = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
        steps.add(body[0])
    assert len(steps) == 1, f"the quick-start scripts start with different set-up steps: {steps}"
    return steps.pop()


def dockerfile_problems(text: str) -> list[str]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    structure = parser.structure
    p: list[str] = []
    setup = readme_setup_command()
    runs = [s["value"].strip() for s in structure if s["instruction"] == "RUN"]
    if runs.count(setup) != 1:
        p.append(f"RUN {setup!r} (the README's set-up command) must appear exactly once, got {runs}")
    p.extend(f"RUN installs Python packages itself: {r!r}" for r in runs if r != setup and PIP_INSTALL.search(r))
    if parser.baseimage != "python:3.11-slim":
        p.append(f"base image {parser.baseimage!r}: python:3.11-slim (requires-python {PYPROJECT['project']['requires-python']})")
    workdir = next((s["value"] for s in structure if s["instruction"] == "WORKDIR"), None)
    if workdir != "/app":
        p.append("WORKDIR must be /app")
    if f"{workdir}/.venv/bin" not in parser.envs.get("PATH", "").split(":"):
        p.append("PATH must start with the venv setup.sh creates (WORKDIR/.venv/bin)")
    if any(s["instruction"] == "ENTRYPOINT" for s in structure):
        p.append("no ENTRYPOINT: compose, KubeRay and `ray up` (`docker run IMAGE bash`) give the command")
    if not parser.cmd:
        p.append("a default CMD is needed")
    users = [i for i, s in enumerate(structure) if s["instruction"] == "USER"]
    setup_at = next((i for i, s in enumerate(structure) if s["instruction"] == "RUN" and s["value"].strip() == setup), -1)
    if not users or structure[users[-1]]["value"] in ("root", "0") or users[-1] < setup_at:
        p.append("the image must end as a non-root USER, set after the install")
    copied: list[tuple[str, str]] = []
    for s in structure:
        if s["instruction"] in ("COPY", "ADD"):
            words = [w for w in shlex.split(s["value"]) if not w.startswith("--")]
            if s["instruction"] == "ADD" or any(w.startswith("--from") for w in shlex.split(s["value"])):
                p.append(f"{s['instruction']} {s['value']}: only plain COPY from the build context")
            for src in words[:-1]:
                copied.append((src.rstrip("/"), words[-1]))
                if not (ROOT / src).exists():
                    p.append(f"COPY source {src} does not exist in the repository")
    sources = {src for src, _ in copied}
    if not setup_at > max((i for i, s in enumerate(structure) if s["instruction"] == "COPY"), default=-1):
        p.append("RUN setup.sh must come after every COPY (pip install -e needs the sources)")
    # What pyproject's packages need: the package directories, the readme, pyproject, the scripts.
    finder = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "scripts"}
    for where in finder["where"]:
        for child in (ROOT / where).iterdir():
            if child.is_dir() and any(fnmatch.fnmatch(child.name, pat) for pat in finder["include"]):
                needed.add(str(child.relative_to(ROOT)))
    for need in sorted(needed):
        if not any(need == src or need.startswith(src + "/") or src == "." for src in sources):
            p.append(f"nothing COPYs {need}, which pyproject.toml's install needs")
    for helper in ("deploy/docker/start-api.sh", "deploy/docker/healthcheck.py"):
        if helper not in sources:
            p.append(f"{helper} is not copied (compose and Kubernetes run it from /app/{helper})")
    ignored = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for must in (".git", ".venv", ".env", "dg2pf-data", "runs", "demo-out"):
        if must not in ignored:
            p.append(f".dockerignore must exclude {must}")
    for src in sources:
        if any(fnmatch.fnmatch(src, pat) for pat in ignored):
            p.append(f".dockerignore excludes the COPY source {src}")
    return p


def test_dockerfile_installs_exactly_the_readme_setup():
    assert readme_setup_command() == "bash scripts/setup.sh"
    assert 'pip install --quiet -e ".[dev]"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("edit, expected", [
    (("RUN bash scripts/setup.sh", "RUN bash scripts/setup.sh && .venv/bin/pip install boto3"), "must appear exactly once"),
    (("USER dg2pf", "RUN pip install --no-cache-dir ray\nUSER dg2pf"), "installs Python packages"),
    (("COPY service ./service\n", ""), "nothing COPYs service"),
    (("COPY clients ./clients", "COPY client ./clients"), "does not exist"),
    (("COPY scripts ./scripts\n", ""), "nothing COPYs scripts"),
    (("USER dg2pf", "USER root"), "non-root"),
    (("CMD [", 'ENTRYPOINT ["dg2pf"]\nCMD ['), "ENTRYPOINT"),
    (("ENV PATH=/app/.venv/bin:$PATH", "ENV PATH=/opt/venv/bin:$PATH"), "PATH"),
    (("FROM python:3.11-slim", "FROM python:3.12-slim"), "base image"),
], ids=_case_id)
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


@pytest.mark.parametrize("role, answers, healthy", [
    ("head", {"/api/gcs_healthz": (200, "success"), "/api/local_raylet_healthz": (200, "success")}, True),
    ("head", {"/api/gcs_healthz": (503, ""), "/api/local_raylet_healthz": (200, "success")}, False),
    ("head", {"/api/gcs_healthz": (200, "success")}, False),
    ("worker", {"/api/local_raylet_healthz": (200, "success")}, True),
    ("worker", {"/api/local_raylet_healthz": (503, "Local Raylet failed")}, False),
    ("api", {"/healthz": (200, '{"status":"ok"}')}, True),
    ("api", {"/healthz": (500, "")}, False),
    ("api-ready", {"/readyz": (503, '{"status":"not_ready"}')}, False),
    ("api-ready", {"/readyz": (200, '{"status":"ready"}')}, True),
])
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
        script.write_text(f"#!/usr/bin/env bash\n{{ echo \"ARGS $*\"; env; }} > {tmp_path}/{name}.out\n")
        script.chmod(0o755)
    return tmp_path


def run_start_api(fake: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{fake / 'bin'}:/usr/bin:/bin", "DG2PF_RAY_ADDRESS": "ray-head:6379", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": "t0k", "DG2PF_API_TOKENS": "secret-api-token", "DG2PF_DATABASE_URL": "postgresql+psycopg2://u:pw@db/x"}
    base.update(env)
    return subprocess.run(["bash", str(START_API), *args], env={k: v for k, v in base.items() if v is not None},
                          capture_output=True, text=True, timeout=30)


def test_start_api_runs_the_service_and_no_ray(fake_bin):
    """The API is no Ray node: no `ray` command at all, only the service, with its whole environment."""
    assert "ray start" not in START_API.read_text()
    proc = run_start_api(fake_bin, "--port", "8000")
    assert proc.returncode == 0, proc.stderr
    assert not (fake_bin / "ray.out").exists()
    python_out = (fake_bin / "python.out").read_text()
    assert python_out.splitlines()[0] == "ARGS -m dg2pf_service --port 8000"
    env = set(python_out.splitlines()[1:])
    assert {"DG2PF_API_TOKENS=secret-api-token", "DG2PF_DATABASE_URL=postgresql+psycopg2://u:pw@db/x",
            "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=t0k", "DG2PF_RAY_ADDRESS=ray-head:6379"} <= env


@pytest.mark.parametrize("env, message", [
    ({"RAY_AUTH_MODE": None}, "RAY_AUTH_MODE must be 'token'"),
    ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE must be 'token'"),
    ({"DG2PF_RAY_ADDRESS": None}, "DG2PF_RAY_ADDRESS"),
    # The dashboard URL alone is not enough: without DG2PF_RAY_ADDRESS the service starts a Ray head of its own.
    ({"DG2PF_RAY_ADDRESS": None, "DG2PF_RAY_DASHBOARD_URL": "http://ray-head:8265"}, "DG2PF_RAY_ADDRESS"),
])
def test_start_api_refuses_without_auth_or_address(fake_bin, env, message):
    proc = run_start_api(fake_bin, **env)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (fake_bin / "ray.out").exists() and not (fake_bin / "python.out").exists()
