"""The `telemetry` scenario: what OTLP metrics and spans cost the request path.

Listed in bench/cli.py; writes bench/results/telemetry/ like every scenario.
"""

from __future__ import annotations

from bench.harness import ScenarioRun
from bench.stats import spread
from bench.steps import check_outcomes, interleaved, pod_workloads, ratio_headline, scenario, single_config, workdir
from tests.support.otlp_receiver import start_grpc
from tests.support.server import free_port

OFF = "telemetry off"
METRICS = "metrics to a collector"
ON = "metrics + spans to a collector"
ABSENT = "metrics + spans, no collector"


def telemetry_env(endpoint: str, spans: bool = True) -> dict[str, str]:
    # The SDK's default interval, 60 s, would fall outside a 4 s load point: metrics every second here.
    return {"KUBEWARDEN_ENABLE_METRICS": "true", "KUBEWARDEN_LOG_FMT": "otlp" if spans else "text",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000"}


@scenario("telemetry", "the request-path cost of OpenTelemetry",
          "kwserver serves `/validate/pod-privileged` (the 5.3 KB rejected Pod) over plain HTTP four ways, "
          "interleaved repeat by repeat: without telemetry; with `--enable-metrics` alone; with "
          "`--enable-metrics` and `--log-fmt otlp` exporting over OTLP/gRPC to a local receiver "
          "(tests/support/otlp_receiver.py, the collector's Export services, in the harness process) every second "
          "(metrics, from the master) and in batches (spans, one per request, relayed by the workers to the "
          "master, whose BatchSpanProcessor thread sends them); and the same with no collector listening. "
          "Requests/s and server CPU per request as ratios to the server without telemetry.")
def telemetry(run: ScenarioRun) -> None:
    o = run.options
    config = single_config(run)
    _, reject = pod_workloads(workdir(run, "telemetry"))
    receiver = start_grpc()
    try:
        servers = {
            OFF: run.kwserver("kwserver-off", config),
            METRICS: run.kwserver("kwserver-otlp-metrics", config, env=telemetry_env(receiver.endpoint, spans=False)),
            ON: run.kwserver("kwserver-otlp", config, env=telemetry_env(receiver.endpoint)),
            ABSENT: run.kwserver("kwserver-otlp-absent", config,
                                 env=telemetry_env(f"http://127.0.0.1:{free_port()}")),
        }
        for server in servers.values():
            check_outcomes(run, server, reject, "reject")
            run.warmup(server, reject)
        series = "http"
        run.data["baselines"] = {series: OFF}
        interleaved(run, [(server, reject, label, series) for label, server in servers.items()], o.repeats)
        for server in servers.values():
            run.stop(server)
    finally:
        receiver.stop()
    spans = len(receiver.received.spans())
    run.data["received"] = {"metric_exports": len(receiver.received.metrics), "spans": spans}
    served = sum(p.requests for p in run.select(series=series, label=ON))
    for label in (METRICS, ON, ABSENT):
        ratio_headline(run, f"telemetry: {label} / off", series, label, OFF)
    run.notes.append(f"The receiver got {len(receiver.received.metrics)} metric exports and {spans} spans "
                     f"({served} requests in the measured points of `{ON}`, plus its preflight and warm-up).")
    run.notes.append("Where the CPU goes, server CPU ms per request split into the workers (the request path) and "
                     "the master (metrics push, span export), medians over the repeats: " + "; ".join(
                         f"{label}: workers {workers:.3f}, master {master:.3f}"
                         for label, (workers, master) in cpu_split(run, series).items()) + ".")


def cpu_split(run: ScenarioRun, series: str) -> dict[str, tuple[float, float]]:
    """Per variant: the median CPU ms per request of the workers and of the master."""
    split = {}
    for label in (OFF, METRICS, ON, ABSENT):
        points = [p for p in run.select(series=series, label=label) if p.requests]
        master = [1000 * p.extra["master_cpu_s"] / p.requests for p in points]
        workers = [1000 * (p.server_cpu_s - p.extra["master_cpu_s"]) / p.requests for p in points]
        split[label] = (spread(workers).median, spread(master).median)
    run.data["cpu_split_ms_per_request"] = {label: {"workers": w, "master": m} for label, (w, m) in split.items()}
    return split
