"""The ``edgepack`` command. Each command parses, calls one core function and renders the result.

Heavy modules (onnx, skl2onnx, onnxruntime) are imported inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import typer

from edgepack import __version__
from edgepack.errors import EdgepackError, ExitCode, InputError

EXIT_CODES = (
    "Exit codes: 0 ok · 1 internal error · 2 usage error · 3 bad input · 4 conversion failed · "
    "5 parity or accuracy failed · 6 budget exceeded · 7 integrity failure · 8 not possible on this host · "
    "9 device (SSH) failure."
)

app = typer.Typer(
    name="edgepack",
    help="Take a trained model to production on cloud CPUs and edge devices: convert to ONNX, prove "
    "parity, quantize, benchmark on device profiles and package a verified bundle.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_debug = {"on": os.environ.get("EDGEPACK_DEBUG") == "1"}
F = TypeVar("F", bound=Callable[..., Any])


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _stdout():
    from rich.console import Console

    return Console(highlight=False)


def error_boundary(command: F) -> F:
    """The one place where errors become a one-line message and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except typer.BadParameter as err:  # BadParameter raised by a command body, after typer parsed
            _stderr().print(f"[bold red]error:[/] {escape(err.format_message())} (see --help)", markup=True,
                            soft_wrap=True)
            raise typer.Exit(int(ExitCode.USAGE)) from None
        except EdgepackError as err:
            if _debug["on"]:
                traceback.print_exc()
            # escape: messages carry file names and hints such as `pip install -e ".[torch]"`, which
            # rich would otherwise read as style tags and drop.
            _stderr().print(f"[bold red]error:[/] {escape(err.one_line())}", markup=True, soft_wrap=True)
            raise typer.Exit(int(err.exit_code)) from None
        except KeyboardInterrupt:
            _stderr().print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the boundary must catch everything
            if _debug["on"]:
                traceback.print_exc()
            _stderr().print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(str(err))} "
                            "(a bug in edgepack; rerun with --debug and report the traceback)",
                            markup=True, soft_wrap=True)
            raise typer.Exit(int(ExitCode.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # Set on every invocation, so one --debug run does not leak into the next in the same process.
    _debug["on"] = debug or os.environ.get("EDGEPACK_DEBUG") == "1"
    if not _debug["on"]:
        # Libraries' deprecation notices are for their developers, not for edgepack's users; user
        # warnings (a model saved by another scikit-learn version, say) still show.
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _with_project_file(ctx: typer.Context, config: Optional[Path], command: str) -> dict[str, Any]:
    """The command's options, those not typed taken from edgepack.toml (or --config FILE) when it sets them."""
    from edgepack.project_file import find_project_file, merge_options

    explicit = {name for name in ctx.params
                if (source := ctx.get_parameter_source(name)) is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}
    project = find_project_file(config)
    if project is not None and not ctx.params.get("quiet") and not ctx.params.get("json_out"):
        _stderr().print(f"[dim]options from {escape(str(project.path))}[/]", soft_wrap=True)
    return merge_options(ctx.params, explicit, project, command)  # type: ignore[arg-type]


_CONFIG_HELP = "Project file with \\[build], \\[bench] and \\[budgets] (default: ./edgepack.toml when present); flags win over it."


@app.command()
@error_boundary
def build(
    ctx: typer.Context,
    model: Optional[Path] = typer.Argument(None, show_default=False, help="Trained model: scikit-learn .skops (.pkl/.joblib with --allow-pickle), PyTorch TorchScript .pt or module.py:factory with --weights, LightGBM .txt, XGBoost .json/.ubj, .onnx, or an MLflow model folder (onnx, sklearn or pytorch flavor)."),
    weights: Optional[Path] = typer.Option(None, help="State dict for a PyTorch model given as module.py:factory."),
    target: str = typer.Option("edge", "--target", "-t", help="edge, cloud, a profile name (see `edgepack profiles`) or a .toml path."),
    sample: Optional[Path] = typer.Option(None, "--sample", "-s", help="Model inputs: .npz keyed by input name (arrays as the model takes them, or several feeds stacked on a leading axis), .npy for a one-input model, or .csv with a header. They fix the signature and drive parity, calibration and benchmarks."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="Generate inputs instead of --sample: NAME=1x3x224x224 (an input's whole shape, batch included; repeatable), or 64 / 1,8,8 (one row of a one-input model, without the batch axis)."),
    input_range: List[str] = typer.Option([], "--input-range", help="Range of generated inputs: NAME=LOW:HIGH, or LOW:HIGH for every input (integers inclusive; default: normal floats, integers 0..1)."),
    input_dtype: str = typer.Option("float32", help="Dtype of generated inputs the model file does not type (a TorchScript model)."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="Folder for the bundle and its benchmark report."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: the model file's name)."),
    quantize: str = typer.Option("auto", "--quantize", "-q", help="none | int8-dynamic | int8-static | fp16 | auto (every variant; keep the fastest accurate one)."),
    calibration: Optional[Path] = typer.Option(None, help="Rows (.npy/.csv) for static int8 calibration (default: the sample)."),
    calibration_method: str = typer.Option("minmax", help="Static int8 calibration: minmax | entropy | percentile."),
    validation: Optional[Path] = typer.Option(None, help="Labelled rows for the accuracy gate: .npz with X and y, or .csv with a label column."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a CSV validation file (default: the last)."),
    max_accuracy_drop: float = typer.Option(1.0, help="Reject variants losing more than this: accuracy points (classifiers) or % RMSE (regressors)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle/joblib files. Unpickling runs code: only for files you trust."),
    trust: List[str] = typer.Option([], "--trust", help="A type skops should load though it is not trusted by default (repeatable)."),
    atol: float = typer.Option(1e-4, help="Parity: absolute tolerance of ONNX against the original."),
    rtol: float = typer.Option(1e-3, help="Parity: relative tolerance of ONNX against the original."),
    min_agreement: float = typer.Option(0.99, help="Gate: least share of labels, argmax positions or mask pixels agreeing with fp32, and least mean cosine of embeddings."),
    max_channel_error: float = typer.Option(0.1, help="Gate for scores, boxes, regression, state and unknown outputs: largest RMSE of any channel over that channel's spread in fp32."),
    output_kind: List[str] = typer.Option([], "--output-kind", help="What an output is, NAME=KIND (repeatable): label, probabilities, logits, scores, boxes, embedding, regression, sequence, mask, state or unknown; it picks the gate."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Score variants on --validation with your task metric: module.py:function(outputs, targets) -> float, higher is better (mAP, 1-WER...)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Ship this variant (it must pass the gate), without timing the others."),
    locked: bool = typer.Option(False, "--locked", help="Reuse the variant recorded in the lock file, without timing, and fail if it holds none for these inputs (for CI): a byte-identical bundle. Without it, a decision recorded for these very inputs is reused too."),
    retime: bool = typer.Option(False, "--retime", help="Time the variants and decide again, even when the lock file holds a decision for these inputs."),
    lock: Optional[Path] = typer.Option(Path("edgepack.lock"), "--lock", help="Where the variant decision is recorded, and read with --locked."),
    no_lock: bool = typer.Option(False, "--no-lock", help="Record the decision nowhere."),
    batch: int = typer.Option(1, help="Batch size for benchmarks."),
    bench_time: float = typer.Option(0.5, help="Timed seconds per variant in the first 6 alternating rounds (more rounds follow while a variant's speed is inconclusive)."),
    max_p99_ms: Optional[float] = typer.Option(None, help="Fail (exit 6) when the chosen variant's p99 is above this."),
    max_size_mb: Optional[float] = typer.Option(None, help="Fail (exit 6) when the bundle is larger than this."),
    max_memory_mb: Optional[float] = typer.Option(None, help="Fail (exit 6) when the chosen variant's peak memory is above this."),
    arch: Optional[str] = typer.Option(None, "--arch", help="x86_64 | aarch64: also bundle onnxruntime and numpy wheels for this architecture (the target profile's), so the device needs only python3."),
    python_version: Optional[str] = typer.Option(None, "--python-version", help="The device's Python for the --arch wheels, e.g. 3.11 (default: the profile's python, else 3.11); for cloud images, the base's Python the deps are installed for (default: found in the base)."),
    image: Optional[bool] = typer.Option(None, "--image/--no-image", help="Write a container image besides the bundle (default: for cloud profiles)."),
    base_image: List[str] = typer.Option([], "--base-image", help="Base of the cloud image: oci:PATH[:TAG], docker-archive:PATH or REGISTRY/REPO:TAG (default: the profile's [image] base); repeat for one base per platform."),
    platform: Optional[str] = typer.Option(None, "--platform", help="Image platforms, e.g. linux/amd64,linux/arm64 (several: an image index; default: the profile's [image] platforms)."),
    max_image_mb: Optional[float] = typer.Option(None, "--max-image-mb", help="Fail (exit 6) before writing anything when the image (compressed, per platform) is larger than this."),
    builder: str = typer.Option("native", "--builder", help="native (edgepack writes the image, no engine needed) | docker | podman (also build the written Dockerfile in that engine)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML page (self-contained, offline) with every timed variant's latency distribution."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress on stderr."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Convert, check parity, quantize, benchmark and package MODEL into a verified bundle (and, for cloud profiles, an OCI image).

    Examples:

      edgepack build examples/digits_mlp.skops --sample examples/digits_sample.npy --validation examples/digits_validation.npz

      edgepack build model.onnx --sample inputs.npz --output-kind boxes=boxes --metric map.py:mean_ap --validation val.npz

      edgepack build model.onnx --input-shape audio=1x512 --input-shape state=2x1x128 --input-range sr=16000:16000

      edgepack build mlruns/0/models/m-1234/artifacts --target cloud

      edgepack build model.onnx --locked   # in CI: the variant recorded in edgepack.lock, untimed
    """
    from edgepack.pipeline import build as run_build
    from edgepack.render import ProgressReporter, render_build
    from edgepack.spec import BuildSpec

    options = _with_project_file(ctx, config, "build")
    if options["model"] is None:
        raise typer.BadParameter("missing MODEL: pass a model file, or set model under [build] in edgepack.toml")
    if options.get("no_lock"):
        if options.get("locked"):
            raise typer.BadParameter("--locked reads the lock file and --no-lock says there is none")
        options["lock"] = None
    spec = BuildSpec.from_options(options)
    with ProgressReporter(_stderr(), enabled=not quiet) as reporter:
        result = run_build(spec, reporter, debug=_debug["on"])
    if report is not None:
        _write_report(report, [row.bench for row in result.variants if row.bench],
                      f"edgepack build: {result.manifest.name} {result.manifest.version}, variants on {result.profile.name}")
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render_build(_stdout(), result)


@app.command()
@error_boundary
def quantize(
    model: Path = typer.Argument(..., help="An ONNX model file."),
    sample: Optional[Path] = typer.Option(None, "--sample", "-s", help="Model inputs: .npz keyed by input name, .npy for one input, or .csv."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="Generate inputs: NAME=1x3x224x224 (batch included; repeatable)."),
    input_range: List[str] = typer.Option([], "--input-range", help="Range of generated inputs: NAME=LOW:HIGH."),
    target: str = typer.Option("edge", "--target", "-t", help="Profile to time the variants on (see `edgepack profiles`)."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="Folder for the chosen model and its comparison table."),
    mode: str = typer.Option("auto", "--quantize", "-q", help="none | int8-dynamic | int8-static | fp16 | auto."),
    calibration: Optional[Path] = typer.Option(None, help="Rows for static int8 calibration (default: the sample)."),
    calibration_method: str = typer.Option("minmax", help="minmax | entropy | percentile."),
    validation: Optional[Path] = typer.Option(None, help="Labelled rows: .npz with X and y, or .csv with a label column."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a CSV validation file (default: the last)."),
    max_accuracy_drop: float = typer.Option(1.0, help="Accuracy points (classifiers) or % RMSE (regressors) a variant may lose."),
    min_agreement: float = typer.Option(0.99, help="Gate: least share agreeing with fp32 (labels, argmax, masks; mean cosine)."),
    max_channel_error: float = typer.Option(0.1, help="Gate: largest per-channel RMSE over the channel's spread."),
    output_kind: List[str] = typer.Option([], "--output-kind", help="NAME=KIND (repeatable): picks the output's gate."),
    metric: Optional[str] = typer.Option(None, "--metric", help="module.py:function(outputs, targets) -> float, on --validation."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Write this variant (it must pass the gate), untimed."),
    bench_time: float = typer.Option(0.5, help="Timed seconds per variant in the first 6 alternating rounds."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress on stderr."),
) -> None:
    """Run the quantize stage alone on an ONNX model: write the fastest accurate variant and the table."""
    from edgepack.pipeline import quantize_only
    from edgepack.render import ProgressReporter, render_variants
    from edgepack.spec import BuildSpec

    spec = BuildSpec(model=model, target=target, sample=sample, input_shape=tuple(input_shape),
                     input_range=tuple(input_range), out=out, quantize=mode, calibration=calibration,  # type: ignore[arg-type]
                     calibration_method=calibration_method, validation=validation,  # type: ignore[arg-type]
                     label_column=label_column, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement,
                     max_channel_error=max_channel_error, output_kind=tuple(output_kind), metric=metric,
                     variant=variant, bench_time_s=bench_time)
    with ProgressReporter(_stderr(), enabled=not quiet) as reporter:
        result = quantize_only(spec, reporter)
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        console = _stdout()
        render_variants(console, result.selection.rows, result.profile.name, result.selection.metric_basis)
        console.print(f"Chosen: [bold]{result.selection.chosen.name}[/] → {escape(str(result.model))}; "
                      f"table in {escape(str(result.report))}",
                      soft_wrap=True)


@app.command()
@error_boundary
def verify(
    bundle: Path = typer.Argument(..., help="A bundle .tar.gz."),
    max_unpacked_mb: Optional[float] = typer.Option(None, "--max-unpacked-mb", help="Let the bundle unpack to this many MiB (default: 64x its size or 64 MiB; env EDGEPACK_MAX_UNPACKED_MB)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every checksum, the manifest and the archive's safety, in one bounded stream; exit 0 only when intact."""
    from edgepack.verify import verify_bundle

    result = verify_bundle(bundle, max_unpacked_mb)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        _stdout().print(f"[green]✓ intact[/]: {result['name']} {result['version']} ({result['variant']}, "
                        f"for {result['profile']}), {result['files']} files verified, sha256 {result['sha256']}")


def _sizes(text: str, flag: str) -> tuple[int, ...]:
    from edgepack.runtime.bench import parse_sizes

    try:
        return tuple(parse_sizes(text, flag))
    except InputError as err:  # a flag's value: a usage error here, before any bundle is opened
        raise typer.BadParameter(str(err)) from None


@app.command()
@error_boundary
def bench(
    ctx: typer.Context,
    bundle: Optional[Path] = typer.Argument(None, help="A bundle .tar.gz (not needed with --compare)."),
    profile: str = typer.Option("edge-1core", "--profile", "-p", help="Device profile to emulate here (see `edgepack profiles`)."),
    batch: str = typer.Option("1", help="Batch size, or several to sweep: 1,8,32."),
    concurrency: str = typer.Option("1", help="Requests in flight at once on one session (threads), or several: 1,4,16."),
    processes: int = typer.Option(5, help="Fresh processes per configuration; the p50 interval is taken between them (1: faster, but blind to run-to-run noise)."),
    bench_time: float = typer.Option(2.0, help="Seconds of timed runs per configuration, split among the processes."),
    ssh: Optional[str] = typer.Option(None, "--ssh", metavar="USER@HOST[:PORT]", help="Also benchmark on this device over SSH (needs python3, numpy and onnxruntime there) and compare."),
    identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="Private key for --ssh (default: your ssh keys and agent)."),
    remote_python: str = typer.Option("python3", help="Python on the --ssh device."),
    max_p99_ms: Optional[float] = typer.Option(None, help="Fail (exit 6) after the report when p99 is above this."),
    max_memory_mb: Optional[float] = typer.Option(None, help="Fail (exit 6) after the report when peak memory is above this."),
    compare: Optional[Tuple[Path, Path]] = typer.Option(None, "--compare", metavar="OLD.json NEW.json", help="Compare two saved `bench --json` reports instead: change per metric with its noise interval; exit 6 on a regression beyond it."),
    min_change: float = typer.Option(0.02, help="With --compare: changes smaller than this share are never flagged, even beyond the noise."),
    gate: str = typer.Option("p50_ms,peak_rss_mb", help="With --compare: metrics whose regression fails the comparison (others are shown only)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML page (self-contained, offline): latency distributions, comparison table, environment."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (a sweep: {results: [...]}; with --ssh: {device, emulated})."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Benchmark a verified bundle on a device profile, with the profile's limits applied; --ssh adds the real device."""
    options = _with_project_file(ctx, config, "bench")
    profile, batch, concurrency, processes, bench_time, max_p99_ms, max_memory_mb = (
        options[key] for key in ("profile", "batch", "concurrency", "processes", "bench_time", "max_p99_ms",
                                 "max_memory_mb"))
    if compare is not None:
        _compare_reports(compare, bundle, min_change, tuple(m.strip() for m in gate.split(",") if m.strip()), json_out)
        return
    from edgepack.bench.profiles import resolve_profile
    from edgepack.bench.runner import BenchSettings, bench_bundle, results
    from edgepack.budgets import Budgets, check_bench
    from edgepack.render import render_bench, render_device_bench

    if bundle is None:
        raise typer.BadParameter("give a bundle .tar.gz to benchmark (or --compare OLD.json NEW.json)")
    if bench_time <= 0 or processes < 1:
        raise typer.BadParameter("--bench-time and --processes must be positive")
    if identity is not None and ssh is None:
        raise typer.BadParameter("--identity needs --ssh USER@HOST")
    settings = BenchSettings.timed(bench_time, batches=_sizes(batch, "--batch"),
                                   concurrency=_sizes(concurrency, "--concurrency"), processes=processes)
    target = resolve_profile(profile)
    budgets = Budgets(max_p99_ms=max_p99_ms, max_memory_mb=max_memory_mb).merged_with(target)
    if ssh is not None:
        from edgepack.bench.remote import RemoteSettings, SshTarget, compare_on_device

        comparison = compare_on_device(bundle, SshTarget.parse(ssh, identity), target, settings,
                                       RemoteSettings(python=remote_python))
        if report is not None:
            _write_report(report, results(comparison.device) + (results(comparison.emulated) if comparison.emulated
                                                                 else []), f"edgepack bench: {bundle.name}")
        if json_out:
            print(json.dumps(comparison.to_json(), indent=2))
        else:
            render_device_bench(_stdout(), comparison)
        check_bench(comparison.device, budgets, target)  # the device's figures are the ones that count
        return
    measured = bench_bundle(bundle, target, settings)
    if report is not None:
        _write_report(report, results(measured), f"edgepack bench: {bundle.name} on {target.name}")
    if json_out:
        print(json.dumps(measured, indent=2))
    else:
        render_bench(_stdout(), results(measured))
    check_bench(measured, budgets, target)


def _write_report(path: Path, reports: list[dict[str, Any]], title: str) -> None:
    from edgepack.bench.report_html import write_html_report

    try:
        write_html_report(path, reports, title)
    except OSError as err:
        raise InputError(f"{path}: cannot write the report ({err.strerror})", "choose a writable --report path") from None
    _stderr().print(f"[dim]HTML report: {escape(str(path))}[/]", soft_wrap=True)


def _compare_reports(files: Tuple[Path, Path], bundle: Optional[Path], min_change: float, gate: tuple[str, ...],
                     json_out: bool) -> None:
    from edgepack.bench.compare import compare_files, fail_on_regressions
    from edgepack.render import render_comparison

    if bundle is not None:
        raise typer.BadParameter("--compare takes two saved reports, not a bundle")
    if not 0 <= min_change < 1:
        raise typer.BadParameter("--min-change must be within 0..1, e.g. 0.02")
    comparison = compare_files(*files, min_change=min_change, gate=gate)
    if json_out:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        render_comparison(_stdout(), comparison)
    fail_on_regressions(comparison)


@app.command()
@error_boundary
def profiles(json_out: bool = typer.Option(False, "--json", help="Print the profiles as JSON.")) -> None:
    """List the device profiles in targets/ and what this host enforces for each."""
    from edgepack.bench.profiles import all_profiles
    from edgepack.render import render_profiles

    found = all_profiles()
    if json_out:
        print(json.dumps([{**p.model_dump(mode="json"), "here": p.emulation_summary()} for p in found], indent=2))
    else:
        render_profiles(_stdout(), found)


@app.command()
@error_boundary
def push(
    image: Path = typer.Argument(..., help="An OCI layout folder (NAME-VERSION.oci) or a docker-archive tar (NAME-VERSION.image.tar)."),
    ref: str = typer.Argument(..., help="Where to: REGISTRY/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/models/digits:v1 (default tag: the image's)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain http (the default only for localhost and 127.0.0.1)."),
    username: Optional[str] = typer.Option(None, "--username", "-u", help="Registry user (default: ~/.docker/config.json's auths, else anonymous)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from standard input."),
    with_skopeo: bool = typer.Option(False, "--with-skopeo", help="Copy with `skopeo copy` instead of edgepack's own client."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for each answer of the registry."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Push an image edgepack built to a registry (HTTP API v2): blobs it lacks, then manifests; prints the digest."""
    from edgepack.package.push import PushOptions, push_image

    if password_stdin and username is None:
        raise typer.BadParameter("--password-stdin needs --username")
    password = sys.stdin.read().rstrip("\n") if password_stdin else None
    options = PushOptions(insecure=insecure, credentials=(username, password or "") if username else None,
                          with_skopeo=with_skopeo, timeout_s=timeout)
    pushed = push_image(image, ref, options)
    if json_out:
        print(json.dumps(pushed, indent=2))
    else:
        print(pushed["digest"])
        _stderr().print(f"[green]✓ pushed[/] {escape(pushed['ref'])}@{pushed['digest']} "
                        f"({pushed['uploaded']} blob(s) uploaded, {pushed['skipped']} already there)", soft_wrap=True)


from edgepack.commands.serving import register as _register_serving  # noqa: E402 - needs app and error_boundary

_register_serving(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
