"""deploy/kuberay/: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict mode), the RayCluster's
fields against an allow-list of KubeRay ray.io/v1 names (its CRD is not available offline), and the
cross-resource checks (names, ports, the shared claim, auth, secrets)."""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

import kubernetes_validate
from deploy_files import KUBERAY, RAY_PIN, SHARED_PATH, VERSION, load_yaml_all, ray_start_flag_problems

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


# The KubeRay ray.io/v1 fields this project may use (the CRD is not available offline; these names
# and types are those of KubeRay's RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions).
RAYCLUSTER_TOP = {"apiVersion", "kind", "metadata", "spec"}


RAYCLUSTER_SPEC = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
}


AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
}


HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}


WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
}


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
        p.append(
            f"spec.rayVersion {spec.get('rayVersion')!r}: "
            f"must be the installed and pinned Ray ({ray_version}, {RAY_PIN})"
        )
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
        container = {
            "name": "autoscaler",
            "image": "x",
            **{
                k: options[k]
                for k in ("env", "envFrom", "resources", "securityContext", "volumeMounts")
                if k in options
            },
        }
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


def pod_specs(docs: dict) -> dict[str, dict]:
    rc = docs["RayCluster/dg2pf"]["spec"]
    pods = {
        "api": docs["Deployment/dg2pf-api"]["spec"]["template"]["spec"],
        "ray-head": rc["headGroupSpec"]["template"]["spec"],
    }
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
    if (
        not rc["spec"].get("enableInTreeAutoscaling")
        or auto_env.get("RAY_AUTH_MODE") != "token"
        or auto_env.get("RAY_AUTH_TOKEN") != token_ref
    ):
        p.append("RayCluster: the autoscaler sidecar needs RAY_AUTH_MODE=token and the Ray token")
    gpu_groups = [
        g
        for g in rc["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    ]
    if not gpu_groups or any(g["minReplicas"] != 0 for g in gpu_groups):
        p.append("RayCluster: needs a GPU worker group (nvidia.com/gpu limit) scaling from minReplicas 0")
    if len(rc["spec"]["workerGroupSpecs"]) == len(gpu_groups):
        p.append("RayCluster: needs a CPU worker group too")
    for name, pod in pod_specs(docs).items():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
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
    if (api["readinessProbe"].get("httpGet") or {}).get("path") != "/readyz" or (
        api["livenessProbe"].get("httpGet") or {}
    ).get("path") != "/healthz":
        p.append("api: readiness on /readyz, liveness on /healthz")
    if docs["Deployment/dg2pf-api"]["spec"]["replicas"] != 1:
        p.append("api: one replica (it runs the scheduler)")
    return p
