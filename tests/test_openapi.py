"""The served OpenAPI document: valid OpenAPI, true to this server's models, and true to the server
itself, which schemathesis fuzzes against it (bounded and derandomized, so a run is reproducible)."""

from __future__ import annotations

import json
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import Served, get, request
from test_shadow import _candidate


# Per operation, for the fuzzing phase; the examples and coverage phases add their own (schema-sized) cases.
FUZZ_EXAMPLES = 50
FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """In phased mode with a prediction log, so that requests go through the rollout's routing, the
    admin endpoints (promote and rollback, fuzzed too), the request-id and logging paths."""
    log_dir, state_dir = tmp_path_factory.mktemp("log"), tmp_path_factory.mktemp("state")
    candidate = _candidate(bundle_dir, tmp_path_factory.mktemp("candidate") / "b", "candidate", lambda path: None)
    served = Served([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0",
                     "--log-dir", str(log_dir), "--phased", str(candidate), "--state-dir", str(state_dir),
                     "--steps", "50,100", "--min-samples", "5", "--step-duration", "0"], bundle_dir)
    yield served
    assert served.stop() == 0, "".join(served.log)


@pytest.fixture(scope="module")
def served_document(server) -> dict:
    status, document = get(server.url + "/openapi.json")
    assert status == 200
    return document


def test_the_served_document_is_valid_openapi(served_document):
    validate(served_document)
    assert served_document["openapi"] == "3.0.3"


def test_the_document_names_the_served_model_and_its_tensors(served_document, bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    infer = served_document["paths"]["/v2/models/{model_name}/infer"]
    assert infer["parameters"][0]["schema"]["enum"] == ["classifier"]
    versioned = served_document["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]
    assert versioned["parameters"][1]["schema"]["enum"] == sorted([manifest["version"], "candidate"])  # phased: both
    schemas = served_document["components"]["schemas"]
    assert schemas["RequestInput"]["properties"]["name"]["enum"] == ["X"]
    assert schemas["RequestOutput"]["properties"]["name"]["enum"] == ["label", "probabilities"]
    assert schemas["InferRequest"]["properties"]["id"]["maxLength"] == 128  # longer ids are a 400


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_documented_answers_and_no_5xx(case):
    case.call_and_validate(checks=FUZZ_CHECKS, timeout=30)


@pytest.mark.parametrize("request_id,header", [
    ("a\r\nX-Injected: 1", "a%0D%0AX-Injected: 1"),  # uvicorn refused the header: the connection dropped
    ("tab\there\x00", "tab\there%00"),
    ("caf\u00e9", "caf\u00e9"),
])
def test_request_ids_that_cannot_be_a_header_are_escaped_in_it(server, request_id, header):
    body = json.dumps({"id": request_id, "inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32",
                                                      "data": [0] * 6}]}).encode()
    status, headers, answer = request("POST", server.url + "/v2/models/classifier/infer", body,
                                      {"Content-Type": "application/json"})
    assert status == 200, answer
    assert headers["x-request-id"] == header and json.loads(answer)["id"] == request_id
    assert "X-Injected" not in headers
