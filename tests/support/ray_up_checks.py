"""deploy/ray-cluster.yaml: Ray's own `ray up` validation, and what it cannot see (the image, auth, the
shared file system, no package installs on the nodes)."""

from __future__ import annotations

import copy

from deploy_files import (
    PIP_INSTALL,
    RAY_UP,
    SHARED_PATH,
    VERSION,
    load_yaml_all,
    ray_start_flag_problems,
    ray_start_invocations,
)


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
    if (
        "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_lines
        or "--dashboard-host=0.0.0.0" not in head_lines
    ):
        p.append("head_start_ray_commands: needs --autoscaling-config and --dashboard-host=0.0.0.0")
    if "--address=$RAY_HEAD_IP:6379" not in " ".join(config.get("worker_start_ray_commands", [])):
        p.append("worker_start_ray_commands: must join $RAY_HEAD_IP:6379")
    types = config.get("available_node_types") or {}
    if types.get(config.get("head_node_type"), {}).get("resources", {}).get("CPU") != 0:
        p.append("the head node type must offer CPU 0")
    if not any(t.get("resources", {}).get("GPU") for t in types.values()):
        p.append("no GPU worker node type")
    return p
