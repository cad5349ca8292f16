"""``edgepack.toml``: a project's build options and budgets, so CI runs `edgepack build` with no flags.

    [build]                        # any `edgepack build` option, by its long name with _ for -
    model = "models/digits.skops"
    sample = "data/sample.npy"
    target = "edge-1core"
    [budgets]                      # for build and bench
    max_p99_ms = 2.0
    max_size_mb = 5
    max_memory_mb = 256
    [bench]                        # `edgepack bench` defaults
    profile = "edge-1core"
    batch = "1,8,32"

A flag given on the command line wins over the file; the file wins over a profile's [budgets].
Paths are relative to the file. Unknown sections and keys are errors naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgepack.toml_files import read_toml, validate

FILE_NAME = "edgepack.toml"
_HINT = "see `edgepack build --help` for the option names; edgepack.toml takes them with _ for -"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildSection(_Section):
    model: Path | None = None
    weights: Path | None = None
    target: str | None = None
    sample: Path | None = None
    input_shape: list[str] | str | None = None
    input_range: list[str] | str | None = None
    input_dtype: str | None = None
    out: Path | None = None
    name: str | None = None
    quantize: str | None = None
    calibration: Path | None = None
    calibration_method: str | None = None
    validation: Path | None = None
    label_column: str | None = None
    max_accuracy_drop: float | None = Field(None, ge=0)
    allow_pickle: bool | None = None
    trust: list[str] | None = None
    atol: float | None = Field(None, ge=0)
    rtol: float | None = Field(None, ge=0)
    min_agreement: float | None = Field(None, ge=0, le=1)
    max_channel_error: float | None = Field(None, ge=0)
    output_kind: list[str] | None = None
    metric: str | None = None
    variant: str | None = None
    lock: Path | None = None
    batch: int | None = Field(None, ge=1)
    bench_time: float | None = Field(None, gt=0)
    arch: str | None = None
    python_version: str | None = None
    image: bool | None = None
    base_image: list[str] | None = None
    platform: str | None = None
    builder: str | None = None


class BudgetsSection(_Section):
    max_p99_ms: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)
    max_image_mb: float | None = Field(None, gt=0)


class BenchSection(_Section):
    profile: str | None = None
    batch: str | None = None
    concurrency: str | None = None
    processes: int | None = Field(None, ge=1)
    bench_time: float | None = Field(None, gt=0)


class ProjectFile(_Section):
    build: BuildSection = BuildSection()
    budgets: BudgetsSection = BudgetsSection()
    bench: BenchSection = BenchSection()
    path: Path | None = Field(None, exclude=True)

    def options(self, command: Literal["build", "bench"]) -> dict[str, Any]:
        """The values this file sets for ``command``'s options, paths made relative to the file."""
        section = self.build if command == "build" else self.bench
        values = {**section.model_dump(exclude_none=True), **self.budgets.model_dump(exclude_none=True)}
        if command == "bench":
            values.pop("max_size_mb", None)  # a bundle's size is judged when it is built
            values.pop("max_image_mb", None)
        base = self.path.parent if self.path else Path(".")
        return {key: base / value if isinstance(value, Path) and not value.is_absolute() else value
                for key, value in values.items()}


def find_project_file(explicit: Path | None) -> ProjectFile | None:
    """``--config FILE``, else ./edgepack.toml when there is one, else nothing."""
    path = explicit if explicit is not None else Path(FILE_NAME)
    if explicit is None and not path.is_file():
        return None
    data = read_toml(path, "project file")
    for key in ("batch", "concurrency"):  # `batch = 8` as well as `batch = "1,8"` under [bench]
        if isinstance(data.get("bench", {}).get(key), int):
            data["bench"][key] = str(data["bench"][key])
    project = validate(ProjectFile, data, path, _HINT)
    return project.model_copy(update={"path": path})


def merge_options(given: dict[str, Any], explicit: set[str], project: ProjectFile | None,
                  command: Literal["build", "bench"]) -> dict[str, Any]:
    """``given`` with every option the user did not type taken from the project file, when it sets one."""
    if project is None:
        return dict(given)
    from_file = project.options(command)
    return {key: value if key in explicit or key not in from_file else from_file[key]
            for key, value in given.items()}
