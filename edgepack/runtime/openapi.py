"""The server's OpenAPI 3.0.3 document, built from what the registry serves (``GET /openapi.json``).

Standard library only, like the rest of the runtime. The document is specific to one server:
the ``model_name`` and ``model_version`` path parameters and the input and output names of an
inference request are enums of what this server's models take, so a client (or a fuzzer) reading
it knows the valid names up front. It describes every status the server really answers with, the
refusals included (a request to a path with the wrong method is a 405 with an Allow header, as
HTTP says, on every path): ``tests/test_openapi.py`` fuzzes the server against it.
"""

from __future__ import annotations

import math
from typing import Any

from .v2 import DATATYPES, EXTENSIONS, MAX_REQUEST_ID, PLATFORM

OPENAPI_VERSION = "3.0.3"
# Every datatype of the protocol (what a request may name); a model takes one per input.
V2_DATATYPES = tuple(DATATYPES.values())
# The media type of metrics.CONTENT_TYPE, without its parameters (version=0.0.4, charset).
METRICS_MEDIA_TYPE = "text/plain"

_JSON = "application/json"
_BINARY = "application/octet-stream"
_ERROR = {"$ref": "#/components/schemas/Error"}
_REQUEST_ID = {"name": "X-Request-Id", "in": "header", "required": False,
               "description": "The request's id in the prediction log when the body gives none (and echoed).",
               "schema": {"type": "string"}}
_REQUEST_ID_ECHO = {"X-Request-Id": {"description": "With a prediction log: the id the request was logged under.",
                                     "schema": {"type": "string"}}}
_REFUSALS = {
    400: "The request is malformed: not JSON, or inputs that do not fit the model (the error names which).",
    401: "An admin token is configured and the request's bearer token is missing or wrong.",
    403: "No admin token is configured and the client is not on the loopback interface.",
    404: "No model (or version) by that name on this server.",
    409: "The move is impossible: the server is not in phased mode, or the rollout cannot move that way now.",
    413: "The body is larger than the server's limit (--max-body-mb).",
    415: "The body is compressed (Content-Encoding other than identity); send it uncompressed.",
    503: "The model is still loading.",
}


def document(registry: Any, server_version: str) -> dict[str, Any]:
    """The OpenAPI document of a server serving ``registry`` (anything iterating routes with
    ``name``, ``versions`` and ``signature``)."""
    routes = list(registry)
    names = [route.name for route in routes]
    versions = sorted({version for route in routes for version in route.versions})
    inputs = sorted({name for route in routes for name in route.signature.inputs})
    outputs = sorted({name for route in routes for name in route.signature.outputs})
    model_name = _path_parameter("model_name", "A model this server serves.", names)
    model_version = _path_parameter("model_version", "A version of that model.", versions)
    infer_example, predict_example = _examples(routes[0].signature) if routes else ({}, [])
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": _get("Liveness: the server answers.", "live", "Live", tag="health")},
        "/v2/health/ready": {"get": _get("Readiness: every model is loaded and warmed up.", "ready", "Ready",
                                         {503: "Not ready yet: a model is still loading."}, tag="health",
                                         unready="Ready")},
        "/v2": {"get": _get("Server metadata.", "serverMetadata", "ServerMetadata", tag="metadata")},
        "/v2/models": {"get": _get("The models this server serves.", "listModels", "ModelList", tag="metadata")},
        "/v2/models/{model_name}": _model_get("modelMetadata", [model_name]),
        "/v2/models/{model_name}/versions/{model_version}": _model_get("modelVersionMetadata",
                                                                       [model_name, model_version]),
        "/v2/models/{model_name}/ready": _model_ready("modelReady", [model_name]),
        "/v2/models/{model_name}/versions/{model_version}/ready": _model_ready("modelVersionReady",
                                                                               [model_name, model_version]),
        "/v2/models/{model_name}/infer": _infer("infer", [model_name], infer_example),
        "/v2/models/{model_name}/versions/{model_version}/infer": _infer("inferVersion", [model_name, model_version],
                                                                         infer_example),
        "/predict": {"post": _predict(predict_example)},
        "/metrics": {"get": _metrics()},
        "/openapi.json": {"get": _get("This document.", "openapi", "OpenAPIDocument", tag="metadata")},
        **_admin_paths(),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "edgepack model server", "version": server_version,
                 "description": "The Open Inference Protocol (KServe v2) over HTTP, plain JSON at /predict, "
                                f"Prometheus metrics at /metrics. Serving: {', '.join(names) or 'nothing'}."},
        "tags": [{"name": "health"}, {"name": "metadata"}, {"name": "inference"}, {"name": "metrics"},
                 {"name": "admin"}],
        "paths": paths,
        "components": {"schemas": _schemas(inputs, outputs),
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                                          "description": "The server's admin token, when one "
                                                                         "is configured."}}},
    }


