"""`kubewarden/tracing/log`: a policy's log lines, emitted under the `policy_log` logger."""

from __future__ import annotations

import logging

import orjson

from kwserver.capabilities.callback_requests import HostCallError

log = logging.getLogger(__name__)
policy_log = logging.getLogger("policy_log")

_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
}


def call(policy_id: str, operation: str, payload: bytes) -> bytes:
    if operation != "log":
        raise HostCallError(f"unknown operation: {operation}")
    write_log(policy_id, payload)
    return b""


def write_log(policy_id: str, payload: bytes) -> None:
    """Policy log lines never fail the guest; a malformed one is only reported here."""
    try:
        entry = orjson.loads(payload)
        if not isinstance(entry, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        log.warning("policy %s sent a malformed log entry: %s", policy_id, exc)
        return
    level = _LEVELS.get(str(entry.pop("level", "info")).lower(), logging.INFO)
    message = entry.pop("message", "")
    data = orjson.dumps(entry).decode() if entry else ""
    policy_log.log(level, "%s", message, extra={"policy_id": policy_id, "data": data})
