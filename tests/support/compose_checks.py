"""docker-compose.yml: Compose's variable interpolation, the official Compose Specification schema (vendored
by check-jsonschema), and what the schema cannot see (depends_on, volumes, the shared /data volume, GPUs,
secrets, Ray auth)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import jsonschema
from deploy_files import (
    API_SECRETS,
    COMPOSE,
    ENV_EXAMPLE,
    RAY_SERVICES,
    REQUIRED_SECRETS,
    SHARED_PATH,
    SHARED_VOLUME,
    load_yaml_all,
    ray_start_flag_problems,
)

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
            elif (
                isinstance(svc["depends_on"], dict)
                and svc["depends_on"][dep].get("condition") == "service_healthy"
                and "healthcheck" not in services[dep]
            ):
                p.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        for source, _target in volume_mounts(svc):
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
        p.append(
            f"api: DG2PF_RAY_ADDRESS {api_env.get('DG2PF_RAY_ADDRESS')!r} is not ray-head's GCS (ray-head:{gcs_port})"
        )
    if api_env.get("DG2PF_RAY_DASHBOARD_URL") != f"http://ray-head:{dash_port}":
        p.append("api: DG2PF_RAY_DASHBOARD_URL is not ray-head's dashboard")
    if api_env.get("DG2PF_DATA_DIR") != SHARED_PATH:
        p.append(f"api: DG2PF_DATA_DIR must be the shared {SHARED_PATH}")
    if not str(api_env.get("DG2PF_DATABASE_URL", "")).startswith(
        "postgresql+psycopg2://"
    ) or "@postgres:5432/" not in api_env.get("DG2PF_DATABASE_URL", ""):
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
