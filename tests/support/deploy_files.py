"""The deployment files the deploy checks read (paths, pins, the shared volume and secrets), and what the
checks of every file share: parsed YAML, `ray start`'s own options, the DG2PF_* names Settings reads."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


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


RAY_PIN = next(
    re.sub(r"^ray(\[[^]]*\])?==", "", d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray")
)


SHARED_VOLUME, SHARED_PATH = "dg2pf-data", "/data"


API_SECRETS = ("DG2PF_API_TOKENS", "DG2PF_DATABASE_URL")


REQUIRED_SECRETS = ("RAY_AUTH_TOKEN", "DG2PF_API_TOKENS", "POSTGRES_PASSWORD")


RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu")


PIP_INSTALL = re.compile(r"\b(pip3?|uv|conda|mamba|poetry|pipenv|easy_install)\b[^&|;]*\b(install|sync|add)\b")


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
    return [
        f"{where}: `ray start` has no option {a.split('=')[0]}"
        for a in args
        if a.startswith("--") and a.split("=", 1)[0] not in known
    ]


def ray_start_invocations(shell: str) -> list[list[str]]:
    """The argument lists of every `ray start` in a shell command line."""
    words = shlex.split(shell.replace(";", " ; ").replace("&&", " && "))
    out, i = [], 0
    while i < len(words) - 1:
        if words[i] == "ray" and words[i + 1] == "start":
            j = i + 2
            while j < len(words) and words[j] not in (";", "&&", "||", "|"):
                j += 1
            out.append(words[i + 2 : j])
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
    return [
        f"{where}: {n} is not a Settings field or alias"
        for n in sorted(names)
        if n.upper().startswith("DG2PF_") and n.upper() not in known
    ]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Settings() exactly as the service builds it, from this environment only."""
    from dg2pf_service.settings import Settings

    for key in list(os.environ):
        if key.upper().startswith("DG2PF_") or key.upper() == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()
