"""Model inputs for a build: read from sample files or generated, checked against the model, split into runs.

A build needs examples of every input: parity, calibration, the accuracy gates and the on-device
benchmark all run the model on them. They come from ``--sample`` (``.npz`` keyed by input name,
``.npy`` for a one-input model, ``.csv`` for a table), from ``--validation`` (the same, plus
labels), or are generated from ``--input-shape``/``--input-range``.

Two layouts, because models do not all take rows:

- **rows**: each array is one feed whose rows lie along the input's batch axis (see
  ``runtime.session.batch_axes``); any run of rows is itself a feed. Tables, images, token ids.
- **feeds**: axis 0 of every array counts complete feeds. A model with a scalar input or a
  state whose batch axis cannot be found (``sr`` int64 [], ``state`` [2, ?, 128]) is fed this
  way: a sample file gives one feed, or several stacked on a new leading axis.
"""

from __future__ import annotations

import csv
import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from edgepack.errors import InputError
from edgepack.runtime.session import batch_axes, is_symbolic, rows_of
from edgepack.signature import Dim, TensorInfo, dims_text

RANDOM_ROWS = 256  # generated rows for a model that takes rows...
GENERATED_VALUES = 1 << 23  # ...at most this many values per input (256 rows of 3x224x224 would be 154 MB)
GENERATED_FEEDS = 32  # generated feeds for a model that takes whole feeds
_TEXT = "string"


