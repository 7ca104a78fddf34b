"""``Client(base_url, token=None)``: upload checkpoints, submit jobs, follow them, fetch results."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse
from pydantic import ValidationError

from dg2pf_contract.api import (
    TERMINAL,
    Artifact,
    ArtifactList,
    CheckpointOut,
    JobEvent,
    JobList,
    JobOut,
    JobSubmitted,
    ModelList,
    ModelOut,
)
from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.job import JobSpec, describe
from dg2pf_contract.results import Metrics

from .errors import InvalidRequest, NotTheService, ServiceUnreachable, WaitTimeout, from_response


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._model_urls: dict[str, str] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            where = path if path.startswith("http") else f"the dg2pf service at {self._http.base_url}"
            raise ServiceUnreachable(0, "unreachable", f"cannot reach {where}: {exc}") from exc
        if r.status_code >= 400:
            raise from_response(r.status_code, _json_or_none(r), r.text)
        return r

    def _parse(self, cls, r: httpx.Response):
        """``r``'s body as the API model ``cls``; an answer of another shape (a web page, another server
        at the URL) is ``NotTheService``, not a parsing traceback."""
        try:
            return cls.model_validate(r.json()) if cls is not None else r.json()
        except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
            kind = r.headers.get("content-type", "no content type").split(";")[0]
            what = cls.__name__ if cls is not None else "JSON"
            raise NotTheService(
                r.status_code,
                "not_the_service",
                f"{r.request.url} answered {r.status_code} {kind}, "
                f"not the dg2pf API's {what} ({str(exc).splitlines()[0]}): is the URL a dg2pf service?",
            ) from None

    def upload_checkpoint(self, path: str | Path) -> CheckpointOut:
        """Upload a weights file, or a Hugging Face model directory (for jobs with arch ``hf``): its
        config.json, model.safetensors and preprocessor_config.json, zipped on the way (nothing else of
        the directory is read). The same content gives the same id."""
        path = Path(path)
        if path.is_dir():
            return self._upload_model_dir(path)
        with path.open("rb") as fh:
            r = self._call("POST", "/checkpoints", files={"file": (path.name, fh, "application/octet-stream")})
        return self._parse(CheckpointOut, r)

    def _upload_model_dir(self, path: Path) -> CheckpointOut:
        missing = [n for n in (Artifacts.HF_CONFIG, Artifacts.MODEL) if not (path / n).is_file()]
        if missing:
            raise ValueError(
                f"{path} is a directory without {' and '.join(missing)}: give a weights file, or a Hugging Face "
                f"model directory ({', '.join(Artifacts.MODEL_DIR)})"
            )
        with tempfile.TemporaryFile() as tmp:
            # stored, not deflated: safetensors do not compress, and the service reads the files as they are
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
                for name in Artifacts.MODEL_DIR:
                    if (path / name).is_file():
                        archive.write(path / name, name)
            tmp.seek(0)
            r = self._call("POST", "/checkpoints", files={"file": (f"{path.name}.zip", tmp, "application/zip")})
        return self._parse(CheckpointOut, r)

    def submit(self, spec: JobSpec | dict[str, Any]) -> JobSubmitted:
        """Submit a job: a ``JobSpec``, or a dict as in a job file. A dict is checked as a JobSpec here
        first, then the service checks it against its world (checkpoint, data, cluster); an invalid
        field raises ``InvalidRequest`` naming it (``.field``), with the message the API would give."""
        if isinstance(spec, JobSpec):
            body = spec.model_dump(mode="json", exclude_unset=True)
        else:
            try:
                JobSpec.model_validate(spec)
            except ValidationError as exc:
                field, message = describe(exc)
                raise InvalidRequest(422, "invalid_field", message, field) from None
            body = spec
        return self._parse(JobSubmitted, self._call("POST", "/jobs", json=body))

    def get(self, job_id: str) -> JobOut:
        return self._parse(JobOut, self._call("GET", f"/jobs/{_id(job_id)}"))

    def list(self, state: str | None = None, limit: int = 50, offset: int = 0) -> JobList:
        params = {"limit": limit, "offset": offset, **({"state": state} if state else {})}
        return self._parse(JobList, self._call("GET", "/jobs", params=params))

    def cancel(self, job_id: str) -> JobOut:
        return self._parse(JobOut, self._call("POST", f"/jobs/{_id(job_id)}/cancel"))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[JobOut], None] | None = None,
        poll: float = 0.5,
        max_poll: float = 5.0,
        progress: bool = False,
    ) -> JobOut:
        """Poll until the job ends (backoff from ``poll`` to ``max_poll`` seconds); ``on_update`` sees each
        change (``on_update=print`` prints a one-line summary); ``progress=True`` draws a progress bar of
        epochs (phase, sparsity, validation top-1) with tqdm (``dg2pf-client[progress]``), else a line per
        change on stderr."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, delay = None, poll
        bar, echo = None, False
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the light client without its [progress] extra
                echo = True
            else:
                bar = tqdm(desc=f"job {job_id[:8]}", unit="epoch")
        try:
            while True:
                job = self.get(job_id)
                key = (job.state, job.phase, job.epoch)
                if key != last:
                    if on_update is not None:
                        on_update(job)
                    if echo:
                        print(job.summary(), file=sys.stderr, flush=True)
                    if bar is not None:
                        bar.update(job.epoch - bar.n)
                        val = (job.latest_metrics or {}).get("val_top1")
                        bar.set_postfix_str(
                            f"{job.state} {job.phase} sparsity {job.current_sparsity:.1%}"
                            + (f" val top-1 {val:.2f}%" if val is not None else "")
                        )
                    last, delay = key, poll
                else:
                    delay = min(delay * 1.5, max_poll)
                if job.state in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise WaitTimeout(f"job {job_id} still {job.state} ({job.phase}) after {timeout} s")
                time.sleep(delay)
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str, last_event_id: str | None = None, reconnect_for: float = 60.0) -> Iterator[JobEvent]:
        """The job's live events (``GET /jobs/{id}/events``) until it ends: a ``state`` event on connecting
        and on every change of state or phase, an ``epoch`` event per epoch record, each once and in order.

        A lost connection (the service restarting, a proxy cutting it) is resumed from the last event
        seen, with ``Last-Event-ID``, for up to ``reconnect_for`` seconds without an event; then
        ``ServiceUnreachable``. ``last_event_id`` resumes an earlier iteration (its last ``event.id``).
        An unknown job raises ``NotFound`` at the first ``next()``.
        """
        job_id, last, lost_since = _id(job_id), last_event_id, None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(self._http, "GET", f"/jobs/{job_id}/events", headers=headers) as source:
                    r = source.response
                    if r.status_code >= 400:
                        r.read()
                        raise from_response(r.status_code, _json_or_none(r), r.text)
                    try:
                        for sse in source.iter_sse():
                            if not sse.data:
                                continue  # a keep-alive comment (the decoder repeats the last id for it)
                            event = self._event(r, sse)
                            lost_since, last = None, sse.id or last
                            yield event
                            if event.job is not None and event.job.state in TERMINAL:
                                return
                    except SSEError:  # not an event stream at all
                        r.read()
                        self._parse(JobEvent, r)
                        raise
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            else:
                if last and last.count(":") == 2 and last.split(":")[1] in TERMINAL:
                    return  # resumed after the final state: nothing more to come
                reason = "the stream ended before the job did"  # e.g. the service restarted
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > reconnect_for:
                raise ServiceUnreachable(
                    0,
                    "unreachable",
                    f"lost the events of job {job_id} from the dg2pf service at "
                    f"{self._http.base_url} for over {reconnect_for:g} s: {reason}",
                )
            time.sleep(1.0)

    def _event(self, r: httpx.Response, sse) -> JobEvent:
        try:
            data = json.loads(sse.data)
            if sse.event == "state":
                return JobEvent(id=sse.id, kind="state", job=JobOut.model_validate(data))
            if sse.event == "epoch" and isinstance(data, dict):
                return JobEvent(id=sse.id, kind="epoch", record=data)
            raise ValueError(f"an event {sse.event!r}")
        except ValueError as exc:
            raise NotTheService(
                r.status_code,
                "not_the_service",
                f"{r.request.url} sent {str(exc).splitlines()[0]}, not a dg2pf job event: is the URL a dg2pf service?",
            ) from None

    def artifacts(self, job_id: str) -> list[Artifact]:
        return self._parse(ArtifactList, self._call("GET", f"/jobs/{_id(job_id)}/artifacts")).artifacts

    def artifact(self, job_id: str, name: str) -> bytes:
        """One artifact of the job (``metrics.json``, ``training.png``, ...), held in memory."""
        return self._call("GET", f"/jobs/{_id(job_id)}/artifacts/{name}").content

    def metrics(self, job_id: str) -> Metrics:
        """The result of a succeeded job: its ``metrics.json``, typed. Raises ``MetricsError`` (a
        ``ValueError`` naming the job) when what came back is not a run's metrics."""
        text = self.artifact(job_id, Artifacts.METRICS).decode("utf-8", errors="replace")
        return Metrics.parse(text, f"job {job_id}'s {Artifacts.METRICS}")

    def download(self, job_id: str, dest: str | Path) -> list[Path]:
        """Fetch every artifact of the job into ``dest``; each file appears whole or not at all."""
        items = self.artifacts(job_id)  # first: a refused id or an unreachable service creates no folder
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for item in items:
            target = dest / Path(item.name).name
            part = target.with_name(f".{target.name}.part")
            try:
                with self._http.stream("GET", item.url) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise from_response(r.status_code, _json_or_none(r), r.text)
                    with part.open("wb") as fh:
                        for chunk in r.iter_bytes():
                            fh.write(chunk)
                part.replace(target)
            except httpx.TransportError as exc:
                raise ServiceUnreachable(
                    0,
                    "unreachable",
                    f"lost the dg2pf service at {self._http.base_url} while downloading {item.name}: {exc}",
                ) from exc
            finally:
                part.unlink(missing_ok=True)
            written.append(target)
        return written

    # --- serving ------------------------------------------------------------------------------

    def deploy(self, job_id: str, wait: bool = True, timeout: float = 300.0) -> ModelOut:
        """Deploy a succeeded job's model on Ray Serve; with ``wait``, return once it answers."""
        model = self._parse(ModelOut, self._call("POST", f"/jobs/{_id(job_id)}/deploy"))
        return self.wait_model(model.id, timeout) if wait else model

    def models(self) -> ModelList:
        return self._parse(ModelList, self._call("GET", "/models"))

    def model(self, model_id: str) -> ModelOut:
        model = self._parse(ModelOut, self._call("GET", f"/models/{_id(model_id)}"))
        self._model_urls[model_id] = model.url
        return model

    def undeploy(self, model_id: str) -> None:
        self._call("DELETE", f"/models/{_id(model_id)}")
        self._model_urls.pop(model_id, None)

    def wait_model(self, model_id: str, timeout: float = 300.0, poll: float = 0.5) -> ModelOut:
        """Poll until the model's status is ``ready`` (raises WaitTimeout, or ApiError if it failed)."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.model(model_id)
            if model.status == "ready":
                return model
            if time.monotonic() > deadline:
                raise WaitTimeout(f"model {model_id} still {model.status} after {timeout} s: {model.message or ''}")
            time.sleep(poll)

    def predict(
        self,
        model_id: str,
        inputs: Any = None,
        images: list[str | Path | bytes] | None = None,
        top_k: int = 5,
        logits: bool = False,
    ) -> dict:
        """Predictions of a deployed model for tensors (nested lists, ``[N, C, H, W]``) or image files.

        Returns ``{"model", "predictions": [[{"index", "label", "probability"}, ...], ...]}`` with one
        list per input, most probable first (plus ``"logits"`` when asked).
        """
        if (inputs is None) == (images is None):
            raise ValueError("pass exactly one of inputs= (tensors as nested lists) or images= (files or bytes)")
        url = self._model_urls.get(model_id) or self.model(model_id).url
        params = {"top_k": top_k, "logits": str(logits).lower()}
        headers = {"serve_multiplexed_model_id": model_id}  # routes to a replica that has the model loaded
        if inputs is not None:
            if hasattr(inputs, "tolist"):
                inputs = inputs.tolist()
            return self._parse(None, self._call("POST", url, params=params, headers=headers, json={"inputs": inputs}))
        files = []
        for i, image in enumerate(images or []):
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            name = f"image{i}" if isinstance(image, bytes) else Path(image).name
            files.append(("image", (name, data, "application/octet-stream")))
        return self._parse(None, self._call("POST", url, params=params, headers=headers, files=files))

    def health(self) -> dict:
        return self._parse(None, self._call("GET", "/readyz"))


_ID = re.compile(r"[0-9a-f]{32}")


def _id(value: str) -> str:
    """A job or model id as the API names them (32 hex digits), before it goes into a URL path."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequest(
            0,
            "invalid_id",
            f"{value!r} is not a job or model id (32 hex digits, as `dg2pf jobs` and `dg2pf models` list them)",
            "id",
        )
    return value


def _json_or_none(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None
