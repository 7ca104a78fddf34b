"""What a serving replica needs to know, as plain values (they travel to the replicas).

Built from the service's Settings by ``from_settings``; tokens travel as SHA-256 digests only, so
the Serve application's config (visible in the Ray dashboard) never holds a usable token.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

APP_NAME = "dg2pf"
DEPLOYMENT_NAME = "ModelServer"
# The application builder Serve imports on the cluster (declarative deploys through the REST API).
IMPORT_PATH = "dg2pf_service.serving.app:app_builder"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ServeOptions:
    serving_dir: str  # the model registry (one JSON file per deployed model), on shared storage
    token_digests: tuple[str, ...] = ()
    replicas: int = 1
    max_replicas: int | None = None  # autoscaling between replicas and max_replicas when set
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    backend: str = "torch"  # "torch" | "onnxruntime": what computes the logits (serving/backends.py)
    max_models_per_replica: int = 4
    max_batch_size: int = 32
    batch_wait_ms: float = 0.0
    max_ongoing_requests: int = 128
    max_request_bytes: int = 8 * 1024 * 1024
    max_inputs: int = 64
    host: str = "127.0.0.1"
    port: int = 8001
    access_log: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> ServeOptions:
        return cls(
            serving_dir=str(settings.serving_dir),
            token_digests=tuple(token_digest(t) for t in settings.api_tokens),
            replicas=settings.serve_replicas,
            max_replicas=settings.serve_max_replicas,
            cpus_per_replica=settings.serve_cpus_per_replica,
            gpus_per_replica=settings.serve_gpus_per_replica,
            backend=settings.serve_backend,
            max_models_per_replica=settings.serve_max_models_per_replica,
            max_batch_size=settings.serve_max_batch_size,
            batch_wait_ms=settings.serve_batch_wait_ms,
            max_ongoing_requests=settings.serve_max_ongoing_requests,
            max_request_bytes=settings.serve_max_request_bytes,
            max_inputs=settings.serve_max_inputs,
            host=settings.serve_host,
            port=settings.serve_port,
            access_log=settings.serve_access_log,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeOptions:
        values = dict(values)
        values["token_digests"] = tuple(values.get("token_digests", ()))
        return cls(**values)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas

    @property
    def replica_ceiling(self) -> int:
        """The most replicas there can be: ``max_replicas`` when autoscaling, else ``replicas``."""
        return self.max_replicas if self.autoscaling and self.max_replicas is not None else self.replicas

    @property
    def reserved_cpus(self) -> float:
        """CPUs the serving replicas may hold at most (what jobs cannot count on)."""
        return self.cpus_per_replica * self.replica_ceiling

    @property
    def reserved_gpus(self) -> float:
        return self.gpus_per_replica * self.replica_ceiling
