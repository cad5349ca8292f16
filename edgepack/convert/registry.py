"""Picks the converter for a model file by its suffix; one entry per framework."""

from __future__ import annotations

from pathlib import Path

from edgepack.convert.base import Converter
from edgepack.convert.sklearn import SklearnConverter
from edgepack.errors import InputError

_CONVERTERS: tuple[Converter, ...] = (SklearnConverter(),)


def _by_suffix() -> dict[str, Converter]:
    table: dict[str, Converter] = {}
    for converter in _CONVERTERS:
        for suffix in converter.suffixes:
            if suffix in table:  # two converters claiming one suffix is a programming error
                raise RuntimeError(f"suffix {suffix} registered by {table[suffix].name} and {converter.name}")
            table[suffix] = converter
    return table


def converter_for(path: Path) -> Converter:
    if not path.exists():
        raise InputError(f"{path}: no such model file", "check the path")
    if not path.is_file():
        raise InputError(f"{path}: not a file", "pass the saved model file")
    table = _by_suffix()
    suffix = path.suffix.lower()
    if suffix not in table:
        known = ", ".join(sorted(table))
        raise InputError(f"{path.name}: edgepack cannot read {suffix or 'suffix-less'} files",
                         f"supported model files: {known}")
    return table[suffix]
