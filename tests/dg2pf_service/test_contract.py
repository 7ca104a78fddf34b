"""The HTTP contract: every error in one documented shape, docs behind the token, none on Ray Serve."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from service_process import ServiceProcess

from dg2pf_service.api.app import create_app
from dg2pf_service.api.schemas import ErrorResponse, NotReady, artifact_media_type
from dg2pf_service.settings import Settings

TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB_ID = "0" * 32
# The error statuses each operation declares (413, 500 and 503 everywhere: any request may carry a body over
# DG2PF_MAX_REQUEST_BYTES, an unexpected failure can happen anywhere, and any request may find the store busy
# or the connection cap reached: 503 with Retry-After).
ERRORS = {
    ("get", "/healthz"): {413, 500, 503},
    ("get", "/readyz"): {413, 500, 503},
    ("post", "/checkpoints"): {400, 401, 403, 408, 413, 422, 500, 503, 507},
    ("post", "/jobs"): {400, 401, 403, 404, 408, 413, 422, 500, 503},
    ("get", "/jobs"): {401, 403, 422, 413, 500, 503},
    ("get", "/jobs/{job_id}"): {401, 403, 404, 422, 413, 500, 503},
    ("post", "/jobs/{job_id}/cancel"): {401, 403, 404, 409, 422, 413, 500, 503},
    ("get", "/jobs/{job_id}/events"): {401, 403, 404, 422, 413, 500, 503},
    ("get", "/jobs/{job_id}/artifacts"): {401, 403, 404, 422, 413, 500, 503},
    ("get", "/jobs/{job_id}/artifacts/{name}"): {401, 403, 404, 422, 413, 500, 503},
    ("post", "/jobs/{job_id}/deploy"): {401, 403, 404, 409, 422, 413, 500, 503},
    ("get", "/archs"): {401, 403, 413, 500, 503},
    ("get", "/models"): {401, 403, 413, 500, 503},
    ("get", "/models/{model_id}"): {401, 403, 404, 422, 413, 500, 503},
    ("delete", "/models/{model_id}"): {401, 403, 404, 422, 413, 500, 503},
}
PUBLIC = {"/healthz", "/readyz"}


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    root = tmp_path_factory.mktemp("contract")
    (root / "data").mkdir()
    svc = ServiceProcess(
        root / "state", DG2PF_DATABASE_URL=pg_url, DG2PF_API_TOKENS=TOKEN, DG2PF_DATA_ROOTS=str(root / "data")
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def openapi(service) -> dict:
    r = httpx.get(f"{service.url}/openapi.json", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error_shape(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "field", "message"}, body
    ErrorResponse.model_validate(body)
    assert body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


def _ref(schema: dict) -> str:
    return schema["$ref"].rsplit("/", 1)[-1]


@pytest.mark.slow
def test_openapi_declares_every_error_response_with_the_error_shape(openapi):
    declared = {(method, path): op for path, ops in openapi["paths"].items() for method, op in ops.items()}
    assert set(declared) == set(ERRORS)
    for key, op in declared.items():
        errors = {int(status) for status in op["responses"] if int(status) >= 400}
        assert errors == ERRORS[key], key
        for status in errors:
            content = op["responses"][str(status)]["content"]
            assert list(content) == ["application/json"], (key, status)
            name = _ref(content["application/json"]["schema"])
            assert name == ("NotReady" if key == ("get", "/readyz") and status == 503 else "ErrorResponse"), (
                key,
                status,
                name,
            )
    # FastAPI's default 422 schema is replaced everywhere, not only declared beside ours.
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    schemas = openapi["components"]["schemas"]
    assert (
        schemas["ErrorResponse"]["required"] == ["error"]
        and _ref(schemas["ErrorResponse"]["properties"]["error"]) == "ErrorDetail"
    )
    assert set(schemas["ErrorDetail"]["required"]) == {"type", "field", "message"}
    assert (
        "error" in schemas["NotReady"]["required"] and _ref(schemas["NotReady"]["properties"]["error"]) == "ErrorDetail"
    )


@pytest.mark.slow
def test_openapi_declares_the_token_and_the_artifact_content_types(openapi):
    assert openapi["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the service's DG2PF_API_TOKENS",
    }
    for path, ops in openapi["paths"].items():
        for op in ops.values():
            assert op.get("security") == (None if path in PUBLIC else [{"bearer": []}]), path
    artifact = openapi["paths"]["/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]["content"]
    assert set(artifact) == {
        "application/octet-stream",
        "application/json",
        "text/csv",
        "application/x-ndjson",
        "image/png",
    }
    for post in ("/jobs", "/jobs/{job_id}/deploy"):
        assert "Location" in openapi["paths"][post]["post"]["responses"]["202"]["headers"]


def test_artifacts_are_served_with_their_content_type():
    assert artifact_media_type("model.safetensors") == "application/octet-stream"
    assert artifact_media_type("model.compact.safetensors") == "application/octet-stream"
    assert artifact_media_type("model.onnx") == "application/octet-stream"
    assert artifact_media_type("metrics.json") == "application/json"
    assert artifact_media_type("history.json") == "application/json"
    assert artifact_media_type("trials.csv") == "text/csv"
    assert artifact_media_type("progress.jsonl") == "application/x-ndjson"
    assert artifact_media_type("training.png") == artifact_media_type("layers.png") == "image/png"


@pytest.mark.slow
def test_docs_and_every_endpoint_but_the_health_checks_need_the_token(service, openapi):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_error_shape(httpx.get(f"{service.url}{path}"), 401, "unauthorized")
        assert_error_shape(
            httpx.get(f"{service.url}{path}", headers={"Authorization": "Bearer wrong"}), 403, "forbidden"
        )
    docs = httpx.get(f"{service.url}/docs", headers=AUTH)
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert (
        '"spec"' in docs.text and '"openapi"' in docs.text
    )  # the schema inline: the page fetches nothing without the token
    redoc = httpx.get(f"{service.url}/redoc", headers=AUTH)
    assert redoc.status_code == 200 and redoc.headers["content-type"].startswith("text/html")
    for path in PUBLIC:
        assert httpx.get(f"{service.url}{path}").status_code == 200
    for path, ops in openapi["paths"].items():
        if path in PUBLIC:
            continue
        url = service.url + path.replace("{job_id}", JOB_ID).replace("{model_id}", JOB_ID).replace(
            "{name}", "metrics.json"
        )
        for method in ops:
            assert_error_shape(httpx.request(method, url), 401, "unauthorized")


@pytest.mark.slow
def test_unknown_routes_wrong_methods_and_malformed_bodies_answer_in_the_error_shape(service):
    err = assert_error_shape(httpx.get(f"{service.url}/no/such/route", headers=AUTH), 404, "not_found")
    assert "/no/such/route" in err["message"]
    for method in ("DELETE", "OPTIONS", "PATCH"):
        r = httpx.request(method, f"{service.url}/jobs", headers=AUTH)
        assert_error_shape(r, 405, "method_not_allowed")
        assert r.headers["allow"] == "GET, POST"  # every method of the path, not only the first route's
    assert_error_shape(httpx.options(f"{service.url}/healthz"), 405, "method_not_allowed")
    r = httpx.post(f"{service.url}/jobs", content=b'{"model": ', headers={**AUTH, "Content-Type": "application/json"})
    assert_error_shape(r, 400, "malformed_json")
    err = assert_error_shape(httpx.post(f"{service.url}/jobs", headers=AUTH), 422, "invalid_field")
    assert "body is missing" in err["message"]
    r = httpx.post(f"{service.url}/jobs", content=b"{}", headers={**AUTH, "Content-Type": "text/plain"})
    assert "Content-Type: application/json" in assert_error_shape(r, 422, "invalid_field")["message"]
    err = assert_error_shape(
        httpx.get(f"{service.url}/jobs", params={"limit": "many"}, headers=AUTH), 422, "invalid_field"
    )
    assert err["field"] == "limit"
    err = assert_error_shape(httpx.get(f"{service.url}/jobs/{JOB_ID}", headers=AUTH), 404, "not_found")
    assert JOB_ID in err["message"]


def _bare_app(**services) -> TestClient:
    # The app without its lifespan (no Ray, no database): for the handlers that need no real service.
    app = create_app()
    app.state.services = SimpleNamespace(**{"settings": Settings(api_tokens=[]), **services})
    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_failure_answers_500_in_the_error_shape():
    def ping():
        raise RuntimeError("database gone")

    client = _bare_app(store=SimpleNamespace(ping=ping))

    @client.app.get("/test-only/boom")
    def boom():
        raise RuntimeError("a bug")

    err = assert_error_shape(client.get("/test-only/boom"), 500, "internal")
    assert "RuntimeError" in err["message"] and "a bug" not in err["message"]  # the log has it, not the client


def test_not_ready_is_an_error_with_the_checks_beside_it():
    def fail():
        raise ConnectionError("refused")

    client = _bare_app(
        store=SimpleNamespace(ping=fail), executor=SimpleNamespace(client=SimpleNamespace(list_jobs=lambda: []))
    )
    r = client.get("/readyz")
    assert r.status_code == 503
    body = NotReady.model_validate(r.json())
    assert body.error.type == "not_ready" and "database" in body.error.message
    assert body.checks == {"database": "error: refused", "ray": "ok"}


def test_the_serve_app_has_no_docs_routes():
    from dg2pf_service.serving.app import api

    assert (api.docs_url, api.redoc_url, api.openapi_url) == (None, None, None)
    client = TestClient(api, raise_server_exceptions=False)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert_error_shape(client.get(path), 404, "not_found")
    r = client.get(f"/models/{JOB_ID}/predict")
    assert_error_shape(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_archs_lists_what_a_job_may_name_and_needs_the_token():
    import timm

    from dg2pf_service.api.schemas import ArchList

    body = ArchList.model_validate(_bare_app().get("/archs").json())
    import transformers

    assert {"digits_cnn", "torchvision/resnet50", "hf"} <= set(body.archs) and body.timm == timm.__version__
    assert body.transformers == transformers.__version__  # arch hf: a model directory as the checkpoint
    assert not any(a.startswith("timm/") for a in body.archs)  # timm's thousand-odd names: by body.timm
    app = create_app()
    app.state.services = SimpleNamespace(settings=Settings(api_tokens=["s3cret-token-for-tests"]))
    assert_error_shape(TestClient(app, raise_server_exceptions=False).get("/archs"), 401, "unauthorized")