@dataclass(frozen=True)
class Examples:
    arrays: dict[str, np.ndarray]
    origin: str  # "sample.npz", "random", ...
    axes: dict[str, int | None]  # each input's batch axis (rows layout)
    stacked: bool = False  # True: axis 0 of every array counts feeds
    feature_names: tuple[str, ...] = ()  # a table's column names

    @property
    def count(self) -> int:
        """Rows (rows layout) or feeds (feeds layout)."""
        if self.stacked:
            return len(next(iter(self.arrays.values())))
        rows = rows_of(self.arrays, self.axes)
        return 1 if rows is None else rows

    @property
    def unit(self) -> str:
        return "feed" if self.stacked else "row"

    def describe(self) -> str:
        count = self.count
        return f"{count} {self.unit}{'s' if count != 1 else ''} of {self.origin}"

    def chunks(self, size: int, equal: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``size`` rows (rows layout) or one feed at a time; ``equal``: all the
        same size (the histogram calibrators stack them), dropping a short last run."""
        if self.stacked:
            for index in range(self.count):
                yield {name: array[index, ...] for name, array in self.arrays.items()}
            return
        count = self.count
        size = max(1, min(size, count))
        stop = count - count % size if equal else count
        for start in range(0, stop, size):
            yield self._rows(start, min(start + size, count))

    def head(self, count: int) -> Examples:
        if self.stacked:
            return replace(self, arrays={name: array[:count] for name, array in self.arrays.items()})
        return replace(self, arrays=self._rows(0, min(count, self.count)))

    def bench_feed(self, rows: int, max_bytes: int | None = None) -> dict[str, np.ndarray]:
        """What a bundle keeps for its benchmark and warm-up: up to ``rows`` rows (fewer where that
        many would pass ``max_bytes``: 16 images of 3x224x224 are 9.6 MB; the benchmark repeats
        rows to make a larger batch), or the first feed."""
        if max_bytes is not None and not self.stacked and self.count:
            per_row = sum(array.nbytes for array in self.arrays.values()) / self.count
            rows = max(1, min(rows, int(max_bytes // max(per_row, 1))))
        return next(self.chunks(rows))

    def digest(self) -> str:
        """sha256 of the names, dtypes, shapes and bytes: what a lock file compares."""
        hasher = hashlib.sha256(b"stacked" if self.stacked else b"rows")
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            hasher.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            hasher.update(array.tobytes() if array.dtype.kind != "U" else "\x00".join(array.ravel()).encode())
        return hasher.hexdigest()

    def _rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: array if self.axes.get(name) is None else
                np.take(array, range(start, stop), axis=self.axes[name])
                for name, array in self.arrays.items()}


@dataclass(frozen=True)
class Validation:
    examples: Examples
    labels: np.ndarray | None  # one per example (row or feed): class labels or regression targets
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # other arrays, for a --metric function

    @property
    def origin(self) -> str:
        return self.examples.origin


# -- reading -----------------------------------------------------------------------------------------

def read_sample(path: Path, inputs: tuple[TensorInfo, ...], what: str = "sample") -> Examples:
    """``--sample`` (or ``--calibration``): every input of the model, checked against its signature."""
    arrays, names = _read_arrays(path, inputs, what, extra_ok=())
    with _role(what):
        return conform(arrays, inputs, path.name, names)


def read_validation(path: Path, inputs: tuple[TensorInfo, ...], label_column: str | None = None,
                    labels_required: bool = True) -> Validation:
    """Labelled examples: an .npz with the inputs (``X`` for a one-input model) and ``y`` (and any
    other arrays, for a --metric function), or a CSV whose label column is named (default: last)."""
    if not path.is_file():
        raise InputError(f"{path}: no such validation file",
                         "pass an .npz with the inputs (or X) and y, or a CSV with a label column")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table, header = _read_csv(path)
        if not header:
            raise InputError(f"{path}: a CSV validation file needs a header naming the label column", "add a header row")
        column = label_column or header[-1]
        if column not in header:
            raise InputError(f"{path}: no column named {column!r} (columns: {', '.join(header)})",
                             "pass --label-column with one of them")
        index = header.index(column)
        name = _only_input(inputs, path, "a CSV file").name
        with _role("validation data"):
            examples = conform({name: np.delete(table, index, axis=1).astype(np.float32)}, inputs, path.name,
                           tuple(h for h in header if h != column))
        labels, targets = table[:, index], {}
    elif suffix == ".npz":
        arrays, _ = _read_arrays(path, inputs, "validation data", extra_ok=("*",))
        input_names = {tensor.name for tensor in inputs}
        targets = {name: array for name, array in arrays.items() if name not in input_names}
        labels = targets.pop("y", None)
        with _role("validation data"):
            examples = conform({name: arrays[name] for name in input_names if name in arrays}, inputs, path.name)
        if labels is None and labels_required:
            raise InputError(f"{path}: no labels: the .npz has no array y",
                             "save it with numpy.savez(path, X=rows, y=labels), or give --metric")
    else:
        raise InputError(f"{path}: validation files must be .npz or .csv, not {suffix or 'no suffix'}",
                         "save inputs and labels with numpy.savez(path, X=rows, y=labels)")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != examples.count:
            raise InputError(f"{path}: {examples.count} {examples.unit}s but {len(labels)} labels",
                             f"give one label per {examples.unit}")
    return Validation(examples, labels, targets)


@contextmanager
def _role(what: str) -> Iterator[None]:
    """Errors about a file's arrays say which of the build's inputs the file is."""
    try:
        yield
    except InputError as err:
        raise InputError(f"{what} {err.message}", err.hint) from None


def _read_arrays(path: Path, inputs: tuple[TensorInfo, ...], what: str,
                 extra_ok: tuple[str, ...]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file",
                         "pass an .npz keyed by input name, an .npy (one-input models) or a .csv table")
    suffix = path.suffix.lower()
    names: tuple[str, ...] = ()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path}: not a readable .npy array ({err})", "save it with numpy.save") from None
        arrays = {_only_input(inputs, path, "an .npy file").name: array}
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path}: not a readable .npz file ({err})",
                             "save it with numpy.savez(path, **{input_name: array})") from None
        input_names = [tensor.name for tensor in inputs]
        if "X" in arrays and "X" not in input_names and len(inputs) == 1:
            arrays[input_names[0]] = arrays.pop("X")  # the one-input shorthand
        unknown = [key for key in arrays if key not in input_names]
        if unknown and "*" not in extra_ok:
            raise InputError(f"{path}: {', '.join(map(repr, unknown))} "
                             f"{'is not an input' if len(unknown) == 1 else 'are not inputs'} of the model "
                             f"(it takes {_listing(inputs)})", "key the arrays by input name")
    elif suffix == ".csv":
        table, names = _read_csv(path)
        arrays = {_only_input(inputs, path, "a CSV file").name: table.astype(np.float32)}
    else:
        raise InputError(f"{path}: {what} files must be .npz, .npy or .csv, not {suffix or 'no suffix'}",
                         "save the inputs with numpy.savez(path, **{input_name: array}) or numpy.save")
    return arrays, names


def _only_input(inputs: tuple[TensorInfo, ...], path: Path, form: str) -> TensorInfo:
    if len(inputs) != 1:
        raise InputError(f"{path}: {form} holds one array, and the model takes {len(inputs)} inputs "
                         f"({_listing(inputs)})", "give an .npz keyed by input name: numpy.savez(path, name=array, ...)")
    return inputs[0]


def _read_csv(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    with open(path, newline="", encoding="utf-8") as handle:
        table = [row for row in csv.reader(handle) if row]
    if not table:
        raise InputError(f"{path}: the CSV file is empty", "add a header and rows")
    header, body = table[0], table[1:]
    if _numeric(header):
        header, body = [], table
    widths = {len(row) for row in body} | ({len(header)} if header else set())
    if len(widths) > 1:
        raise InputError(f"{path}: rows have different numbers of columns ({sorted(widths)})", "fix the CSV")
    if not body:
        raise InputError(f"{path}: the CSV file has a header and no rows", "add rows")
    try:
        rows = np.array([[float(cell) for cell in row] for row in body], dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{path}: non-numeric cell ({err})", "encode the features as numbers") from None
    return rows, tuple(header)


def _numeric(cells: list[str]) -> bool:
    try:
        [float(c) for c in cells]
    except ValueError:
        return False
    return True


# -- checking ----------------------------------------------------------------------------------------

def conform(arrays: dict[str, np.ndarray], inputs: tuple[TensorInfo, ...], origin: str,
            feature_names: tuple[str, ...] = ()) -> Examples:
    """``arrays`` checked against the model's inputs (names, rank, fixed dimensions, dtype) and cast
    to the dtypes the model takes. Every refusal names the input, what the model takes and what was given."""
    missing = [tensor for tensor in inputs if tensor.name not in arrays]
    if missing:
        raise InputError(f"{origin} has no array for input {missing[0].name!r} (the model takes {_listing(inputs)})",
                         "give every input: numpy.savez(path, **{input_name: array})")
    layouts = {tensor.name: _layout(tensor, arrays[tensor.name], origin) for tensor in inputs}
    stacked = set(layouts.values()) == {"feeds"}
    if len(set(layouts.values())) > 1:
        for tensor in inputs:  # one array of one more rank that is no stack of feeds is simply misshapen
            array = np.asarray(arrays[tensor.name])
            if layouts[tensor.name] == "feeds" and not _fits(tensor.dims, array.shape[1:]):
                raise InputError(f"{origin}: input {tensor.name!r} takes {len(tensor.dims)} dimensions "
                                 f"{dims_text(tensor.dims)}, the array has shape {list(array.shape)}",
                                 _rank_hint(tensor, array))
        raise InputError(f"{origin}: some arrays are one feed and others several stacked feeds "
                         f"({', '.join(f'{n}: {v}' for n, v in layouts.items())})",
                         "stack all inputs the same way: each array as the model takes it, or all with one more leading axis")
    if stacked:
        counts = {len(arrays[t.name]) for t in inputs}
        if len(counts) > 1:
            raise InputError(f"{origin}: stacked feeds of different counts ({sorted(counts)})",
                             "give every input the same number of feeds along the leading axis")
    cast = {}
    for tensor in inputs:
        array = _cast(tensor, np.asarray(arrays[tensor.name]), origin)
        _check_dims(tensor, array.shape[1:] if stacked else array.shape, origin)
        cast[tensor.name] = array
    if not feature_names and len(inputs) == 1 and not stacked and cast[inputs[0].name].ndim == 2:
        feature_names = tuple(f"f{i}" for i in range(cast[inputs[0].name].shape[1]))  # a table's columns
    dims = {t.name: list(t.dims) if t.dims is not None else (["?"] * (cast[t.name].ndim - stacked)) for t in inputs}
    axes = batch_axes(dims)
    examples = Examples(cast, origin, axes, stacked, feature_names)
    if not stacked and (rows_of(cast, axes) is None or any(
            axes[t.name] is None and cast[t.name].ndim > 0 for t in inputs)):
        # Not every input has rows to split (a scalar alone is fine): the arrays are one feed.
        if any(axes[t.name] is not None for t in inputs) and rows_of(cast, axes) is None:
            sizes = {t.name: cast[t.name].shape[axes[t.name]] for t in inputs if axes[t.name] is not None}
            raise InputError(f"{origin}: the inputs' batch axes hold different numbers of rows ({sizes})",
                             "give every input the same number of rows")
        if any(axes[t.name] is None and cast[t.name].ndim > 0 for t in inputs):
            examples = Examples({name: array[None] for name, array in cast.items()}, origin, axes, True, feature_names)
    if examples.count == 0:
        raise InputError(f"{origin} holds no examples (an empty batch)", "give at least one row")
    return examples


def _layout(tensor: TensorInfo, array: np.ndarray, origin: str) -> str:
    if tensor.dims is None:
        return "rows"
    rank = len(tensor.dims)
    if array.ndim == rank:
        return "rows"
    if array.ndim == rank + 1:
        return "feeds"
    if rank == 2 and array.ndim == 1 and not is_symbolic(tensor.dims[1]) and tensor.dims[1] == 1:
        return "rows"  # a column of values for a one-feature table; _cast reshapes it
    raise InputError(f"{origin}: input {tensor.name!r} takes {rank} dimension{'s' if rank != 1 else ''} "
                     f"{dims_text(tensor.dims)}, the array has shape {list(array.shape)}",
                     _rank_hint(tensor, array))


def _rank_hint(tensor: TensorInfo, array: np.ndarray) -> str:
    rank = len(tensor.dims or ())
    if array.ndim == rank - 1:
        return f"add the batch axis: array[None] (one row), or shape it like {dims_text(tensor.dims)}"
    return f"shape it like {dims_text(tensor.dims)}, batch first; several feeds may be stacked on one more leading axis"


def _check_dims(tensor: TensorInfo, shape: tuple[int, ...], origin: str) -> None:
    if tensor.dims is None:
        return
    wrong = [(axis, dim, given) for axis, (dim, given) in enumerate(zip(tensor.dims, shape))
             if not is_symbolic(dim) and dim != given]
    if not wrong:
        return
    axis, dim, given = wrong[0]
    raise InputError(f"{origin}: input {tensor.name!r} takes {dims_text(tensor.dims)}, given "
                     f"{list(shape)} ({given} at dimension {axis}, where the model fixes {dim})",
                     _layout_hint(tensor.dims, shape))


def _fits(dims: tuple[Dim, ...] | None, shape: tuple[int, ...]) -> bool:
    return dims is None or (len(dims) == len(shape) and all(is_symbolic(d) or d == n for d, n in zip(dims, shape)))


def _layout_hint(dims: tuple[Dim, ...], shape: tuple[int, ...]) -> str:
    """Say so when the sample is the channels-last form of a channels-first input (NHWC for NCHW)."""
    if len(dims) >= 3 and len(shape) == len(dims) and not is_symbolic(dims[1]):
        moved = (shape[0], shape[-1], *shape[1:-1])
        if all(is_symbolic(d) or d == s for d, s in zip(dims, moved)):
            order = ", ".join(map(str, (0, len(dims) - 1, *range(1, len(dims) - 1))))
            return (f"the sample looks channels-last ({list(shape)}) and the model takes channels first: "
                    f"numpy.transpose(array, ({order}))")
    return f"give arrays shaped {dims_text(dims)}; open dimensions take any size"


def _cast(tensor: TensorInfo, array: np.ndarray, origin: str) -> np.ndarray:
    """The array in the input's dtype, refusing what would change values (fractions for ints, overflow)."""
    if tensor.dims is not None and len(tensor.dims) == 2 and array.ndim == 1:
        array = array.reshape(-1, 1)
    where = f"{origin}: input {tensor.name!r}"
    kind = array.dtype.kind
    # A model that records no dtype (a torch module) takes the sample's: integer ids stay integers,
    # floats become float32 (what torch layers hold).
    target = tensor.dtype or ("float32" if kind == "f" else array.dtype.name if kind in "iub" else _TEXT)
    if target == _TEXT:
        if kind not in "US":
            raise InputError(f"{where} takes text, the array holds {array.dtype}", "give an array of strings")
        return array.astype(str)
    if kind not in "fiub":
        raise InputError(f"{where} takes {target}, the array holds {array.dtype}",
                         f"give a numeric array ({target})")
    dtype = np.dtype(target)
    if dtype.kind == "f":
        if kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{where} has NaN or infinite values", "clean the sample")
        return np.asarray(array, dtype=dtype, order="C")
    if kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError(f"{where} takes {target} (whole numbers), the array holds fractional values",
                             f"give an integer array: array.astype(numpy.{target})")
    if dtype.kind == "b":
        if kind != "b" and not np.isin(array, (0, 1)).all():
            raise InputError(f"{where} takes bool, the array holds values other than 0 and 1", "give a bool array")
        return np.asarray(array, dtype=bool, order="C")
    if array.size and kind != "b":
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InputError(f"{where} takes {target} ({info.min}..{info.max}), the array holds {low}..{high}",
                             f"give values within {target}'s range")
    return np.asarray(array, dtype=dtype, order="C")


def _listing(inputs: tuple[TensorInfo, ...]) -> str:
    return ", ".join(tensor.describe() for tensor in inputs)


# -- generating --------------------------------------------------------------------------------------

_SHAPE = re.compile(r"^\s*(?:([^=\s]+)\s*=)?\s*([0-9x, ]+)\s*$")
_RANGE = re.compile(r"^\s*(?:([^=\s]+)\s*=)?\s*(-?[0-9.eE+-]+)\s*:\s*(-?[0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Generated:
    """What ``--input-shape`` and ``--input-range`` ask for."""

    row_shape: tuple[int, ...] | None = None  # `--input-shape 64`: one row of a one-input model, no batch axis
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # `NAME=1x3x224x224`: an input's whole shape
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # NAME (or "" for every input) -> range

    @classmethod
    def parse(cls, shapes: tuple[str, ...], ranges: tuple[str, ...]) -> Generated:
        row_shape, named = None, {}
        for text in shapes:
            match = _SHAPE.match(text)
            dims = _ints(match.group(2)) if match else None
            if not match or not dims or any(d <= 0 for d in dims):
                raise InputError(f"--input-shape {text!r} is not NAME=DIMS or DIMS with positive sizes",
                                 "write e.g. --input-shape x=1x3x224x224, or --input-shape 64 for a table")
            if match.group(1):
                named[match.group(1)] = dims
            elif row_shape is not None:
                raise InputError("--input-shape without a name is given twice", "name each input: NAME=DIMS")
            else:
                row_shape = dims
        bounds = {}
        for text in ranges:
            match = _RANGE.match(text)
            try:
                low, high = (float(match.group(2)), float(match.group(3))) if match else (None, None)
            except ValueError:
                low = high = None
            if low is None or high is None or low > high:
                raise InputError(f"--input-range {text!r} is not [NAME=]LOW:HIGH with LOW <= HIGH",
                                 "write e.g. --input-range bytes=0:256 or --input-range 0:1")
            bounds[match.group(1) or ""] = (low, high)  # type: ignore[union-attr]
        return cls(row_shape, named, bounds)

    @property
    def given(self) -> bool:
        return self.row_shape is not None or bool(self.shapes)


def _ints(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in re.split(r"[x,]", text.replace(" ", "")) if part)
    except ValueError:
        return None


def generate(inputs: tuple[TensorInfo, ...], asked: Generated, default_dtype: str = "float32",
             seed: int = 0) -> Examples:
    """Seeded random examples of every input: floats normal (or uniform in the input's range),
    integers and booleans uniform in the range (inclusive; default 0..1)."""
    names = {tensor.name for tensor in inputs}
    unknown = [name for name in [*asked.shapes, *asked.ranges] if name and name not in names]
    if unknown:
        raise InputError(f"--input-shape/--input-range name {unknown[0]!r}, which is not an input "
                         f"(the model takes {_listing(inputs)})", "use the model's input names")
    if asked.row_shape is not None and len(inputs) != 1:
        raise InputError(f"--input-shape {'x'.join(map(str, asked.row_shape))} has no input name, and the model "
                         f"takes {len(inputs)} inputs ({_listing(inputs)})", "name each input: NAME=DIMS")
    shapes = {tensor.name: _feed_shape(tensor, asked) for tensor in inputs}
    # An input the model file does not shape (TorchScript) takes rows along its first axis.
    axes = batch_axes({t.name: list(t.dims) if t.dims is not None else ["?", *shapes[t.name][1:]] for t in inputs})
    takes_rows = all(axes[name] is not None or not shapes[name] for name in shapes) and any(
        axes[name] is not None for name in shapes)
    rng = np.random.default_rng(seed)
    arrays = {}
    if takes_rows:
        per_row = max(int(np.prod([s for a, s in enumerate(shape) if a != axes[n]])) for n, shape in shapes.items())
        rows = max(16, min(RANDOM_ROWS, GENERATED_VALUES // max(per_row, 1)))
        for tensor in inputs:
            shape = list(shapes[tensor.name])
            if axes[tensor.name] is not None:
                shape[axes[tensor.name]] = rows
            arrays[tensor.name] = _values(rng, tuple(shape), tensor, asked, default_dtype)
    else:
        for tensor in inputs:
            arrays[tensor.name] = _values(rng, (GENERATED_FEEDS, *shapes[tensor.name]), tensor, asked, default_dtype)
    names_ = tuple(f"f{i}" for i in range(shapes[inputs[0].name][-1])) if (
        len(inputs) == 1 and len(shapes[inputs[0].name]) == 2) else ()
    return Examples(arrays, "random", axes, not takes_rows, names_)


def _feed_shape(tensor: TensorInfo, asked: Generated) -> tuple[int, ...]:
    if tensor.name in asked.shapes:
        shape = asked.shapes[tensor.name]
        _check_dims(tensor, shape, f"--input-shape {tensor.name}")
        if tensor.dims is not None and len(shape) != len(tensor.dims):
            raise InputError(f"--input-shape {tensor.name}={'x'.join(map(str, shape))} has {len(shape)} dimensions, "
                             f"input {tensor.name!r} takes {len(tensor.dims)}: {dims_text(tensor.dims)}",
                             "give the whole shape, batch included: e.g. 1x3x224x224")
        return shape
    if asked.row_shape is not None:
        shape = (1, *asked.row_shape)
        if tensor.dims is not None:
            if len(shape) != len(tensor.dims):
                raise InputError(f"--input-shape {'x'.join(map(str, asked.row_shape))} is one row of "
                                 f"{len(asked.row_shape)} dimension(s); input {tensor.name!r} takes "
                                 f"{dims_text(tensor.dims)}", f"write --input-shape {tensor.name}=DIMS, batch included")
            _check_dims(tensor, shape, "--input-shape")
        return shape
    if tensor.dims is None:
        raise InputError(f"the shape of input {tensor.name!r} is not known before converting",
                         f"pass --sample, or --input-shape {tensor.name}=DIMS (batch included)")
    open_dims = [str(d) for axis, d in enumerate(tensor.dims) if is_symbolic(d) and axis != 0]
    if open_dims:
        raise InputError(f"input {tensor.name!r} {dims_text(tensor.dims)} has open dimensions "
                         f"({', '.join(open_dims)}) that no sample fixes",
                         f"pass --sample, or --input-shape {tensor.name}=DIMS, e.g. "
                         f"{'x'.join('1' if is_symbolic(d) and a == 0 else '32' if is_symbolic(d) else str(d) for a, d in enumerate(tensor.dims))}")
    return tuple(1 if is_symbolic(d) else int(d) for d in tensor.dims)


def _values(rng: np.random.Generator, shape: tuple[int, ...], tensor: TensorInfo, asked: Generated,
            default_dtype: str) -> np.ndarray:
    dtype = tensor.dtype or default_dtype
    bounds = asked.ranges.get(tensor.name, asked.ranges.get(""))
    if dtype == _TEXT:
        return rng.integers(0, 2, size=shape).astype(str)
    kind = np.dtype(dtype).kind
    if kind == "f":
        values = rng.standard_normal(shape) if bounds is None else rng.uniform(bounds[0], bounds[1], size=shape)
        return values.astype(dtype)
    low, high = (0, 1) if bounds is None else (int(np.ceil(bounds[0])), int(np.floor(bounds[1])))
    if kind == "b":
        return rng.integers(max(low, 0), min(high, 1) + 1, size=shape).astype(bool)
    info = np.iinfo(dtype)
    if low < info.min or high > info.max or low > high:
        raise InputError(f"--input-range for {tensor.name!r} ({low}:{high}) does not fit {dtype}",
                         f"give a range within {info.min}..{info.max}")
    return rng.integers(low, high + 1, size=shape, dtype=np.int64).astype(dtype)
