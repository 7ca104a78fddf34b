"""API side of serving: keep the Serve application deployed while the database lists any model.

``reconcile`` is idempotent and runs at start-up and then every few seconds in its own thread (a
Serve deployment can take a minute to come up, so it must not hold up job scheduling). It rewrites
the registry files from the database, deploys the application when models are listed but the app
is missing (a fresh or restarted Ray cluster) or failed, and shuts Serve down (the REST API's DELETE:
the application and its HTTP proxy) when no model is listed, handing its CPUs back to pruning jobs.
An application that runs with other options than this service's (the API restarted with another
``DG2PF_SERVE_BACKEND``, other tokens or limits, while the Ray cluster and Serve kept running) is
redeployed with this service's: what GET /models says is what answers.

It talks to Serve only through the dashboard's REST API (``/api/serve/applications/``: a
declarative config naming the application builder ``IMPORT_PATH``), as ``serve deploy`` and
KubeRay do: the API process is not a Ray driver, so a lost Ray head cannot take it down, and a
restarted head gets the application back on the next reconcile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..cluster import auth_headers
from ..conditions import Conditions
from .options import APP_NAME, IMPORT_PATH, ServeOptions
from .registry import ModelRegistry

log = logging.getLogger("dg2pf.serving")

REDEPLOY_BACKOFF_S = 30.0

# Serve's application status -> what GET /models reports for each model.
_MODEL_STATUS = {
    "RUNNING": "ready",
    "DEPLOYING": "deploying",
    "NOT_STARTED": "deploying",
    "UNHEALTHY": "unhealthy",
    "DEPLOY_FAILED": "failed",
    "DELETING": "deploying",
}


SERVE_API = "/api/serve/applications/"


class ServeApiError(RuntimeError):
    pass


@dataclass(frozen=True)
class AppState:
    """The dg2pf application as Serve reports it."""

    status: str | None  # Serve's status (RUNNING, DEPLOYING, ...), None when there is no application
    message: str
    options: ServeOptions | None  # what it was deployed with; None when absent or not readable as ours


@dataclass(frozen=True)
class ServingStatus:
    """What GET /models reports for every deployed model."""

    status: str  # ready | deploying | unhealthy | failed | pending
    message: str | None
    backend: str  # DG2PF_SERVE_BACKEND of the application that answers (this service's while there is none)


def _deployed_options(app: dict) -> ServeOptions | None:
    args = (app.get("deployed_app_config") or {}).get("args")
    try:
        return ServeOptions.from_dict(args) if isinstance(args, dict) else None
    except (TypeError, ValueError):  # deployed by another version of the service
        return None


def differences(running: ServeOptions | None, wanted: ServeOptions) -> list[str]:
    """The options in which the running application differs from ``wanted``, as "name a -> b" (token
    digests by name only)."""
    if running is None:
        return ["options unreadable"]
    out = []
    for f in dataclasses.fields(ServeOptions):
        a, b = getattr(running, f.name), getattr(wanted, f.name)
        if a != b:
            out.append(f.name if f.name == "token_digests" else f"{f.name} {a} -> {b}")
    return out


class ServingSupervisor:
    def __init__(
        self, options: ServeOptions, wanted: Callable[[], dict[str, str]], dashboard_url: Callable[[], str]
    ) -> None:
        """``wanted()`` returns the deployed models from the database: model id -> job output dir;
        ``dashboard_url()`` the Ray dashboard's URL now (it changes when an embedded head is restarted)."""
        self.options, self.wanted, self.dashboard_url = options, wanted, dashboard_url
        self.registry = ModelRegistry(options.serving_dir)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_deploy = float("-inf")
        self._app_may_exist = True  # until Serve says otherwise (an app left by an earlier API process)
        self.last_error: str | None = None
        self._conditions = Conditions(log)

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def model_url(self, model_id: str, public_url: str | None = None) -> str:
        return f"{(public_url or self.url).rstrip('/')}/models/{model_id}/predict"

    # --- state --------------------------------------------------------------------------------

    def _request(self, method: str, body: dict | None = None) -> dict:
        try:
            r = httpx.request(
                method, f"{self.dashboard_url().rstrip('/')}{SERVE_API}", json=body, headers=auth_headers(), timeout=30
            )
        except httpx.HTTPError as exc:
            raise ServeApiError(f"Ray's Serve API does not answer: {exc}") from exc
        if r.status_code >= 400:
            raise ServeApiError(f"Ray's Serve API refused {method}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content and method == "GET" else {}

    def app_state(self) -> AppState:
        app = (self._request("GET").get("applications") or {}).get(APP_NAME)
        if not app:
            return AppState(None, "", None)
        return AppState(str(app.get("status")), app.get("message") or "", _deployed_options(app))

    def app_status(self) -> tuple[str | None, str]:
        """(Serve's status of the dg2pf application or None when absent, its message)."""
        state = self.app_state()
        return state.status, state.message

    def model_status(self) -> ServingStatus:
        """What GET /models reports for every deployed model: the status, Serve's message if any, and
        the backend of the application that answers, which differs from this service's only until
        the redeploy ``reconcile`` starts is done (or when Serve refused it: the message says so)."""
        state = self.app_state()
        status = _MODEL_STATUS.get(state.status or "", "pending")
        message = state.message or self.last_error or None
        running = state.options.backend if state.options is not None else None
        if state.status is None or running is None or running == self.options.backend:
            return ServingStatus(status, message, self.options.backend)
        if status == "ready":  # Serve has not taken the redeploy up yet: the old replicas answer
            status = "deploying"
        note = (
            f"answered by the replicas running DG2PF_SERVE_BACKEND={running} until they are redeployed with this "
            f"service's {self.options.backend}"
        )
        return ServingStatus(status, f"{note}; {message}" if message else note, running)

    # --- reconcile ----------------------------------------------------------------------------

    def reconcile(self) -> None:
        with self._lock:
            wanted = self.wanted()
            self.registry.sync(wanted)
            if not wanted and not self._app_may_exist:
                return  # nothing to serve and nothing to clean up: no need to ask Serve
            state = self.app_state()
            status = state.status
            self._app_may_exist = status is not None
            if wanted and status in (None, "DEPLOY_FAILED"):
                if status == "DEPLOY_FAILED":
                    self.last_error = state.message
                    if time.monotonic() - self._last_deploy < REDEPLOY_BACKOFF_S:
                        return
                self._deploy()
            elif wanted and status != "DELETING" and state.options != self.options:
                # Left by an API process with other settings: Serve replaces the replicas, one by one.
                if time.monotonic() - self._last_deploy < REDEPLOY_BACKOFF_S:
                    return
                log.warning(
                    "the Serve application %r runs with other options than this service's (%s): redeploying it",
                    APP_NAME,
                    ", ".join(differences(state.options, self.options)),
                )
                self._deploy()
            elif not wanted and status is not None and status != "DELETING":
                self._delete()

    def config(self) -> dict:
        """The declarative Serve config of the dg2pf application (what ``serve deploy`` would send)."""
        # Per-request access logs cost the proxy and the replica more CPU than a small model's forward
        # pass; they are off unless asked for (DG2PF_SERVE_ACCESS_LOG).
        logging = {
            "enable_access_log": self.options.access_log,
            "log_level": "INFO" if self.options.access_log else "WARNING",
        }
        return {
            # Serve's HTTP options are cluster-wide and fixed once Serve runs.
            "proxy_location": "HeadOnly",
            "http_options": {"host": self.options.host, "port": self.options.port},
            "logging_config": logging,
            "applications": [
                {
                    "name": APP_NAME,
                    "route_prefix": "/",
                    "import_path": IMPORT_PATH,
                    "args": self.options.to_dict(),
                    "logging_config": logging,
                }
            ],
        }

    def _deploy(self) -> None:
        log.info("deploying the Serve application %r on port %s", APP_NAME, self.options.port)
        self._last_deploy = time.monotonic()
        self._app_may_exist = True
        self._request("PUT", self.config())

    def _delete(self) -> None:
        log.info("no model is deployed: shutting Serve down (the application %r and its proxy)", APP_NAME)
        self._request("DELETE")

    # --- background loop ----------------------------------------------------------------------

    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while True:
                try:
                    self.reconcile()
                    self._conditions.ok("serving", "serving reconcile")
                except Exception as exc:  # noqa: BLE001 - keep trying; Ray may be briefly unreachable
                    self._conditions.failed("serving", "serving reconcile failed", exc)
                self._wake.wait(poll_seconds)
                self._wake.clear()
                if self._stop.is_set():
                    return

        self._thread = threading.Thread(target=loop, name="dg2pf-serving", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Reconcile now rather than at the next poll (a model was deployed or removed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
