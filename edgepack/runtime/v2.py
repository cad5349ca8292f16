"""The Open Inference Protocol (KServe v2) over HTTP: tensor signatures, request decoding, responses.

No HTTP here (see ``app``): bytes in, arrays out, and back. Every refusal is a ``RequestError``
naming the input and what is wrong with it, so a bad request is a 4xx and never reaches
onnxruntime. The binary tensor data extension (JSON header, then raw little-endian tensors, as
Triton's clients send by default) is supported beside plain JSON.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import RequestError

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data",)
# Manifest dtypes (numpy names, "string") and the v2 datatypes they travel as.
DATATYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "bool": "BOOL", "string": "BYTES",
}
# numpy kinds a JSON array may hold for each kind of tensor: whole numbers are fine for a float
# input, fractions are not fine for an integer one, and nothing else converts.
# A request id (the body's "id", a client's X-Request-Id) is echoed in a header and the log: longer is refused (400).
MAX_REQUEST_ID = 128
_ACCEPTS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "U": "U"}
_TAKES = {"f": "numbers", "i": "whole numbers", "u": "whole numbers", "b": "true/false", "U": "strings"}
_HOLDS = {"f": "fractional numbers", "i": "whole numbers", "u": "whole numbers", "b": "true/false values",
          "U": "strings", "S": "strings", "O": "nulls, objects or mixed values"}
# dtype -> v2 datatype by dtype object: numpy's dtype.name is a slow Python property, read per output.
_DATATYPE_OF = {np.dtype(name): datatype for name, datatype in DATATYPES.items() if name != "string"}
# Arrays orjson writes natively (fast, no Python floats in between); others go through tolist().
_ORJSON_NATIVE = {np.dtype(name) for name in ("float64", "float32", "int64", "int32", "int16", "int8",
                                              "uint64", "uint32", "uint16", "uint8", "bool")}
_DUMP = orjson.OPT_SERIALIZE_NUMPY
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class TensorSig:
    """One input or output as the manifest records it, in v2 terms."""

    name: str
    datatype: str  # FP32, INT64, BYTES...
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 where the dimension is symbolic

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> TensorSig:
        dtype = entry["dtype"]
        if dtype not in DATATYPES:
            raise ValueError(f"tensor {entry['name']!r} has dtype {dtype!r}, which the server cannot carry")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in entry["shape"])
        return cls(entry["name"], DATATYPES[dtype], np.dtype(np.str_ if dtype == "string" else dtype), shape)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Signature:
        return cls({e["name"]: TensorSig.from_manifest(e) for e in manifest["inputs"]},
                   {e["name"]: TensorSig.from_manifest(e) for e in manifest["outputs"]})


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]  # in the order asked for; every output when none was named
    binary: frozenset[str]  # outputs to send as binary data


def load_json(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        # orjson refuses NaN, Infinity and 1e400; the standard library reads them, so the check of
        # values can refuse them by name (or let them through with --allow-nonfinite).
        try:
            value = json.loads(bytes(raw))
        except (ValueError, RecursionError):
            raise RequestError(f"the body is not valid JSON ({err})", "send a JSON object") from None
        # It also reads a lone surrogate escape ("\ud800"), which is no text: echoed (the request
        # id), logged or given to onnxruntime, it would fail the answer with a 500.
        if _SURROGATE_ESCAPE.search(raw):
            _check_text(value)
        return value


def _check_text(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        half = err.object[err.start:err.end].encode("unicode_escape").decode()
        raise RequestError(f"the body holds {half}, half of a UTF-16 surrogate pair without the other half",
                           "escape a character beyond U+FFFF as a whole surrogate pair, or send it as UTF-8") from None
    except (ValueError, RecursionError):  # NaN and infinity are allowed here; nesting is checked later
        pass


def parse_infer(body: bytes, header_length: int | None, signature: Signature, allow_nonfinite: bool) -> InferRequest:
    """A v2 inference request: JSON, or (with Inference-Header-Content-Length) JSON then binary tensors."""
    view = memoryview(body)
    if header_length is None:
        head, tail = view, view[len(view):]
    elif 0 <= header_length <= len(view):
        head, tail = view[:header_length], view[header_length:]
    else:
        raise RequestError(f"Inference-Header-Content-Length is {header_length}, the body has {len(view)} bytes",
                           "give the size of the JSON part of the body")
    request = load_json(head)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError('the body must be a JSON object with an "inputs" list',
                           'e.g. {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError('"id" must be a string')
    if request_id is not None and len(request_id) > MAX_REQUEST_ID:
        raise RequestError(f'"id" is {len(request_id)} characters long, at most {MAX_REQUEST_ID} are taken',
                           "it is echoed in the answer and its X-Request-Id header: send a shorter one (a uuid)")
    literals = _may_hold_bools(head)
    parameters = _object(request.get("parameters"), '"parameters"')
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for position, item in enumerate(request["inputs"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"inputs[{position}] must be an object with a name")
        name = item["name"]
        sig = signature.inputs.get(name)
        if sig is None:
            raise RequestError(f"unknown input {name!r}", f"the model takes {_names(signature.inputs)}")
        if name in feed:
            raise RequestError(f"input {name!r} is given twice")
        if item.get("datatype") != sig.datatype:
            raise RequestError(f"input {name!r} has datatype {item.get('datatype')!r}, the model takes {sig.datatype}")
        shape = _checked_shape(sig, item.get("shape"))
        item_parameters = item.get("parameters")
        size = None if item_parameters is None else \
            _object(item_parameters, f"input {name!r} parameters").get("binary_data_size")
        if size is not None:
            if not _whole(size) or offset + size > len(tail):
                raise RequestError(f"input {name!r}: binary_data_size {size!r} runs past the end of the body "
                                   f"({len(tail) - offset} bytes left)")
            feed[name] = _from_binary(sig, tail[offset:offset + size], shape, allow_nonfinite)
            offset += size
        elif "data" in item:
            feed[name] = _from_json(sig, item["data"], shape, allow_nonfinite, literals)
        else:
            raise RequestError(f"input {name!r} has no data", 'give "data", or binary data with binary_data_size')
    if offset != len(tail):
        raise RequestError(f"{len(tail) - offset} bytes of binary data follow the last tensor",
                           "give binary_data_size for every binary input")
    if missing := [name for name in signature.inputs if name not in feed]:
        raise RequestError(f"missing input {missing[0]!r}", f"the model takes {_names(signature.inputs)}")
    outputs, binary = _requested_outputs(request.get("outputs"), signature, parameters.get("binary_data_output") is True)
    return InferRequest(request_id, feed, outputs, binary)


def parse_predict(body: bytes, signature: Signature, allow_nonfinite: bool) -> dict[str, np.ndarray]:
    """``{"rows": [[...], ...]}``, a bare list of rows, or ``{"inputs": {name: rows}}`` for several inputs."""
    payload = load_json(body)
    if isinstance(payload, list):
        payload = {"rows": payload}
    usage = 'send {"rows": [[...], ...]} or a list of rows'
    if not isinstance(payload, dict):
        raise RequestError("the body must be a list of rows or a JSON object", usage)
    if "rows" in payload:
        if len(signature.inputs) != 1:
            raise RequestError(f"this model takes {len(signature.inputs)} inputs, so rows alone are ambiguous",
                               'send {"inputs": {"' + '": rows, "'.join(signature.inputs) + '": rows}}')
        named = {next(iter(signature.inputs)): payload["rows"]}
    elif isinstance(payload.get("inputs"), dict):
        named = payload["inputs"]
    else:
        raise RequestError('the body has neither "rows" nor "inputs"', usage)
    if unknown := [name for name in named if name not in signature.inputs]:
        raise RequestError(f"unknown input {unknown[0]!r}", f"the model takes {_names(signature.inputs)}")
    if missing := [name for name in signature.inputs if name not in named]:
        raise RequestError(f"missing input {missing[0]!r}", f"the model takes {_names(signature.inputs)}")
    feed = {}
    literals = _may_hold_bools(body)
    for name, rows in named.items():
        sig = signature.inputs[name]
        raw = _json_array(sig, rows, literals)
        if raw.ndim != len(sig.shape):
            one_row = "; wrap a single row in a list: [[...]]" if raw.ndim == len(sig.shape) - 1 else ""
            raise RequestError(f"rows of input {name!r} are nested as {list(raw.shape)}, the model takes "
                               f"{_shape_text(sig.shape)}{one_row}")
        _checked_shape(sig, list(raw.shape))
        feed[name] = _cast(sig, raw, raw.shape, allow_nonfinite)
    return feed


def encode_infer(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary tensors follow it."""
    entries, blobs = [], []
    for name in request.outputs:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if name in request.binary:
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_value(array.reshape(-1))
        entries.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = entries
    head = orjson.dumps(answer, option=_DUMP)
    return (head, None) if not blobs else (b"".join([head, *blobs]), len(head))


