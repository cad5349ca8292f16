"""A model's inputs and outputs as the build sees them: names, dtypes, dimensions with their symbols.

Converters know part of this before a model is converted (names always; dtypes and shapes where the
format records them); the converted ONNX graph then gives all of it. Dimensions are an ``int``
(fixed) or a ``str`` (open: its name, or ``"?"`` when the model leaves it unnamed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.runtime.session import batch_axes, is_symbolic

Dim = int | str
UNNAMED = "?"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str | None = None  # numpy dtype name, or "string"; None: not known yet (filled by the sample)
    dims: tuple[Dim, ...] | None = None  # None: rank not known yet

    def describe(self) -> str:
        """``x float32 [batch, 3, H, W]``: how error messages name a tensor."""
        return f"{self.name} {self.dtype or 'any dtype'} {dims_text(self.dims)}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def batch_axes(self) -> dict[str, int | None]:
        """Each input's batch axis, by the runtime's rule (the one a device applies too)."""
        return batch_axes({t.name: list(t.dims or ()) for t in self.inputs})


def dims_text(dims: tuple[Dim, ...] | None) -> str:
    if dims is None:
        return "[any shape]"
    return "[" + ", ".join(str(d) for d in dims) + "]"


def onnx_dtype(elem_type: int) -> str:
    from onnx import TensorProto, helper

    if elem_type == TensorProto.STRING:
        return "string"
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _dims(value_info: Any) -> tuple[Dim, ...] | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or UNNAMED)
    return tuple(dims)


def graph_inputs(model: Any) -> list[Any]:
    """The graph's real inputs: older exporters also list initializers (weights) among them."""
    weights = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def from_onnx(model: Any) -> Signature:
    """The signature of an ``onnx.ModelProto``; non-tensor values (sequences, maps) are refused by
    the caller, which knows how to say so."""
    def info(value_info: Any) -> TensorInfo:
        kind = value_info.type.WhichOneof("value")
        dtype = onnx_dtype(value_info.type.tensor_type.elem_type) if kind == "tensor_type" else kind
        return TensorInfo(value_info.name, dtype, _dims(value_info) if kind == "tensor_type" else None)

    return Signature(tuple(info(i) for i in graph_inputs(model)), tuple(info(o) for o in model.graph.output))


def static_dims(dims: tuple[Dim, ...]) -> list[int | None]:
    return [None if is_symbolic(d) else int(d) for d in dims]  # type: ignore[arg-type]
