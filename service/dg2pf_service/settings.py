"""The service's settings: one object, read from ``DG2PF_*`` environment variables.

Everything the service writes lives under ``data_dir`` unless a setting points elsewhere, so a
single volume is enough to run it. Build ``Settings(...)`` with explicit values in tests; the
service calls ``get_settings()`` once at start-up and passes the object down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3


def _comma_list(value: Any) -> Any:
    # Environment variables arrive as one string; pydantic-settings would parse lists as JSON,
    # which nobody writes in a compose file. Explicit lists (from code) pass through untouched.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DG2PF_", extra="ignore", validate_by_name=True, validate_by_alias=True)

    data_dir: Path = Field(Path("./dg2pf-data"), description="root of everything the service writes")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: a SQLite file in data_dir")
    # Ray's own variable is honoured so the service joins the cluster `ray start` / KubeRay set up;
    # DG2PF_RAY_ADDRESS wins when both are set (AliasChoices tries them in order).
    ray_address: str | None = Field(None, validation_alias=AliasChoices("DG2PF_RAY_ADDRESS", "RAY_ADDRESS"))
    storage_uri: str | None = Field(None, description="Ray Train/Tune storage; default: data_dir/ray")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories a job may read datasets and checkpoints from; default [data_dir/datasets]; "
        "set to an empty string to allow uploads only",
    )
    # repr=False and exclude=True keep tokens out of logs, error reports and model_dump().
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False, exclude=True)
    max_upload_bytes: int = Field(2 * GIB, gt=0)
    poll_seconds: float = Field(1.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

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
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens)


def get_settings() -> Settings:
    """Settings from the environment, read afresh on every call (cheap; tests build their own)."""
    return Settings()