def _path_parameter(name: str, description: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "enum": values}}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _refusals(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _REFUSALS[code], "content": {_JSON: {"schema": _ERROR}}} for code in codes}


def _get(summary: str, operation_id: str, schema: str, others: dict[int, str] | None = None, *, tag: str,
         unready: str | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", **_json(schema)}}
    for code, description in (others or {}).items():
        # A 503 of a readiness probe is its answer ({"ready": false}), not an error.
        responses[str(code)] = {"description": description, **_json(unready or "Error")}
    return {"summary": summary, "operationId": operation_id, "tags": [tag], "responses": responses}


def _model_get(operation_id: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    operation = _get("A model's metadata: its inputs and outputs.", operation_id, "ModelMetadata", tag="metadata")
    operation["responses"].update(_refusals(404))
    return {"parameters": parameters, "get": operation}


def _model_ready(operation_id: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    operation = _get("Readiness of one model.", operation_id, "ModelReady",
                     {503: "Not ready yet: the model is still loading."}, tag="health", unready="ModelReady")
    operation["responses"].update(_refusals(404))
    return {"parameters": parameters, "get": operation}


def _examples(signature: Any) -> tuple[dict[str, Any], Any]:
    """A request the first model answers (one row of zeros, or of empty strings), for each API."""
    inputs, rows = [], {}
    for sig in signature.inputs.values():
        shape = [1] + [d if d >= 0 else 1 for d in sig.shape[1:]] if sig.shape else []
        count = math.prod(shape)
        zero = "" if sig.datatype == "BYTES" else False if sig.datatype == "BOOL" else 0
        inputs.append({"name": sig.name, "shape": shape, "datatype": sig.datatype, "data": [zero] * count})
        rows[sig.name] = _nested([zero] * count, shape)
    predict = {"rows": next(iter(rows.values()))} if len(rows) == 1 else {"inputs": rows}
    return {"id": "example-1", "inputs": inputs}, predict


def _nested(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [_nested(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _infer(operation_id: str, parameters: list[dict[str, Any]], example: dict[str, Any]) -> dict[str, Any]:
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "description": "Binary tensor data extension: the size of the JSON part of the body; raw "
                             "little-endian tensors follow it.",
              "schema": {"type": "integer", "minimum": 0}}
    return {"parameters": parameters, "post": {
        "summary": "Run the model (Open Inference Protocol).",
        "operationId": operation_id,
        "tags": ["inference"],
        "parameters": [header, _REQUEST_ID],
        "requestBody": {"required": True,
                        "description": "A JSON inference request; with Inference-Header-Content-Length, "
                                       "binary tensors follow it (as application/octet-stream).",
                        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/InferRequest"},
                                            "example": example},
                                    _BINARY: {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "The outputs; with binary outputs asked for, a JSON header then raw tensors.",
                    "headers": {"Inference-Header-Content-Length": {
                        "description": "With binary outputs: the size of the JSON part of the body.",
                        "schema": {"type": "integer", "minimum": 0}}, **_REQUEST_ID_ECHO},
                    "content": {_JSON: {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                                _BINARY: {"schema": {"type": "string", "format": "binary"}}}},
            **_refusals(400, 404, 413, 415, 503)}}}


def _predict(example: Any) -> dict[str, Any]:
    body = _json("PredictRequest")
    body["content"][_JSON]["example"] = example
    return {"summary": "Run the model on plain JSON rows (the server's only model, or its first).",
            "operationId": "predict", "tags": ["inference"], "parameters": [_REQUEST_ID],
            "requestBody": {"required": True, **body},
            "responses": {"200": {"description": "The outputs by name.", "headers": _REQUEST_ID_ECHO,
                                  **_json("PredictResponse")},
                          **_refusals(400, 413, 415, 503)}}


def _metrics() -> dict[str, Any]:
    return {"summary": "Prometheus metrics (text exposition format 0.0.4).", "operationId": "metrics",
            "tags": ["metrics"],
            "responses": {"200": {"description": "OK", "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}}}}}


def _admin_paths() -> dict[str, Any]:
    security = [{}, {"adminToken": []}]  # the token is needed only when the server has one
    status = {"description": "The rollout's status.", **_json("RolloutStatus")}
    body = {"required": False, "content": {_JSON: {"schema": {
        "type": "object", "properties": {"reason": {"type": "string", "description": "Logged with the move."}}}}}}

    def move(verb: str, what: str) -> dict[str, Any]:
        return {"post": {"summary": what, "operationId": f"rollout{verb.capitalize()}", "tags": ["admin"],
                         "security": security, "requestBody": body,
                         "responses": {"200": status, **_refusals(400, 401, 403, 409, 413, 415)}}}

    return {
        "/admin/rollout": {"get": {"summary": "The rollout's mode, step, weight, state and gates.",
                                   "operationId": "rolloutStatus", "tags": ["admin"], "security": security,
                                   "responses": {"200": status, **_refusals(401, 403)}}},
        "/admin/rollout/promote": move("promote", "Move the phased rollout to its next step now."),
        "/admin/rollout/rollback": move("rollback", "Roll the phased rollout back to the primary now."),
    }


def _schemas(inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    tensor_data = {"type": "array", "items": {},
                   "description": "The tensor's values, flat in row-major order or nested as its shape."}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    return {
        "Error": _object({"error": {"type": "string", "description": "What is wrong, and what to do."}}, closed=True),
        "Live": _object({"live": {"type": "boolean"}}, closed=True),
        "Ready": _object({"ready": {"type": "boolean"}}, closed=True),
        "ModelReady": _object({"name": {"type": "string"}, "ready": {"type": "boolean"}}, closed=True),
        "ServerMetadata": _object({"name": {"type": "string"}, "version": {"type": "string"},
                                   "extensions": {"type": "array",
                                                  "items": {"type": "string", "enum": list(EXTENSIONS)}}}),
        "ModelList": _object({"models": {"type": "array", "items": _object({
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string", "enum": [PLATFORM]}, "ready": {"type": "boolean"}})}}),
        "TensorMetadata": _object({"name": {"type": "string"}, "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
                                   "shape": {"type": "array", "items": {"type": "integer", "minimum": -1},
                                             "description": "-1 where the dimension is symbolic (any size)."}}),
        "ModelMetadata": _object({
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string", "enum": [PLATFORM]},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}}}),
        "InferRequest": _object({
            "id": {"type": "string", "maxLength": MAX_REQUEST_ID, "description": "Echoed in the response (and as X-Request-Id)."},
            "parameters": {"type": "object", "properties": {"binary_data_output": {
                "type": "boolean", "description": "Send every output as binary data."}}},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/RequestOutput"},
                        "description": "The outputs to send, in this order; leave out for all of them."},
        }, required=["inputs"]),
        "RequestInput": _object({
            "name": {"type": "string", "enum": inputs},
            "shape": shape,
            "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
            "data": tensor_data,
            "parameters": {"type": "object", "properties": {"binary_data_size": {
                "type": "integer", "minimum": 0,
                "description": "Binary tensor data extension: this input's bytes after the JSON part."}}},
        }, required=["name", "shape", "datatype"]),
        "RequestOutput": _object({
            "name": {"type": "string", "enum": outputs},
            "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean", "description": "Send this output as binary data."}}},
        }, required=["name"]),
        "InferResponse": _object({
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": _object({
                "name": {"type": "string"}, "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
                "shape": shape, "data": tensor_data,
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
            }, required=["name", "datatype", "shape"])},
        }, required=["model_name", "model_version", "outputs"]),
        "PredictRequest": {
            "description": 'Rows for a model with one input: {"rows": [[...], ...]} or a bare list of rows; '
                           'for several inputs, {"inputs": {name: rows}}.',
            "anyOf": [{"$ref": "#/components/schemas/Rows"},
                      _object({"rows": {"$ref": "#/components/schemas/Rows"}}, required=["rows"]),
                      _object({"inputs": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Rows"}}},
                              required=["inputs"])]},
        "Rows": {"type": "array", "items": {}, "description": "One row per item, each shaped as the input's "
                                                           "dimensions after the first."},
        "PredictResponse": _object({"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                    "outputs": {"type": "object", "additionalProperties": tensor_data}}),
        "RolloutStatus": _object({
            "mode": {"type": "string", "enum": ["single", "shadow", "phased"]},
            "model": {"type": "string"},
            "state": {"type": "string", "nullable": True, "enum": ["running", "rolled_back", "complete", None],
                      "description": "Phased mode: where the rollout stands; null in other modes."},
            "step": {"type": "integer", "nullable": True, "minimum": 1,
                     "description": "Phased mode: the current step, from 1."},
            "weight": {"type": "number", "nullable": True, "minimum": 0, "maximum": 100,
                       "description": "Phased mode: percent of requests the candidate answers now."},
            "gates": {"type": "object", "nullable": True,
                      "description": "Phased mode: max_error_rate, max_p99_ms, min_agreement (null: off)."},
            "figures": {"type": "object", "description": "Phased mode: the current step's counts and shares."},
            "history": {"type": "array", "items": {"type": "object"}, "description": "Phased mode: recent decisions."},
        }, required=["mode", "model", "state", "step", "weight", "gates"]),
        "OpenAPIDocument": {"type": "object", "required": ["openapi", "info", "paths"]},
    }


def _object(properties: dict[str, Any], *, required: list[str] | None = None, closed: bool = False) -> dict[str, Any]:
    """An object schema; every property required unless ``required`` names fewer; ``closed``: no others."""
    schema: dict[str, Any] = {"type": "object", "required": list(properties) if required is None else required,
                              "properties": properties}
    if closed:
        schema["additionalProperties"] = False
    return schema
