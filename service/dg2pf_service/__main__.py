"""``python -m dg2pf_service [--host H] [--port P]``: the API with its scheduler (settings from DG2PF_*)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pydantic import ValidationError

from .settings import Settings, invalid_settings_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dg2pf-service")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # refused before anything starts, in one line naming the variables
        print(f"dg2pf: error: {invalid_settings_message(exc)}", file=sys.stderr)
        return 2
    # Ray 2.60 clusters (the embedded head, `ray start`, KubeRay) demand a token (RAY_AUTH_TOKEN or
    # ~/.ray/auth_token). Ray reads the mode when it is first imported, hence before importing anything
    # that imports ray. Set RAY_AUTH_MODE=disabled explicitly for a cluster that runs without auth.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from dg2pf_core.errors import DG2PFError

    from .api.app import create_app
    from .lifecycle import DataDirHold, shutdown_message
    from .server import serve

    try:
        # Held for the process's lifetime: `dg2pf cluster stop` refuses while an API holds the data
        # directory, and a second API with an embedded head is refused here.
        hold = DataDirHold(settings.data_dir, exclusive=settings.ray_address is None)
    except DG2PFError as exc:
        print(f"dg2pf: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:  # the data directory cannot be made or locked
        print(
            f"dg2pf: error: DG2PF_DATA_DIR ({settings.data_dir}): {exc.strerror or exc}"
            + (f": {exc.filename}" if exc.filename else ""),
            file=sys.stderr,
        )
        return 2
    from .services import build

    try:  # the store and the cluster before the server: a setting they cannot use is one line, exit 2
        services = build(settings)
    except DG2PFError as exc:
        print(f"dg2pf: error: {exc.message}", file=sys.stderr)
        hold.release()
        return 2
    app = create_app(settings, services)
    print(f"dg2pf API on http://{settings.host}:{settings.port} (docs: /docs); data in {settings.data_dir}", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the handlers it
    # found: these make that a quiet, normal exit instead of a KeyboardInterrupt traceback or a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    serve(app, settings)
    services = getattr(app.state, "services", None)
    if services is not None:
        print(shutdown_message(services), file=sys.stderr, flush=True)
    hold.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
