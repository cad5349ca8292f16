"""``edgepack serve`` and ``edgepack rollout``: parse, call the runtime or the rollout module, render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

ROLLOUT_HELP = "Shadow and phased rollouts: see and steer a phased rollout, summarise what the server logged."


def register(app: typer.Typer) -> None:
    from edgepack import __version__
    from edgepack.cli import error_boundary

    @app.command()
    @error_boundary
    def serve(
        bundle: Path = typer.Argument(..., help="A bundle .tar.gz (verified, then unpacked to a temporary folder) or an unpacked bundle folder."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8080, help="Port to listen on (0: any free port; the log line says which)."),
        max_body_mb: float = typer.Option(32.0, help="Refuse request bodies larger than this with 413 (32 MiB takes one 640x640x3 float32 image as v2 JSON; binary tensors take ~5x less)."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN and infinity in float inputs (refused with 400 by default)."),
        access_log: bool = typer.Option(False, "--access-log", help="Log one line per request to stderr."),
        inference: str = typer.Option("auto", help="Where session.run runs: loop (the event loop), thread, or auto (the loop for runs expected under 1 ms with one worker thread, 0.2 ms with several)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Requests ready at the same time that share one session.run on the event loop, each getting its own rows back (1: each runs alone). Used only for models whose rows are independent (checked at load)."),
        threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads (default: the bundle's target profile's)."),
        header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a request's headers may take from its first byte; then 408 and the connection closes.", rich_help_panel="Connections"),
        body_timeout: float = typer.Option(60.0, "--body-timeout", help="Seconds a request's body may take after its headers (60: 32 MiB at 0.55 MiB/s); then 408 and the connection closes.", rich_help_panel="Connections"),
        keep_alive_timeout: float = typer.Option(75.0, "--keep-alive-timeout", help="Seconds a connection stays open with no request in progress (75: longer than load balancers' 60, which close first).", rich_help_panel="Connections"),
        body_memory_mb: Optional[float] = typer.Option(None, "--body-memory-mb", help="Request bodies over 1 MiB are read and decoded at once while their sizes add up to at most this; others wait, unread, in the client's socket (default: --max-body-mb).", rich_help_panel="Connections"),
        max_connections: Optional[int] = typer.Option(None, "--max-connections", help="Connections open at most; past it the one idle longest is closed, or the new one gets 503 when all are busy (default: the file-descriptor limit, ulimit -n, less 64 for the server's own files).", rich_help_panel="Connections"),
        log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Write the prediction log (JSON lines, one per request, flushed before the answer) into this folder."),
        log_sample_rate: float = typer.Option(0.01, "--log-sample-rate", help="Share of requests whose inputs are logged in full (failed runs always are; others get a sha256)."),
        log_max_mb: float = typer.Option(64.0, "--log-max-mb", help="Rotate the prediction log past this size."),
        log_keep: int = typer.Option(5, "--log-keep", help="Prediction log files kept, the current one included."),
        shadow: Optional[Path] = typer.Option(None, "--shadow", help="A candidate bundle (.tar.gz or folder) that runs every request off the request's path; compared in the log and /metrics, never answering."),
        shadow_queue: int = typer.Option(64, "--shadow-queue", help="Shadow runs waiting at most; past it they are dropped and counted, never delaying the answer."),
        phased: Optional[Path] = typer.Option(None, "--phased", help="A candidate bundle (.tar.gz or folder) that answers a growing share of requests, step by step, promoted when its gates pass and rolled back to 0% when one fails.", rich_help_panel="Phased rollout"),
        rollout_spec: Optional[Path] = typer.Option(None, "--rollout-spec", help="Steps and gates from a JSON or TOML file (keys: steps, min_samples, step_duration_s, key_header, agreement_sample, agreement_tolerance, [gates] max_error_rate, max_p99_ms, min_agreement); flags typed here win.", rich_help_panel="Phased rollout"),
        steps: Optional[str] = typer.Option(None, "--steps", help="Percent of requests the candidate answers at each step (default: 10,50,100).", rich_help_panel="Phased rollout"),
        min_samples: Optional[int] = typer.Option(None, "--min-samples", help="Candidate requests a step needs before it may pass (default: 500).", rich_help_panel="Phased rollout"),
        step_duration: Optional[float] = typer.Option(None, "--step-duration", help="Seconds a step lasts at least (default: 60).", rich_help_panel="Phased rollout"),
        max_error_rate: Optional[float] = typer.Option(None, "--max-error-rate", help="Gate: share of candidate requests that may fail (the primary answers those) (default: 0.01).", rich_help_panel="Phased rollout"),
        max_p99_ms: Optional[float] = typer.Option(None, "--max-p99-ms", help="Gate: the candidate's p99 latency in ms (at most 1% of its requests above) (default: none).", rich_help_panel="Phased rollout"),
        min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Gate: share of rows whose answer agrees with the primary's (labels, or floats within 1e-3) (default: none).", rich_help_panel="Phased rollout"),
        agreement_sample: Optional[float] = typer.Option(None, "--agreement-sample", help="Share of candidate requests the primary also runs, off the request's path, to measure agreement (default: 0.25).", rich_help_panel="Phased rollout"),
        key_header: Optional[str] = typer.Option(None, "--key-header", help="Sticky assignment: requests with the same value of this header get the same model; without it, the same input does (default: x-rollout-key).", rich_help_panel="Phased rollout"),
        state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the rollout's step, counts and decisions are kept (atomically) so a restart resumes them; needed by --phased.", rich_help_panel="Phased rollout"),
        admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="EDGEPACK_ADMIN_TOKEN", help="Require this bearer token on /admin endpoints; without one they answer clients on this host only.", rich_help_panel="Phased rollout"),
    ) -> None:
        """Serve a bundle's model over HTTP until Ctrl-C: KServe v2 at /v2, plain JSON at /predict, Prometheus at /metrics; with --shadow or --phased, a candidate beside it."""
        from edgepack.runtime.rollout_state import spec_from
        from edgepack.runtime.server import ServeSettings, serve_path

        if inference not in ("auto", "loop", "thread"):
            raise typer.BadParameter(f"--inference {inference!r}: expected auto, loop or thread")
        rollout = None
        if phased is not None:
            rollout = spec_from(rollout_spec, steps, min_samples, step_duration, max_error_rate, max_p99_ms,
                                min_agreement, agreement_sample, key_header)
        elif rollout_spec or steps or state_dir:
            raise typer.BadParameter("--rollout-spec, --steps and --state-dir go with --phased CANDIDATE")
        settings = ServeSettings(
            host=host, port=port, max_body_mb=max_body_mb, allow_nonfinite=allow_nonfinite, access_log=access_log,
            placement=inference, threads=threads, log_dir=log_dir, log_sample_rate=log_sample_rate,
            log_max_mb=log_max_mb, log_keep=log_keep, shadow=shadow, shadow_queue=shadow_queue, phased=phased,
            rollout=rollout, state_dir=state_dir, admin_token=admin_token, max_batch=max_batch,
            header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_s=keep_alive_timeout,
            max_connections=max_connections, body_memory_mb=body_memory_mb)
        serve_path(bundle, settings, server_version=__version__)

    rollout_app = typer.Typer(help=ROLLOUT_HELP, no_args_is_help=True)
    app.add_typer(rollout_app, name="rollout")

    url_option = typer.Option(None, "--url", help="The server (default: http://127.0.0.1:8080).")
    state_option = typer.Option(None, "--state-dir", help="The server's --state-dir: used directly when the server is down (its lock is free).")
    token_option = typer.Option(None, "--token", envvar="EDGEPACK_ADMIN_TOKEN", help="The server's --admin-token, if it has one.")
    json_option = typer.Option(False, "--json", help="Print the status as JSON (mode, state, step, weight, gates, figures, history).")

    def _steer(action: str, url: Optional[str], state_dir: Optional[Path], token: Optional[str], reason: str,
               json_out: bool) -> None:
        from edgepack.rollout_admin import render_status, rollout_command

        status = rollout_command(action, url, state_dir, token, reason)
        print(json.dumps(status, indent=2) if json_out else render_status(status))

    @rollout_app.command("status")
    @error_boundary
    def rollout_status(url: Optional[str] = url_option, state_dir: Optional[Path] = state_option,
                       token: Optional[str] = token_option, json_out: bool = json_option) -> None:
        """Where a phased rollout stands: state, step, weight, each gate's figure, recent decisions."""
        _steer("status", url, state_dir, token, "", json_out)

    def move_command(action: str, summary: str) -> None:
        """``rollout promote`` and ``rollout rollback``: the same options, another move."""

        def move(url: Optional[str] = url_option, state_dir: Optional[Path] = state_option,
                 token: Optional[str] = token_option,
                 reason: str = typer.Option("", "--reason", help="Why, for the rollout's history."),
                 json_out: bool = json_option) -> None:
            _steer(action, url, state_dir, token, reason, json_out)

        move.__doc__ = summary
        rollout_app.command(action)(error_boundary(move))

    move_command("promote", "Move to the next step now, gates or not (after a rollback: retry the step that failed).")
    move_command("rollback", "Send every request to the primary now; `promote` resumes the rollout at the same step.")

    @rollout_app.command("report")
    @error_boundary
    def rollout_report(
        log_dir: Path = typer.Option(..., "--log-dir", help="The folder `edgepack serve --log-dir` wrote (every rotated part is read)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Summarise a shadow or phased run from the prediction log: agreement with a 95% interval, output
        differences, latencies, errors, drops; for phased runs also each variant's share and the decisions."""
        from edgepack.rollout import render_report, report

        summary = report(log_dir)
        if json_out:
            print(json.dumps(summary.to_json(), indent=2))
        else:
            print(render_report(summary))

