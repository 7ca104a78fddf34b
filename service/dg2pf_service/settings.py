"""The service's settings: one object, read from ``DG2PF_*`` environment variables.

Everything the service writes lives under ``data_dir`` unless a setting points elsewhere, so a
single volume is enough to run it. Build ``Settings(...)`` with explicit values in tests; the
service calls ``get_settings()`` once at start-up and passes the object down.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3


def _comma_list(value: Any) -> Any:
    # Environment variables arrive as one string; pydantic-settings would parse lists as JSON,
    # which nobody writes in a compose file. Explicit lists (from code) pass through untouched.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DG2PF_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    data_dir: Path = Field(Path("./dg2pf-data"), description="root of everything the service writes")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: a SQLite file in data_dir")
    # Ray's own variable is honoured so the service joins the cluster `ray start` / KubeRay set up;
    # DG2PF_RAY_ADDRESS wins when both are set (AliasChoices tries them in order).
    ray_address: str | None = Field(None, validation_alias=AliasChoices("DG2PF_RAY_ADDRESS", "RAY_ADDRESS"))
    ray_dashboard_url: str | None = Field(
        None, description="the cluster's dashboard (Jobs API); default http://<ray_address host>:8265"
    )
    # An autoscaling cluster (KubeRay, `ray up`) may have no GPU node until a job asks for one: jobs up to
    # these sizes are accepted and dispatched, and Ray starts the nodes (raise worker_start_timeout_s to
    # cover a node's start-up). Default: only what the cluster has now.
    cluster_max_cpus: float | None = Field(None, ge=0, description="CPUs the cluster can scale up to")
    cluster_max_gpus: float | None = Field(None, ge=0, description="GPUs the cluster can scale up to")
    worker_start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long Ray Train waits to place a job's workers before "
        "it counts a failed attempt (after a node is lost, for example)",
    )
    storage_uri: str | None = Field(None, description="Ray Train/Tune storage; default: data_dir/ray")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories a job may read datasets and checkpoints from; default [data_dir/datasets]; "
        "set to an empty string to allow uploads only",
    )
    # repr=False and exclude=True keep tokens out of logs, error reports and model_dump().
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False, exclude=True)
    max_upload_bytes: int = Field(2 * GIB, gt=0)
    max_uncompressed_bytes: int | None = Field(
        None,
        gt=0,
        description="largest in-memory size an uploaded checkpoint may "
        "declare (zip directory, safetensors header), checked before it is read; "
        "default 4 x max_upload_bytes",
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an upload whose body sends nothing for this long is aborted (408)"
    )
    upload_timeout_s: float = Field(
        3600.0, gt=0, description="an upload not received in full within this long is aborted (408)"
    )
    upload_validations: int = Field(
        2,
        ge=1,
        description="uploaded checkpoints checked at once; each may hold up to "
        "max_uncompressed_bytes (plus its finiteness check) in memory",
    )
    max_request_bytes: int = Field(
        1024 * 1024,
        gt=0,
        description="largest body of any request but an upload (a JobSpec is "
        "a few KB); larger ones get 413 before they are read",
    )
    request_body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a request body (uploads aside) not complete within this "
        "long gets 408; one that sends nothing for upload_idle_timeout_s too",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that has not sent a complete request line and "
        "headers this long after it opened (or after its previous response) is closed",
    )
    max_header_bytes: int = Field(64 * 1024, ge=4096, description="request line and headers larger than this get 400")
    max_connections: int = Field(
        4096,
        ge=1,
        description="a request that finds this many connections open (or requests in "
        "flight) gets 503, unless it presents a valid token (DG2PF_API_TOKENS)",
    )
    max_connections_per_client: int = Field(
        100,
        ge=0,
        description="open connections one client address (an IPv6 client: "
        "its /64) may hold; one more is answered 503 and closed as it is accepted. "
        "0: no limit (behind a reverse proxy, every connection has the proxy's address)",
    )
    max_model_params: int = Field(
        1_000_000_000,
        ge=1,
        description="architectures with more parameters (counted before anything is built) are refused at submit",
    )
    poll_seconds: float = Field(1.0, gt=0)
    job_max_restarts: int = Field(
        2,
        ge=0,
        le=100,
        description="times a job whose Ray work was lost (head restarted, node "
        "lost, runner killed) is resubmitted to resume from its last epoch before it fails",
    )
    cluster_lost_timeout_s: float = Field(
        600.0,
        gt=0,
        description="running jobs fail when an external Ray cluster has not "
        "answered for this long (an embedded head is restarted instead)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # Serving (Ray Serve). The HTTP proxy is cluster-wide and fixed once Serve has started.
    serve_host: str = Field("127.0.0.1", description="interface of Ray Serve's HTTP proxy")
    serve_port: int = Field(8001, ge=1, le=65535, description="port of Ray Serve's HTTP proxy")
    serve_public_url: str | None = Field(
        None, description="base URL clients reach Serve at; default http://serve_host:serve_port"
    )
    serve_replicas: int = Field(1, ge=1, description="replicas (the minimum when autoscaling)")
    serve_max_replicas: int | None = Field(None, ge=1, description="autoscale up to this many replicas when set")
    serve_cpus_per_replica: float = Field(1.0, ge=0)
    serve_gpus_per_replica: float = Field(0.0, ge=0)
    # What computes a served model's logits; preprocessing, top-k and errors are the same either way.
    serve_backend: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="'torch': the job's pruned architecture in PyTorch; 'onnxruntime': the job's model.onnx on "
        "ONNX Runtime's CPU provider (a job without one, its export having failed, is served by PyTorch)",
    )
    serve_max_models_per_replica: int = Field(4, ge=1, description="models kept loaded per replica (LRU)")
    serve_max_batch_size: int = Field(32, ge=1, description="requests batched into one forward pass")
    serve_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="how long a batch waits to fill (requests that arrive "
        "while a forward pass runs are batched anyway)",
    )
    serve_max_ongoing_requests: int = Field(128, ge=1, description="requests in flight per replica")
    serve_max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)
    serve_max_inputs: int = Field(64, ge=1, description="inputs (tensors or images) per predict request")
    serve_access_log: bool = Field(False, description="Serve's per-request access logs (cost CPU per request)")
    serve_poll_seconds: float = Field(2.0, gt=0, description="how often the serving supervisor reconciles")
    mlflow_tracking_uri: str | None = Field(
        None,
        repr=False,
        description="log every job to MLflow (params, per-epoch metrics, results, "
        "artifacts): sqlite:///mlflow.db (under data_dir), http://mlflow:5000, ...; needs "
        "pip install 'dg2pf[mlflow]'",
    )
    mlflow_experiment: str = Field("dg2pf", min_length=1, description="the MLflow experiment the jobs' runs go to")
    mlflow_artifact_location: str | None = Field(
        None,
        description="where the experiment keeps the runs' artifacts when "
        "the service creates it; default: data_dir/mlflow-artifacts for a "
        "sqlite:// or file: store, the server's own for an MLflow server",
    )
    mlflow_poll_seconds: float = Field(2.0, gt=0, description="how often new epochs and ended jobs are sent to MLflow")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once here, so a later chdir (Ray workers, tests) cannot move the data.
        return value.expanduser().resolve()

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _mlflow_installed(cls, value: str | None) -> str | None:
        # Checked before anything starts (a Ray head, the API), not when the first job would be logged.
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value.startswith("file:") or ("://" not in value and not value.startswith("databricks")):
            raise ValueError(
                "a file store (a path or file:), which MLflow 3 no longer opens: give a database "
                "(sqlite:///mlflow.db, relative to DG2PF_DATA_DIR, or sqlite:////abs/path.db) or an MLflow "
                "server (http://mlflow:5000)"
            )
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("MLflow is not installed: pip install 'dg2pf[mlflow]' (mlflow-skinny), or unset it")
        return value

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in value]

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        # model_fields_set holds both constructor and environment values, so an explicitly empty
        # DG2PF_DATA_ROOTS stays empty instead of falling back to the default.
        if "data_roots" not in self.model_fields_set:
            self.data_roots = [self.data_dir / "datasets"]
        if self.storage_uri is None:
            self.storage_uri = str(self.data_dir / "ray")
        uri = self.mlflow_tracking_uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
            # A relative SQLite path is the data directory's, like everything else the service writes (not
            # the working directory's, which a restart from elsewhere would change).
            self.mlflow_tracking_uri = f"sqlite:///{self.data_dir / uri.removeprefix('sqlite:///')}"
        if (
            self.mlflow_tracking_uri
            and self.mlflow_tracking_uri.startswith("sqlite:")
            and self.mlflow_artifact_location is None
        ):
            # MLflow's own default for a local store is ./mlruns of the process's working directory.
            self.mlflow_artifact_location = str(self.data_dir / "mlflow-artifacts")
        if self.serve_max_replicas is not None and self.serve_max_replicas < self.serve_replicas:
            raise ValueError(
                f"serve_max_replicas ({self.serve_max_replicas}) must be >= serve_replicas ({self.serve_replicas})"
            )
        if self.serve_backend == "onnxruntime" and self.serve_gpus_per_replica > 0:
            raise ValueError(
                f"serve_backend 'onnxruntime' runs on the CPU, so the {self.serve_gpus_per_replica:g} GPU(s) per "
                "replica (serve_gpus_per_replica) would sit idle: set serve_gpus_per_replica to 0, or serve "
                "on the GPU with serve_backend 'torch'"
            )
        return self

    @property
    def db_url(self) -> str:
        """The effective database URL: ``database_url`` or the SQLite file under ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'dg2pf.db'}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def serving_dir(self) -> Path:
        return self.data_dir / "serving" / "models"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens)


# Never echoed back in an error message: they may hold a password or a token.
_SECRET_FIELDS = {"api_tokens", "database_url"}


def invalid_settings_message(exc: ValidationError) -> str:
    """What ``Settings()`` refused, one clause per problem, each naming the environment variable an
    operator sets (``DG2PF_SERVE_BACKEND: Input should be 'torch' or 'onnxruntime' (got 'tensorrt')``)."""
    clauses = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a check across settings (model_validator): its message names them
            clauses.append(message)
            continue
        name = loc[0] if loc[0].isupper() else f"DG2PF_{loc[0].upper()}"  # an alias (RAY_ADDRESS) is already a variable
        given = "" if loc[0] in _SECRET_FIELDS or "input" not in error else f" (got {error['input']!r})"
        clauses.append(f"{name}: {message}{given}")
    return "invalid settings: " + "; ".join(clauses)


def get_settings() -> Settings:
    """Settings from the environment, read afresh on every call (cheap; tests build their own)."""
    return Settings()
