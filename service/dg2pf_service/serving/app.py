"""The Ray Serve application: ``POST /models/{id}/predict`` for every deployed pruned model.

One deployment hosts all models. ``serve.multiplexed`` keeps at most ``max_models_per_replica``
of them loaded per replica (least recently used goes first) and Serve routes a request to a
replica that already holds its model when the ``serve_multiplexed_model_id`` header names it;
``serve.batch`` gathers concurrent requests into one forward pass per model, computed by PyTorch or
ONNX Runtime (``DG2PF_SERVE_BACKEND``, see ``backends``). Everything a client
sends is checked here, at the boundary: a bad request gets a 4xx with the one error shape of the
service and the replica goes on serving. This module runs inside Serve replicas; the API process
only imports it to build the application.
"""

import asyncio
import hmac
import json
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from dg2pf_core.errors import DG2PFError, InputError
from dg2pf_core.io.inference import InferenceModel, finite_logits, predictions_json

from ..errorshape import error_body
from .backends import BACKENDS, ONNXRUNTIME, load_served_model
from .options import APP_NAME, DEPLOYMENT_NAME, ServeOptions, token_digest
from .registry import ModelRegistry

IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
INLINE_FORWARD_S = 0.002  # per input: forward passes faster than this skip the thread hand-off


class RequestError(Exception):
    def __init__(
        self, status: int, type_: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own errors (an unknown route, a method /predict does not take) in the one error shape.
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return JSONResponse(
            error_body("not_found", f"no route for {where}; predict with POST /models/{{id}}/predict"), status_code=404
        )
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return JSONResponse(
            error_body("method_not_allowed", f"{where} is not allowed; {request.url.path} takes {allowed}"),
            status_code=405,
            headers=exc.headers,
        )
    return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


# No /docs, /redoc or /openapi.json: whoever reaches Serve's proxy would read them without a token;
# docs/service.md documents the predict route.
api = FastAPI(
    title="dg2pf models",
    description="Pruned models served by Ray Serve",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    exception_handlers={StarletteHTTPException: _http_error},
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(error_body(exc.type, exc.message, exc.field), status_code=exc.status, headers=exc.headers)


@api.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(error_body("invalid_input", exc.message, exc.field), status_code=400)


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")) or None
    return JSONResponse(
        error_body("invalid_field", f"{field}: {first.get('msg')}" if field else str(first.get("msg")), field),
        status_code=422,
    )


async def _chunks(body: bytes):
    yield body


# Decorated here, at import, not in build_app: the replica imports this module afresh, and the
# routes of ``api`` must be rewritten into class-based views there as well.
@serve.ingress(api)
class ModelServer:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions.from_dict(options)
        self.registry = ModelRegistry(self.options.serving_dir)
        self.device = "cuda" if self.options.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        # One thread per CPU the replica reserves, for PyTorch and for each ONNX Runtime session alike
        # (sessions do not spin-wait, so the idle ones of other loaded models cost nothing).
        self.threads = max(1, int(self.options.cpus_per_replica))
        torch.set_num_threads(self.threads)
        self.backend = self.options.backend
        if self.backend not in BACKENDS:
            raise ValueError(
                f"DG2PF_SERVE_BACKEND={self.backend!r} is not a serving backend; one of {', '.join(BACKENDS)}"
            )
        if self.backend == ONNXRUNTIME:
            try:  # a replica that could serve no model fails its start, with the reason in GET /models
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                raise RuntimeError(
                    f"DG2PF_SERVE_BACKEND=onnxruntime, but the replica cannot import onnxruntime ({exc}): "
                    "install onnxruntime on the Ray nodes, or set DG2PF_SERVE_BACKEND=torch"
                ) from exc

        async def load(model_id: str) -> InferenceModel:
            entry = self.registry.get(model_id)
            if entry is None:
                raise RequestError(404, "not_found", f"model {model_id} is not deployed", "model")
            return await asyncio.to_thread(
                load_served_model, model_id, entry.output_dir, self.backend, self.device, self.threads
            )

        # Wired per instance so the LRU bound comes from the options (Serve detects this form).
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.options.max_models_per_replica)(load)
        self._last_forward_s: dict[str, float] = {}  # per model: seconds per input of the last pass
        self._forward.set_max_batch_size(self.options.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.options.batch_wait_ms / 1000.0)

    # --- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "backend": self.backend}

    @api.post("/models/{model_id}/predict")
    async def predict(
        self,
        model_id: str,
        request: Request,
        top_k: int = Query(5, ge=1, le=1000, description="classes per input, most probable first"),
        logits: bool = Query(False, description="also return the raw logits"),
    ) -> JSONResponse:
        self._authorize(request)
        if not self.registry.has(model_id):
            raise RequestError(
                404, "not_found", f"no deployed model with id {model_id!r}; GET /models on the API lists them", "model"
            )
        body = await self._read_body(request)
        try:
            model = await self.get_model(model_id)
        except DG2PFError as exc:
            raise RequestError(
                500, "model_unavailable", f"model {model_id} could not be loaded: {exc.message}", "model"
            ) from None
        batch = await self._inputs(model, request, body)
        out = await self._forward((model_id, batch))
        doc: dict[str, Any] = {
            "model": model_id,
            "backend": model.backend,
            "precision": model.precision,
            "predictions": predictions_json(model.top_k(out, top_k)),
        }
        if logits:
            doc["logits"] = finite_logits(out)
        return JSONResponse(doc)

    # --- request parsing ----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        digests = self.options.token_digests
        if not digests:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest, ok = token_digest(given), False
        for known in digests:  # no early exit: timing tells nothing about which one matched
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise RequestError(403, "forbidden", "invalid bearer token")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_request_bytes
        too_large = RequestError(
            413, "too_large", f"request body over {limit} bytes; send fewer or smaller inputs", "body"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
        if size == 0:
            raise RequestError(
                400, "invalid_input", 'empty body: send JSON {"inputs": [...]} or a PNG/JPEG image', "body"
            )
        return b"".join(parts)

    async def _inputs(self, model: InferenceModel, request: Request, body: bytes) -> torch.Tensor:
        kind = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                doc = json.loads(body)
            except ValueError as exc:
                raise RequestError(400, "malformed_json", f"request body is not valid JSON: {exc}", "body") from None
            except RecursionError:  # 100,000 nested arrays: deeper than any input a model takes
                raise RequestError(
                    400, "malformed_json", "request body nests too deeply to be an input", "body"
                ) from None
            if not isinstance(doc, dict) or "inputs" not in doc:
                raise InputError('the JSON body must be an object {"inputs": [...]}')
            batch = model.tensor_inputs(doc["inputs"])  # bounded by max_request_bytes: cheap enough inline
        elif kind == "multipart/form-data":
            images = await self._form_images(request, body)
            batch = await asyncio.to_thread(lambda: torch.stack([model.image_input(b) for b in images]))
        elif kind in IMAGE_TYPES:
            batch = (await asyncio.to_thread(model.image_input, body)).unsqueeze(0)
        else:
            raise RequestError(
                415,
                "unsupported_media_type",
                f"content type {kind!r} is not accepted; send application/json, multipart/form-data, "
                "image/png or image/jpeg",
                "content-type",
            )
        if len(batch) > self.options.max_inputs:
            raise RequestError(
                413,
                "too_many_inputs",
                f"{len(batch)} inputs in one request; at most {self.options.max_inputs}",
                "inputs",
            )
        return batch

    async def _form_images(self, request: Request, body: bytes) -> list[bytes]:
        try:
            form = await MultiPartParser(request.headers, _chunks(body), max_files=self.options.max_inputs + 1).parse()
        except MultiPartException as exc:
            raise RequestError(400, "invalid_input", f"malformed multipart body: {exc.message}", "body") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise InputError(
                "the multipart body holds no file; send each image as a file field (e.g. -F image=@digit.png)",
                field="image",
            )
        return [await f.read() for f in files]

    # --- batched forward ----------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _forward(self, items: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One forward pass per model over all requests that arrived together."""
        groups: dict[str, list[int]] = {}
        for i, (model_id, _) in enumerate(items):
            groups.setdefault(model_id, []).append(i)
        results: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for model_id, idx in groups.items():
            model = await self.get_model(model_id)
            sizes = [len(items[i][1]) for i in idx]
            batch = torch.cat([items[i][1] for i in idx])
            # A short forward pass runs inline (a thread hand-off would cost more than the pass); a
            # long one in a thread, so that the replica keeps receiving requests meanwhile.
            started = time.perf_counter()
            if self._last_forward_s.get(model_id, 1.0) < INLINE_FORWARD_S:
                out = model.logits(batch)
            else:
                out = await asyncio.to_thread(model.logits, batch)
            self._last_forward_s[model_id] = (time.perf_counter() - started) / max(1, len(batch))
            for i, part in zip(idx, out.split(sizes)):
                results[i] = part
        return results


def deployment_for(options: ServeOptions):
    """The ingress deployment configured by ``options`` (replicas or autoscaling, CPUs/GPUs, limits)."""
    scaling: dict[str, Any] = (
        {
            "autoscaling_config": {
                "min_replicas": options.replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": max(2, options.max_batch_size // 2),
            }
        }
        if options.autoscaling
        else {"num_replicas": options.replicas}
    )
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=5,
        **scaling,
    )(ModelServer)
    return deployment


def build_app(options: ServeOptions):
    """The Serve application for ``serve.run``."""
    return deployment_for(options).bind(options.to_dict())


def app_builder(args: dict[str, Any]):
    """Serve's application builder: the ``import_path`` of the declarative config the API sends to
    Serve's REST API (``dg2pf_service.serving.supervisor``); ``args`` is ``ServeOptions.to_dict()``."""
    return build_app(ServeOptions.from_dict(args))


__all__ = ["APP_NAME", "ModelServer", "app_builder", "build_app", "deployment_for"]
