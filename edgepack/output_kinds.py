"""What each output of a model is, which decides how two models' answers are compared.

A kind comes from the converter when it knows (a scikit-learn classifier gives a label and
probabilities), from the user (``--output-kind NAME=KIND``), or from this documented rule, in order:

1. ``label``: an integer, boolean or text output of rank 1 (or ``[N, 1]``).
2. ``state``: an output shaped like an input of the same dtype whose name it extends
   (``state`` → ``stateN``, ``h`` → ``hn``): a recurrent state fed back on the next call.
3. ``probabilities``: float, rank 2, every value in [0, 1] and every row summing to 1.
4. ``sequence``: float, rank 3 or more, every position's last axis summing to 1 (per-position
   class probabilities, as an OCR recognizer or a tagger gives).
5. ``unknown`` otherwise: compared channel by channel, the strictest general rule.

``logits``, ``scores``, ``boxes``, ``embedding``, ``regression`` and ``mask`` are never guessed from
values (a logits tensor and a regression tensor look alike); converters and users name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from edgepack.errors import InputError
from edgepack.signature import Signature, TensorInfo

OutputKind = Literal["label", "probabilities", "logits", "scores", "boxes", "embedding", "regression",
                     "sequence", "mask", "state", "unknown"]
KINDS: tuple[str, ...] = get_args(OutputKind)
Origin = Literal["converter", "user", "rule"]


@dataclass(frozen=True)
class ResolvedKind:
    kind: OutputKind
    origin: Origin
    why: str = ""  # for the rule: which clause matched


def parse_output_kinds(texts: tuple[str, ...], outputs: list[str] | None = None) -> dict[str, OutputKind]:
    """``--output-kind NAME=KIND`` (repeatable); with ``outputs``, names are checked against the model."""
    kinds: dict[str, OutputKind] = {}
    for text in texts:
        name, sep, kind = text.rpartition("=")
        if not sep or not name or kind not in KINDS:
            raise InputError(f"--output-kind {text!r} is not NAME=KIND with KIND one of {', '.join(KINDS)}",
                             "e.g. --output-kind output0=boxes")
        if outputs is not None and name not in outputs:
            raise InputError(f"--output-kind names {name!r}, which is not an output of the model "
                             f"(outputs: {', '.join(outputs)})", "use the model's output names")
        kinds[name] = kind  # type: ignore[assignment]
    return kinds


def resolve_kinds(signature: Signature, from_converter: tuple[OutputKind | None, ...] | None,
                  from_user: dict[str, OutputKind], reference: list[list[np.ndarray]]) -> tuple[ResolvedKind, ...]:
    """One kind per output: the user's word, else the converter's, else the rule on the reference
    outputs (``reference[i]``: output i's values, one array per run)."""
    resolved = []
    for index, output in enumerate(signature.outputs):
        if output.name in from_user:
            resolved.append(ResolvedKind(from_user[output.name], "user"))
        elif from_converter is not None and index < len(from_converter) and from_converter[index] is not None:
            resolved.append(ResolvedKind(from_converter[index], "converter"))  # type: ignore[arg-type]
        else:
            kind, why = infer_kind(output, signature.inputs, reference[index] if index < len(reference) else [])
            resolved.append(ResolvedKind(kind, "rule", why))
    return tuple(resolved)


def infer_kind(output: TensorInfo, inputs: tuple[TensorInfo, ...], values: list[np.ndarray]) -> tuple[OutputKind, str]:
    arrays = [np.asarray(v) for v in values]
    rank = arrays[0].ndim if arrays else len(output.dims or ())
    dtype = arrays[0].dtype if arrays else np.dtype(output.dtype if output.dtype not in (None, "string") else "U1")
    if dtype.kind in "iubUSO" and (rank == 1 or (rank == 2 and arrays and arrays[0].shape[1] == 1)):
        return "label", "a rank-1 integer, boolean or text output"
    state_of = _state_input(output, inputs)
    if state_of is not None:
        return "state", f"shaped like input {state_of!r}, whose name it extends"
    if dtype.kind == "f" and arrays and all(a.size for a in arrays):
        if rank == 2 and _sums_to_one(arrays) and all(a.min() >= 0 and a.max() <= 1 for a in arrays):
            return "probabilities", "rows in [0, 1] that sum to 1"
        if rank >= 3 and _sums_to_one(arrays) and all(a.min() >= 0 for a in arrays):
            return "sequence", "each position's last axis sums to 1"
    return "unknown", "no rule matched: compared channel by channel"


def _sums_to_one(arrays: list[np.ndarray]) -> bool:
    return all(a.shape[-1] > 1 and np.allclose(a.astype(np.float64).sum(axis=-1), 1.0, atol=1e-3) for a in arrays)


def _state_input(output: TensorInfo, inputs: tuple[TensorInfo, ...]) -> str | None:
    for tensor in inputs:
        if tensor.dtype != output.dtype or tensor.dims is None or output.dims is None:
            continue
        if len(tensor.dims) != len(output.dims) or not tensor.dims:
            continue
        same_shape = all(a == b or not isinstance(a, int) or not isinstance(b, int)
                         for a, b in zip(tensor.dims, output.dims))
        stem = re.sub(r"[^a-z0-9]", "", tensor.name.lower())
        name = re.sub(r"[^a-z0-9]", "", output.name.lower())
        if same_shape and stem and name != stem and name.startswith(stem) and len(name) - len(stem) <= 4:
            return tensor.name
    return None
