"""Deploying and undeploying a job's pruned model: the rules the API and the scheduler share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dg2pf_contract.artifacts import Artifacts
from dg2pf_core.errors import DG2PFError

from ..store.models import DeploymentRow, JobRow
from ..store.repo import JobStore
from .registry import ModelRegistry, RegisteredModel
from .supervisor import ServingSupervisor


class NotDeployable(DG2PFError):
    field = "state"


class Deployments:
    def __init__(self, store: JobStore, supervisor: ServingSupervisor, jobs_output: Callable[[JobRow], Path]) -> None:
        """``jobs_output(row)`` is the output directory of a job row."""
        self.store, self.supervisor, self.jobs_output = store, supervisor, jobs_output
        self.registry = ModelRegistry(supervisor.options.serving_dir)

    def deploy(self, job_id: str) -> DeploymentRow:
        row = self.store.get_job(job_id)
        if row is None:
            raise NotDeployable(f"no job with id {job_id!r}", field="id")
        if row.state != "succeeded":
            raise NotDeployable(f"job {job_id} is {row.state}; only succeeded jobs can be deployed")
        out = Path(self.jobs_output(row))
        files = Artifacts(out)
        if not files.metrics.is_file() or not files.weights.is_file():
            raise NotDeployable(f"job {job_id} has no model files in {out}; was its output removed?", field="artifacts")
        deployment = self.store.add_deployment(job_id, str(out))
        self.registry.put(RegisteredModel(job_id, str(out)))  # servable at once if the app is up
        self.supervisor.poke()
        return deployment

    def undeploy(self, model_id: str) -> bool:
        removed = self.store.remove_deployment(model_id)
        self.registry.remove(model_id)
        self.supervisor.poke()
        return removed
