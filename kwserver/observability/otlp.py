"""OpenTelemetry export over OTLP: what metrics (`--enable-metrics`) and spans (`--log-fmt otlp`) share.

The collector is configured with the standard `OTEL_*` variables, read by the official exporters
themselves: `OTEL_EXPORTER_OTLP_ENDPOINT` (and its `_METRICS_` / `_TRACES_` forms), `_HEADERS`,
`_TIMEOUT`, `_COMPRESSION`, `_INSECURE`, and TLS with `_CERTIFICATE`, `_CLIENT_CERTIFICATE` and
`_CLIENT_KEY` (the files the Kubewarden controller mounts). The protocol is kwserver's choice of
exporter: `OTEL_EXPORTER_OTLP_PROTOCOL` (or its per-signal form), `grpc` as in the reference, or
`http/protobuf`.

opentelemetry is imported only by these modules, and only when a signal is on, so a server without
telemetry never loads it.
"""

from __future__ import annotations

import os
from typing import Any

from kwserver.config import ConfigError

SERVICE_NAME = "kubewarden-policy-server"
GRPC = "grpc"
HTTP_PROTOBUF = "http/protobuf"
PROTOCOLS = (GRPC, HTTP_PROTOBUF)
INSTALL_HINT = "pip install 'kwserver[otel]'"


def protocol(signal: str) -> str:
    """The OTLP protocol of one signal (`metrics` or `traces`), from the standard variables."""
    value = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
             or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or GRPC).strip()
    if value not in PROTOCOLS:
        raise ConfigError(f"OTLP protocol {value!r} is not supported for {signal}: use {' or '.join(PROTOCOLS)}")
    return value


def check(signal: str) -> None:
    """Fail at startup, in the master, when a signal is on but cannot be exported."""
    protocol(signal)
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"OTLP {signal} need the OpenTelemetry packages ({INSTALL_HINT}): {exc}") from exc


def resource() -> Any:
    """The exported resource: `service.name` is the reference's unless `OTEL_SERVICE_NAME` says otherwise."""
    from opentelemetry.sdk.resources import Resource

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {"service.name": SERVICE_NAME})


def metric_exporter() -> Any:
    if protocol("metrics") == HTTP_PROTOBUF:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def span_exporter() -> Any:
    if protocol("traces") == HTTP_PROTOBUF:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def milliseconds_variable(name: str, default: int) -> int:
    """A positive number of milliseconds from the environment (an unusable value keeps the default)."""
    try:
        value = int(float(os.environ.get(name, "")))
    except ValueError:
        return default
    return value if value > 0 else default
