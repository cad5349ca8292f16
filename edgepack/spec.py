"""BuildSpec: everything a build needs to know, typed and validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgepack.budgets import Budgets
from edgepack.convert.base import model_file
from edgepack.errors import InputError
from edgepack.package.wheels import ARCHES, PYTHON_VERSION
from edgepack.gates import GateSettings
from edgepack.quantize import VARIANTS, VARIANTS_FOR_MODE, CalibrationMethod, QuantizeMode

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BuildSpec:
    model: Path
    target: str = "edge"
    sample: Path | None = None
    input_shape: tuple[str, ...] = ()  # "64" (one row of a one-input model) or "NAME=1x3x224x224"
    input_range: tuple[str, ...] = ()  # "NAME=LOW:HIGH" or "LOW:HIGH" for generated inputs
    input_dtype: str = "float32"  # generated inputs whose dtype the model file does not record
    out: Path = Path("dist")
    name: str | None = None
    quantize: QuantizeMode = "auto"
    calibration: Path | None = None
    calibration_method: CalibrationMethod = "minmax"
    validation: Path | None = None
    label_column: str | None = None
    max_accuracy_drop: float = 1.0
    weights: Path | None = None
    allow_pickle: bool = False
    trust: tuple[str, ...] = ()
    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 0.99
    max_channel_error: float = GateSettings.max_channel_error
    output_kind: tuple[str, ...] = ()  # "NAME=KIND"
    metric: str | None = None  # "module.py:function" scoring variants on --validation
    variant: str | None = None  # pin the variant that ships
    locked: bool = False  # reuse the decision in `lock` without timing; refuse when it holds none
    retime: bool = False  # decide again even when `lock` holds a decision for these inputs
    lock: Path | None = None  # where the decision is recorded (None: nowhere)
    batch: int = 1
    bench_time_s: float = 0.5
    max_p99_ms: float | None = None
    max_size_mb: float | None = None
    max_memory_mb: float | None = None
    arch: str | None = None  # bundle onnxruntime and numpy wheels for this architecture
    python_version: str | None = None  # the device's Python for those wheels (default: the profile's)
    # Cloud images (profiles of kind "cloud"; image=False builds only the bundle, True insists on one).
    image: bool | None = None
    base_image: tuple[str, ...] = ()  # oci:PATH[:TAG], docker-archive:PATH or REGISTRY/REPO:TAG (one per platform)
    platform: str | None = None  # "linux/amd64,linux/arm64" (default: the profile's [image] platforms)
    max_image_mb: float | None = None
    builder: str = "native"

    def __post_init__(self) -> None:
        if self.quantize not in VARIANTS_FOR_MODE:
            raise InputError(f"--quantize {self.quantize!r} is not a mode",
                             f"choose one of {', '.join(VARIANTS_FOR_MODE)}")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value < 0:
                raise InputError(f"{flag} must be >= 0, got {value}", "give a non-negative tolerance")
        if self.calibration_method not in ("minmax", "entropy", "percentile"):
            raise InputError(f"--calibration-method {self.calibration_method!r} is not a method",
                             "choose one of minmax, entropy, percentile")
        if self.max_accuracy_drop < 0:
            raise InputError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop}", "e.g. 1")
        if not 0 <= self.min_agreement <= 1:
            raise InputError(f"--min-agreement must be within 0..1, got {self.min_agreement}", "e.g. 0.99")
        if not self.max_channel_error >= 0:
            raise InputError(f"--max-channel-error must be >= 0, got {self.max_channel_error}", "e.g. 0.1")
        if self.input_dtype not in ("float32", "float64", "float16", "int64", "int32", "uint8", "bool"):
            raise InputError(f"--input-dtype {self.input_dtype!r} is not supported",
                             "use float32, float64, float16, int64, int32, uint8 or bool")
        if self.variant is not None and self.variant not in VARIANTS:
            raise InputError(f"--variant {self.variant!r} is not a variant", f"choose one of {', '.join(VARIANTS)}")
        if self.locked and self.variant is not None:
            raise InputError("--locked reuses the recorded variant and --variant pins one", "give one of them")
        if self.locked and self.retime:
            raise InputError("--locked reuses the recorded decision and --retime makes a new one", "give one of them")
        if self.locked and self.lock is None:
            raise InputError("--locked needs a lock file", "pass --lock edgepack.lock")
        if self.metric is not None and self.validation is None:
            raise InputError("--metric scores variants on --validation data, and none is given",
                             "add --validation data.npz (inputs plus whatever the metric reads)")
        if self.batch < 1 or self.bench_time_s <= 0:
            raise InputError("--batch and --bench-time must be positive", "e.g. --batch 1 --bench-time 1")
        if self.arch is not None and self.arch not in ARCHES:
            raise InputError(f"--arch {self.arch!r} is not an architecture", f"choose one of {', '.join(ARCHES)}")
        if self.python_version is not None:
            if self.arch is None and not self.builds_image():
                raise InputError("--python-version chooses the wheels of an --arch bundle, and --arch is not given",
                                 "add --arch, or drop --python-version")
            if not PYTHON_VERSION.match(self.python_version):
                raise InputError(f"--python-version {self.python_version!r} is not MAJOR.MINOR", "e.g. 3.11")
        if self.max_image_mb is not None and self.max_image_mb <= 0:
            raise InputError(f"--max-image-mb must be positive, got {self.max_image_mb}", "e.g. 400")
        if (self.base_image or self.platform or self.max_image_mb) and self.image is False:
            raise InputError("--base-image, --platform and --max-image-mb describe an image, and --no-image is given",
                             "drop --no-image, or those options")
        if self.name is not None and not _NAME.match(self.name):
            raise InputError(f"--name {self.name!r} is not a valid bundle name",
                             "use lowercase letters, digits, '.', '_' or '-' (at most 64)")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "BuildSpec":
        """A spec from `edgepack build`'s options (flags and edgepack.toml merged), by their names."""
        names = {field.name for field in fields(cls)}
        values = {key: value for key, value in options.items() if key in names}
        if options.get("model") is None:
            raise InputError("no model given", "pass MODEL, or set model under [build] in edgepack.toml")
        for key in ("trust", "base_image", "input_shape", "input_range", "output_kind"):
            given = options.get(key) or ()
            values[key] = (given,) if isinstance(given, str) else tuple(given)
        if "bench_time" in options:
            values["bench_time_s"] = options["bench_time"]
        return cls(**values)

    def builds_image(self) -> bool:
        """Whether this build writes a container image: asked for, or the target is a cloud profile."""
        if self.image is not None:
            return self.image
        from edgepack.bench.profiles import resolve_profile

        try:
            return resolve_profile(self.target).kind == "cloud"
        except InputError:
            return False  # an unknown target is reported when the build reads it

    @property
    def budgets(self) -> Budgets:
        return Budgets(self.max_p99_ms, self.max_size_mb, self.max_memory_mb)

    @property
    def bundle_name(self) -> str:
        if self.name:
            return self.name
        path = model_file(self.model)
        if path.name == "MLmodel":  # an MLflow model named by its description file: the folder names it
            path = path.parent
        if path.is_dir() and path.name == "artifacts":  # mlflow 3 logs models as models/<model id>/artifacts
            path = path.parent
        stem = re.sub(r"[^a-z0-9._-]+", "-", (path.name if path.is_dir() else path.stem).lower()).strip("-._")
        return stem[:64] or "model"
