"""The API under property-based fuzzing from its own OpenAPI: no 5xx, and every response as documented.

Schemathesis reads ``/openapi.json`` from a real service (uvicorn, an embedded Ray head, PostgreSQL,
tokens set, a small upload limit) and sends every operation, none excluded, a bounded and seeded set
of requests: its coverage phase (a fixed set: boundary and invalid values of every parameter and
field, missing required ones, methods the path does not take, no token) and its fuzzing phase
(``EXAMPLES`` generated requests per operation, valid and invalid, from ``SEED``). Each response must
be no server error and as documented: a documented status code and content type, a body valid against
the documented schema, the documented headers. A failure prints the request (as curl) and the
response. About 1,200 requests, 1-2 minutes on 2 cores with the service's start and stop.
"""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_process import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TOKEN = "fuzz-token"
SEED = 18
EXAMPLES = 50  # per operation, in the fuzzing phase
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    svc = ServiceProcess(
        root / "state",
        DG2PF_DATABASE_URL=pg_url,
        DG2PF_API_TOKENS=TOKEN,
        DG2PF_DATA_ROOTS=str(root / "data"),
        DG2PF_MAX_UPLOAD_BYTES=str(64 * 1024),
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api_schema(service):
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            # No example database: a run replays nothing of an earlier one, so the seed alone decides it.
            "generation": {"max-examples": EXAMPLES, "database": "none"},
        }
    )
    return schemathesis.openapi.from_url(
        f"{service.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, config=config
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # Schemathesis 4.32 reads and rewrites the private ``_nodeid`` of the test item, which pytest 9.2
    # no longer has (it keeps ``_id``): give it one, so it runs; pytest's own reporting is unchanged.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
def test_no_server_error_and_every_response_as_documented(case):
    case.call_and_validate(checks=CHECKS, timeout=30)