def encode_predict(model: str, version: str, outputs: dict[str, np.ndarray]) -> bytes:
    return orjson.dumps({"model_name": model, "model_version": version,
                         "outputs": {name: json_value(array) for name, array in outputs.items()}}, option=_DUMP)


def datatype_of(array: np.ndarray) -> str:
    datatype = _DATATYPE_OF.get(array.dtype)
    if datatype is None:
        return "BYTES" if array.dtype.kind in "UO" else array.dtype.name.upper()
    return datatype


def json_value(array: np.ndarray) -> Any:
    if array.ndim == 0:  # a scalar output: its value (ascontiguousarray would make it a list of one)
        return array.item()
    if array.dtype in _ORJSON_NATIVE:
        return np.ascontiguousarray(array)
    return array.tolist()


def _requested_outputs(asked: Any, signature: Signature, binary_default: bool) -> tuple[tuple[str, ...], frozenset[str]]:
    if asked is None:
        names = tuple(signature.outputs)
        return names, frozenset(names if binary_default else ())
    if not isinstance(asked, list) or not asked:
        raise RequestError('"outputs" must be a list of {"name": ...} objects', "or leave it out for every output")
    names, binary = [], set()
    for position, item in enumerate(asked):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"outputs[{position}] must be an object with a name")
        name = item["name"]
        if name not in signature.outputs:
            raise RequestError(f"unknown output {name!r}", f"the model gives {_names(signature.outputs)}")
        parameters = _object(item.get("parameters"), f"output {name!r} parameters")
        if parameters.get("class_count"):
            raise RequestError(f"output {name!r}: the classification extension (class_count) is not supported",
                               "ask for the output itself")
        if parameters.get("binary_data", binary_default) is True:
            binary.add(name)
        if name not in names:
            names.append(name)
    return tuple(names), frozenset(binary)


