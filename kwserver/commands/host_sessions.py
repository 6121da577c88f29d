"""Host-capability session files: record a policy's host calls and their answers, replay them later.

The format is kwctl's (`--record-host-capabilities-interactions` / `--replay-host-capabilities-interactions`),
so sessions recorded by either tool replay in both: a YAML list of exchanges

    - type: Exchange
      request: |
        !KubernetesGetResource
        api_version: v1
        kind: Namespace
        ...
      response:
        type: Success          # or `type: Error` with `message: ...`
        payload: '{"apiVersion": ...}'

where `request` is itself a YAML document: the callback request, its variant as the tag. A replay answers
the calls in order; a call that is not the next recorded one fails, as does a call past the end.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kwserver.capabilities import MASKS, OPTIONAL, REQUEST_FIELDS, HostCallError, HostRequest

log = logging.getLogger(__name__)

# How the reference hands a failed callback to the guest.
CALLBACK_FAILURE = "Callback evaluation failure: {}"


class SessionError(Exception):
    """A session file that cannot be read or written."""


@dataclass(frozen=True)
class Exchange:
    request: HostRequest
    payload: str | None = None  # the answer of a successful call
    error: str | None = None  # the error of a failed one


# --- the YAML form -----------------------------------------------------------------------------------

class _RequestLoader(yaml.SafeLoader):
    """Reads `!Variant` tagged mappings as HostRequests."""


def _construct_request(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> HostRequest:
    if isinstance(node, yaml.MappingNode):
        return HostRequest(suffix, loader.construct_mapping(node, deep=True))
    return HostRequest(suffix, {})


_RequestLoader.add_multi_constructor("!", _construct_request)


def parse_request(text: str) -> HostRequest:
    """A recorded request; also accepts the untagged `{Variant: {...}}` form of older serde_yaml."""
    try:
        value = yaml.load(text, Loader=_RequestLoader)  # a SafeLoader that also reads `!Variant` tags
    except yaml.YAMLError as exc:
        raise SessionError(f"cannot read recorded request {text!r}: {exc}") from exc
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), dict | None):
        kind, fields = next(iter(value.items()))
        value = HostRequest(str(kind), fields or {})
    if not isinstance(value, HostRequest):
        raise SessionError(f"recorded request {text!r} is not a callback request")
    return value.normalized()


class _SessionDumper(yaml.SafeDumper):
    pass


def _represent_request(dumper: yaml.SafeDumper, request: HostRequest) -> yaml.Node:
    return dumper.represent_mapping(f"!{request.kind}", request.fields.items())


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # Multi-line requests and payloads as literal blocks keep the session readable.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_SessionDumper.add_representer(HostRequest, _represent_request)
_SessionDumper.add_representer(str, _represent_text)


def dump_request(request: HostRequest) -> str:
    return yaml.dump(request, Dumper=_SessionDumper, sort_keys=False)


def _exchange(item: Any, position: int) -> Exchange:
    where = f"exchange {position}"
    if not isinstance(item, dict) or not isinstance(item.get("request"), str):
        raise SessionError(f"{where}: expected a map with a `request` string")
    response = item.get("response")
    if not isinstance(response, dict):
        raise SessionError(f"{where}: missing `response`")
    request = parse_request(item["request"])
    if response.get("type") == "Success" and isinstance(response.get("payload"), str):
        return Exchange(request, payload=response["payload"])
    if response.get("type") == "Error" and isinstance(response.get("message"), str):
        return Exchange(request, error=response["message"])
    raise SessionError(f"{where}: `response` must be `type: Success` with a `payload` string "
                       "or `type: Error` with a `message` string")


def load_session(path: str) -> list[Exchange]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionError(f"Cannot open host capabilities interactions file {path}: {exc}") from exc
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SessionError(f"cannot deserialize contents of {path}: {exc}") from exc
    if items is None:
        return []
    if not isinstance(items, list):
        raise SessionError(f"cannot deserialize contents of {path}: expected a list of exchanges")
    try:
        return [_exchange(item, position) for position, item in enumerate(items, 1)]
    except SessionError as exc:
        raise SessionError(f"cannot deserialize contents of {path}: {exc}") from exc


def dump_session(exchanges: list[Exchange]) -> str:
    items = []
    for exchange in exchanges:
        if exchange.error is not None:
            response = {"type": "Error", "message": exchange.error}
        else:
            response = {"type": "Success", "payload": exchange.payload}
        items.append({"type": "Exchange", "request": dump_request(exchange.request), "response": response})
    return yaml.dump(items, Dumper=_SessionDumper, sort_keys=False, allow_unicode=True)


# --- Rust's Debug text, for the replay mismatch message kwctl gives ------------------------------------

def _debug(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_debug(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_debug(k)}: {_debug(v)}" for k, v in value.items()) + "}"
    return str(value)


def debug_text(request: HostRequest) -> str:
    rules = dict(REQUEST_FIELDS.get(request.kind, ()))
    parts = []
    for name, value in request.fields.items():
        shown = _debug(value)
        if rules.get(name) == MASKS and value is not None:
            shown = "{" + shown[1:-1] + "}"  # a BTreeSet
        if rules.get(name) in (OPTIONAL, MASKS) and value is not None:
            shown = f"Some({shown})"
        parts.append(f"{name}: {shown}")
    return f"{request.kind} {{ {', '.join(parts)} }}"


# --- the handlers ----------------------------------------------------------------------------------------

class ReplaySession:
    """Answers each host call with the next recorded exchange, never calling out."""

    def __init__(self, exchanges: list[Exchange]):
        self.pending = deque(exchanges)

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes:
        if not self.pending:
            raise HostCallError(CALLBACK_FAILURE.format("the list of recorded responses is empty"))
        expected = self.pending.popleft()
        if expected.request != request.normalized():
            raise HostCallError(CALLBACK_FAILURE.format(
                f"Replay error: unexpected request. Was expecting {debug_text(expected.request)}, "
                f"got {debug_text(request.normalized())} instead"))
        if expected.error is not None:
            raise HostCallError(CALLBACK_FAILURE.format(expected.error))
        return (expected.payload or "").encode()

    def finish(self) -> None:
        if self.pending:
            log.warning("Some of the recorded exchanges have not been replayed: %d left (next: %s)",
                        len(self.pending), debug_text(self.pending[0].request))


class RecordSession:
    """Answers with this build's own answers and keeps every exchange, for `finish` to write out."""

    def __init__(self, destination: str):
        self.destination = destination
        self.exchanges: list[Exchange] = []
        self.problems: list[str] = []

    def answer(self, request: HostRequest, direct: Callable[[], bytes]) -> bytes:
        try:
            payload = direct()
        except HostCallError as exc:
            # Recorded as the handler's own error: a replay hands it to the guest with the prefix again.
            error = str(exc).removeprefix(CALLBACK_FAILURE.format(""))
            self.exchanges.append(Exchange(request.normalized(), error=error))
            raise
        try:
            self.exchanges.append(Exchange(request.normalized(), payload=payload.decode("utf-8")))
        except UnicodeDecodeError as exc:
            self.problems.append(f"cannot convert response payload to utf8: {exc}")
        return payload

    def finish(self) -> None:
        """Write the session, as kwctl does: not at all when some answer could not be recorded."""
        if self.problems:
            log.error("Cannot record communication between host and policy: %s", "; ".join(self.problems))
            return
        try:
            Path(self.destination).write_text(dump_session(self.exchanges), encoding="utf-8")
        except OSError as exc:
            log.error("Cannot save host capabilities session to %s: %s", self.destination, exc)
            return
        log.info("host capabilities session saved to %s (%d exchanges)", self.destination, len(self.exchanges))
