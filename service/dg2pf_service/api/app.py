"""The FastAPI application: routes, error shape, and the scheduler's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..services import Services, build
from ..settings import Settings
from . import checkpoints, errors, health, jobs, models


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services or build(settings or Settings())
        app.state.services = svc
        svc.scheduler.tick()  # re-attach to running jobs, resubmit lost ones, dispatch the queue
        svc.scheduler.start(svc.settings.poll_seconds)
        svc.serving.start(svc.settings.serve_poll_seconds)  # restores deployed models (registry + Serve app)
        yield
        svc.serving.stop()
        svc.scheduler.stop()

    app = FastAPI(title="dg2pf", version="0.1.0", description="DG2PF pruning jobs on Ray", lifespan=lifespan)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(checkpoints.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    return app