def _checked_shape(sig: TensorSig, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise RequestError(f"input {sig.name!r}: shape must be a list of whole numbers, got {shape!r}",
                           f"the model takes {_shape_text(sig.shape)}")
    if len(shape) != len(sig.shape):
        raise RequestError(f"input {sig.name!r}: shape {shape} has {len(shape)} dimensions, the model takes "
                           f"{len(sig.shape)}: {_shape_text(sig.shape)}")
    for axis, (given, fixed) in enumerate(zip(shape, sig.shape)):
        if fixed >= 0 and given != fixed:
            raise RequestError(f"input {sig.name!r}: shape {shape} has {given} at dimension {axis}, the model "
                               f"takes {fixed} there: {_shape_text(sig.shape)}")
    if 0 in shape:
        raise RequestError(f"input {sig.name!r} is empty (shape {shape})", "send at least one row")
    return tuple(shape)


def _may_hold_bools(body: bytes | memoryview) -> bool:
    """Whether JSON text may hold true or false (anywhere: a parameter's value too); numpy takes
    true beside numbers as 1, so numeric data of such a body is searched for them (``_json_array``)."""
    raw = body if isinstance(body, bytes) else bytes(body)
    return b"true" in raw or b"false" in raw


def _holds_bool(data: Any) -> bool:
    pending = [data]
    while pending:
        items = pending.pop()
        if not isinstance(items, list):
            if items is True or items is False:
                return True
            continue
        for item in items:
            if item is True or item is False:
                return True
            if isinstance(item, list):
                pending.append(item)
    return False


def _json_array(sig: TensorSig, data: Any, literals: bool = True) -> np.ndarray:
    """``data`` as numpy sees it, refused unless it fits the input's datatype; ``literals``: the
    body may hold true or false, which numeric data must not (numpy would read them as 1 and 0)."""
    # A scalar (shape []) input may also be given as its value alone: /predict has no other way.
    scalar = not sig.shape and isinstance(data, (bool, int, float, str))
    if not isinstance(data, list) and not scalar:
        raise RequestError(f"input {sig.name!r}: data must be a JSON array, got {type(data).__name__}")
    try:
        raw = np.asarray(data)  # no dtype: see what the client sent before converting it
    except (ValueError, TypeError):
        raise RequestError(f"input {sig.name!r}: data is ragged (rows of different lengths) or nested too deeply",
                           "every row needs the same number of values") from None
    if raw.dtype.kind not in _ACCEPTS[sig.dtype.kind]:
        if raw.dtype.kind in "fO" and sig.dtype.kind in "iu":
            # numpy reads integers past int64 beside others ([0, 2**64 - 1]) as floats, losing digits,
            # or as objects: they may still be whole numbers, read exactly here (and range-checked).
            exact = np.array(data, dtype=object)
            if _integers(sig, exact):
                return exact
        raise RequestError(f"input {sig.name!r}: data holds {_HOLDS.get(raw.dtype.kind, raw.dtype.name)}, "
                           f"datatype {sig.datatype} takes {_TAKES[sig.dtype.kind]}")
    if literals and sig.dtype.kind in "fiu" and raw.dtype.kind in "fiu" and _holds_bool(data):
        raise RequestError(f"input {sig.name!r}: data holds true or false, datatype {sig.datatype} takes "
                           f"{_TAKES[sig.dtype.kind]}", "send 1 and 0, or give the model a BOOL input")
    return raw


def _integers(sig: TensorSig, exact: np.ndarray) -> bool:
    """Whether every value is a JSON integer; if not, why the first float does not fit an integer
    input: a fraction, out of range (a JSON integer past 64 bits reads as a float) or an integer
    written as a decimal (1.0). False, for the caller to say, at a null, a string or a bool."""
    limits = np.iinfo(sig.dtype)
    for index, value in enumerate(exact.reshape(-1)):
        if type(value) is int:
            continue
        if type(value) is not float:
            return False
        at = _at(exact, index)
        if not math.isfinite(value) or value != math.floor(value):
            raise RequestError(f"input {sig.name!r}: value {value!r} at {at} is not a whole number, "
                               f"datatype {sig.datatype} takes whole numbers")
        if not limits.min <= value <= limits.max:  # Python compares a float and an int exactly
            shown = int(value) if abs(value) <= 2**64 else value  # past that, a float's digits are not the client's
            raise RequestError(f"input {sig.name!r}: value {shown} at {at} is out of {sig.datatype} range "
                               f"({limits.min}..{limits.max})")
        raise RequestError(f"input {sig.name!r}: value {value!r} at {at} is a whole number written as a decimal, "
                           f"datatype {sig.datatype} takes integers", f"send {int(value)}, not {value!r}")
    return True


def _at(array: np.ndarray, flat_index: int) -> str:
    where = np.unravel_index(flat_index, array.shape) if array.ndim > 1 else (flat_index,)
    return "[" + ", ".join(str(int(i)) for i in where) + "]"


def _from_json(sig: TensorSig, data: Any, shape: tuple[int, ...], allow_nonfinite: bool,
               literals: bool = True) -> np.ndarray:
    raw = _json_array(sig, data, literals)
    count = math.prod(shape)
    if raw.size != count:
        raise RequestError(f"input {sig.name!r}: data has {raw.size} values, shape {list(shape)} needs {count}")
    if raw.ndim != 1 and raw.shape != shape:
        raise RequestError(f"input {sig.name!r}: data is nested as {list(raw.shape)}, shape says {list(shape)}",
                           "send data flat or nested as the shape")
    return _cast(sig, raw, shape, allow_nonfinite)


def _cast(sig: TensorSig, raw: np.ndarray, shape: tuple[int, ...], allow_nonfinite: bool) -> np.ndarray:
    if sig.dtype.kind in "iu" and raw.size:
        limits = np.iinfo(sig.dtype)
        low, high = raw.min(), raw.max()
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            raise RequestError(f"input {sig.name!r}: value {bad} is out of {sig.datatype} range "
                               f"({limits.min}..{limits.max})")
    with np.errstate(over="ignore"):  # a value past FP16's or FP32's range is refused by name below
        array = raw.astype(sig.dtype, copy=False).reshape(shape)
    if sig.dtype.kind == "f":
        _check_finite(sig, array, raw, allow_nonfinite)
    return array


def _check_finite(sig: TensorSig, array: np.ndarray, raw: np.ndarray | None, allow_nonfinite: bool) -> None:
    # FP16/FP32: a finite float64 sum means every value is finite (NaN and infinity propagate
    # through a sum, and float64 cannot overflow on them): one reduction, no temporary array.
    if array.dtype.itemsize < 8 and math.isfinite(np.add.reduce(array, axis=None, dtype=np.float64)):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    first = int(np.argmin(finite.reshape(-1)))
    at = _at(array, first)
    given = None if raw is None else raw.reshape(-1)[first]
    if given is not None and np.isfinite(given):
        raise RequestError(f"input {sig.name!r}: value {given} at {at} is out of {sig.datatype} range")
    if allow_nonfinite:
        return
    value = array.reshape(-1)[first]
    raise RequestError(f"input {sig.name!r}: {'NaN' if np.isnan(value) else 'infinity'} at {at}",
                       "send finite numbers, or start the server with --allow-nonfinite")


def _from_binary(sig: TensorSig, chunk: memoryview, shape: tuple[int, ...], allow_nonfinite: bool) -> np.ndarray:
    count = math.prod(shape)
    if sig.datatype == "BYTES":
        return np.array(_split_bytes(sig, chunk, count), dtype=object).reshape(shape)
    wanted = count * sig.dtype.itemsize
    if len(chunk) != wanted:
        raise RequestError(f"input {sig.name!r}: binary_data_size is {len(chunk)} bytes, shape {list(shape)} "
                           f"of {sig.datatype} needs {wanted}")
    if sig.datatype == "BOOL":  # one byte a value, 0 or 1: numpy would take any other byte as a bool
        octets = np.frombuffer(chunk, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            first = int(np.argmax(octets > 1))
            raise RequestError(f"input {sig.name!r}: BOOL binary data holds byte {int(octets[first])} at "
                               f"{_at(octets.reshape(shape), first)}", "send one byte a value: 0 (false) or 1 (true)")
    array = np.frombuffer(chunk, dtype=sig.dtype.newbyteorder("<")).reshape(shape)
    if not array.flags.aligned or array.dtype != sig.dtype:  # onnxruntime wants native, aligned data
        array = array.astype(sig.dtype)
    if sig.dtype.kind == "f":
        _check_finite(sig, array, None, allow_nonfinite)
    return array


def _split_bytes(sig: TensorSig, chunk: memoryview, count: int) -> list[str]:
    values, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise RequestError(f"input {sig.name!r}: BYTES data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", chunk, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(chunk):
            raise RequestError(f"input {sig.name!r}: BYTES element {len(values)} runs past its data")
        try:
            values.append(bytes(chunk[start:offset]).decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"input {sig.name!r}: BYTES element {len(values)} is not UTF-8 text") from None
    if len(values) != count:
        raise RequestError(f"input {sig.name!r}: binary data holds {len(values)} elements, the shape needs {count}")
    return values


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "UO":
        encoded = [str(value).encode("utf-8") for value in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names(tensors: dict[str, TensorSig]) -> str:
    return ", ".join(f"{sig.name} ({sig.datatype} {_shape_text(sig.shape)})" for sig in tensors.values())


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
