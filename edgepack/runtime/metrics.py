"""Prometheus metrics of the server, in the text exposition format (version 0.0.4), without a client library.

Every update happens on the event loop's thread, so nothing here needs a lock. The shadow series
are counted by the shadow worker's process; ``collectors`` copy them in when /metrics is scraped.
Label values come
from a closed set (model names the registry knows, endpoint names, status codes), never from raw
request paths, so a scanner probing random URLs cannot grow the series without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 50 µs (a tiny model's run) to 5 s, about three per decade.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0, 2.5, 5.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]) -> None:
        self.name, self.help, self.label_names = name, help_text, label_names
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.label_names, key)} {_number(value)}" for key, value in sorted(self.values.items())]
        return out


class Gauge(Counter):
    def dec(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) - amount  # not through inc(): once per request

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def lines(self) -> list[str]:
        out = super().lines()
        out[1] = f"# TYPE {self.name} gauge"
        return out


class Histogram:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...],
                 buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, label_names, buckets
        self.series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts (last: above all), then sum

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, value)] += 1  # bucket i counts values <= buckets[i]
        series[-1] += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, series in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), series):
                running += count
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound!r}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {int(running)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {repr(float(series[-1]))}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {int(running)}")
        return out


class ServerMetrics:
    def __init__(self) -> None:
        self.requests = Counter("edgepack_requests_total", "HTTP requests answered, by model, endpoint and status code.",
                                ("model", "endpoint", "code"))
        self.latency = Histogram("edgepack_request_duration_seconds",
                                 "Answered inference requests (infer, predict, status 200), from routing to the "
                                 "answer handed to the HTTP server, in seconds.", ("model", "endpoint"))
        self.run = Histogram("edgepack_model_run_duration_seconds",
                             "onnxruntime session.run alone, per model version, in seconds.", ("model", "version"))
        self.in_flight = Gauge("edgepack_requests_in_flight", "HTTP requests being handled now.", ())
        self.in_flight.set(0)
        self.ready = Gauge("edgepack_model_ready", "1 once the model's session exists and a warm-up ran.",
                           ("model", "version"))
        # Shadow mode (model: the primary's name; version: the candidate's).
        self.shadow_requests = Counter("edgepack_shadow_requests_total",
                                       "Requests the shadow candidate ran (or failed on).", ("model", "version"))
        self.shadow_dropped = Counter("edgepack_shadow_dropped_total",
                                      "Shadow runs dropped because the shadow queue was full.", ("model", "version"))
        self.shadow_errors = Counter("edgepack_shadow_errors_total",
                                     "Shadow runs where the candidate failed (the primary answered anyway).",
                                     ("model", "version"))
        self.shadow_agreement = Counter("edgepack_shadow_agreement_total",
                                        "Rows whose labels the candidate agreed or disagreed on with the primary.",
                                        ("model", "version", "result"))
        self.shadow_latency = Histogram("edgepack_shadow_run_duration_seconds",
                                        "The shadow candidate's session.run, in seconds.", ("model", "version"))
        self.shadow = False
        # Phased rollout (model: the served name; variant: primary or candidate).
        self.rollout_requests = Counter("edgepack_rollout_requests_total",
                                        "Inference requests routed to each variant, by outcome (error: the candidate "
                                        "failed and the primary answered).", ("model", "variant", "outcome"))
        self.rollout_agreement = Counter("edgepack_rollout_agreement_total",
                                         "Rows of candidate answers the primary also ran, agreeing or not.",
                                         ("model", "result"))
        self.rollout_decisions = Counter("edgepack_rollout_decisions_total",
                                         "Rollout decisions: promote, rollback (gates), operator_promote, "
                                         "operator_rollback.", ("model", "event"))
        self.rollout_step = Gauge("edgepack_rollout_step", "The rollout's current step, from 1.", ("model",))
        self.rollout_weight = Gauge("edgepack_rollout_weight_percent",
                                    "Percent of requests the candidate answers now.", ("model",))
        self.rollout_state = Gauge("edgepack_rollout_state", "1 for the rollout's current state.", ("model", "state"))
        self.phased = False
        # Prediction logs (log: the file's name, predictions.jsonl or the shadow worker's shadow.jsonl).
        self.log_healthy = Gauge("edgepack_prediction_log_healthy",
                                 "1 while the prediction log is written, 0 while it cannot be (its lines are "
                                 "dropped; answers go on).", ("log",))
        self.log_dropped = Counter("edgepack_prediction_log_dropped_lines_total",
                                   "Log lines dropped because the prediction log could not be written.", ("log",))
        self.log_errors = Counter("edgepack_prediction_log_errors_total",
                                  "Failed attempts to write, rotate or reopen the prediction log (retried with "
                                  "backoff, not once per request).", ("log",))
        self.collectors: list[Callable[[], None]] = []  # called before each exposition, on the loop

    def watch_log(self, log: Any) -> None:
        """Expose a ``prediction_log.PredictionLog``'s health, copied in when /metrics is scraped."""
        self.record_log(log.name, log.healthy, log.dropped, log.errors)
        self.collectors.append(lambda: self.record_log(log.name, log.healthy, log.dropped, log.errors))

    def record_log(self, name: str, healthy: bool, dropped: float, errors: float) -> None:
        self.log_healthy.set(1 if healthy else 0, name)
        self.log_dropped.values[(name,)] = dropped
        self.log_errors.values[(name,)] = errors

    def exposition(self) -> bytes:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        shadow = (self.shadow_requests, self.shadow_dropped, self.shadow_errors, self.shadow_agreement,
                  self.shadow_latency) if self.shadow else ()
        phased = (self.rollout_requests, self.rollout_agreement, self.rollout_decisions, self.rollout_step,
                  self.rollout_weight, self.rollout_state) if self.phased else ()
        logs = (self.log_healthy, self.log_dropped, self.log_errors) if self.log_healthy.values else ()
        for metric in (self.requests, self.latency, self.run, self.in_flight, self.ready, *logs, *shadow, *phased):
            lines += metric.lines()
        return ("\n".join(lines) + "\n").encode()
