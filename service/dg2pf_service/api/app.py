"""The FastAPI application: routes, error shape, and the scheduler's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..lifecycle import DataDirHold
from ..services import Services, build
from ..settings import Settings
from . import checkpoints, errors, health, jobs, models


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cfg = services.settings if services is not None else (settings or Settings())
        hold = DataDirHold(cfg.data_dir)  # `dg2pf cluster stop` refuses while an API holds the data dir
        try:
            svc = services or build(cfg)
            app.state.services = svc
            svc.scheduler.tick()  # re-attach to running jobs, resubmit lost ones, dispatch the queue
            svc.scheduler.start(svc.settings.poll_seconds)
            svc.serving.start(svc.settings.serve_poll_seconds)  # restores deployed models (registry + Serve app)
            yield
            svc.serving.stop()
            svc.scheduler.stop()
        finally:
            hold.release()

    app = FastAPI(title="dg2pf", version="0.1.0", description="DG2PF pruning jobs on Ray", lifespan=lifespan)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(checkpoints.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    return app
