"""Sample data: the rows that fix a model's input signature and feed parity checks and benchmarks."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import InputError

RANDOM_ROWS = 256
_DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class SampleData:
    rows: np.ndarray  # float32, batch first: (samples, features) for tables, (samples, C, H, W) for images
    feature_names: tuple[str, ...]  # tables only
    origin: str  # "file.npy", "file.csv" or "random"

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.rows.shape[1:])


def read_sample(path: Path) -> SampleData:
    if not path.is_file():
        raise InputError(f"{path}: no such sample file", "pass --sample with a .npy or .csv file of input rows")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            rows = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path}: not a readable .npy array ({err})", "save it with numpy.save") from None
        names: tuple[str, ...] = ()
    elif suffix == ".csv":
        rows, names = _read_csv(path)
    else:
        raise InputError(f"{path}: sample files must be .npy or .csv, not {suffix or 'no suffix'}",
                         "save the rows with numpy.save or as CSV with a header")
    if rows.ndim == 1:
        rows = rows.reshape(-1, 1)
    if rows.ndim < 2 or 0 in rows.shape:
        raise InputError(f"{path}: expected samples along the first axis, got shape {rows.shape}",
                         "give one row per sample (a 2-D table, or N x C x H x W for images)")
    if not np.issubdtype(rows.dtype, np.number):
        raise InputError(f"{path}: sample data must be numeric, got {rows.dtype}", "encode the features as numbers")
    if not np.isfinite(rows).all():
        raise InputError(f"{path}: sample data has NaN or infinite values", "clean the sample rows")
    if rows.ndim == 2:
        names = names or tuple(f"f{i}" for i in range(rows.shape[1]))
    return SampleData(np.ascontiguousarray(rows, dtype=np.float32), names, path.name)


def random_sample(shape: str, dtype: str, seed: int = 0) -> SampleData:
    """Random rows of one sample's shape without the batch axis (``64``, ``1,8,8``)."""
    try:
        dims = tuple(int(d) for d in shape.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise InputError(f"--input-shape {shape!r} is not a list of integers", "write e.g. --input-shape 64") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {shape!r} needs positive sizes", "write e.g. --input-shape 64 or 1,8,8")
    if dtype not in _DTYPES:
        raise InputError(f"--input-dtype {dtype!r} is not supported", f"use one of {', '.join(_DTYPES)}")
    rows = np.random.default_rng(seed).standard_normal((RANDOM_ROWS, *dims)).astype(np.float32)
    names = tuple(f"f{i}" for i in range(dims[0])) if len(dims) == 1 else ()
    return SampleData(rows, names, "random")


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


@dataclass(frozen=True)
class ValidationData:
    rows: np.ndarray  # float32, batch first, like SampleData.rows
    labels: np.ndarray  # 1-D: class labels or regression targets
    origin: str


def read_validation(path: Path, label_column: str | None = None) -> ValidationData:
    """Labelled rows: an .npz with X and y, or a CSV whose label column is named (default: last)."""
    if not path.is_file():
        raise InputError(f"{path}: no such validation file", "pass an .npz with X and y, or a CSV with a label column")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if not {"X", "y"} <= set(archive.files):
                    raise InputError(f"{path}: an .npz validation file needs arrays X and y, has {archive.files}",
                                     "save it with numpy.savez(path, X=rows, y=labels)")
                rows, labels = archive["X"], archive["y"]
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path}: not a readable .npz file ({err})", "save it with numpy.savez") from None
    elif suffix == ".csv":
        table, header = _read_csv(path)
        if not header:
            raise InputError(f"{path}: a CSV validation file needs a header naming the label column",
                             "add a header row")
        column = label_column or header[-1]
        if column not in header:
            raise InputError(f"{path}: no column named {column!r} (columns: {', '.join(header)})",
                             "pass --label-column with one of them")
        index = header.index(column)
        rows, labels = np.delete(table, index, axis=1), table[:, index]
    else:
        raise InputError(f"{path}: validation files must be .npz or .csv", "save rows and labels as .npz X/y")
    if len(rows) != len(labels) or len(rows) == 0:
        raise InputError(f"{path}: {len(rows)} rows but {len(labels)} labels", "give one label per row")
    if not np.isfinite(np.asarray(rows, dtype=np.float64)).all():
        raise InputError(f"{path}: validation rows have NaN or infinite values", "clean the validation rows")
    rows = np.asarray(rows, dtype=np.float32)
    return ValidationData(rows.reshape(len(rows), -1) if rows.ndim == 1 else rows, np.asarray(labels).reshape(-1),
                          path.name)


def check_rows(rows: np.ndarray, feature_shape: tuple[int, ...], origin: str) -> np.ndarray:
    """Rows from another file (calibration, validation) must look like the sample's rows."""
    if tuple(rows.shape[1:]) != tuple(feature_shape):
        raise InputError(f"{origin} has rows of shape {tuple(rows.shape[1:])}, the model takes {tuple(feature_shape)}",
                         "pass rows shaped like the sample data")
    if not np.isfinite(rows).all():
        raise InputError(f"{origin} has NaN or infinite values", "clean those rows")
    return rows
