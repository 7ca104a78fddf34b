"""deploy/docker/Dockerfile, parsed with dockerfile-parse: its only Python install step is the README's
set-up command, and it copies what pyproject.toml's install needs."""

from __future__ import annotations

import fnmatch
import io
import re
import shlex

from deploy_files import DOCKERFILE, DOCKERIGNORE, PIP_INSTALL, PYPROJECT, ROOT
from dockerfile_parse import DockerfileParser


def dockerfile_env() -> dict[str, str]:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes())).envs


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
        p.append(
            f"base image {parser.baseimage!r}: python:3.11-slim "
            f"(requires-python {PYPROJECT['project']['requires-python']})"
        )
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
    setup_at = next(
        (i for i, s in enumerate(structure) if s["instruction"] == "RUN" and s["value"].strip() == setup), -1
    )
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
