"""HTTP for every source: TLS per sources.yml, timeouts, bounded retries, size limits, proxies.

One `Transport` per host. Requests go through `requests` (sources.yml's `proxies`, else HTTPS_PROXY,
NO_PROXY and friends as usual) with urllib3's retry policy for transient failures (connection errors, 429 and
5xx), a connect/read timeout on every request, and a cap on the bytes a download may bring.

`attempts()` is the reference's order for a host: HTTPS checked against the host's CAs (or the
system store); for an insecure source then HTTPS without verification, then plain HTTP.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from kwserver import __version__
from kwserver.sources.errors import SourceError, TransportError
from kwserver.sources.options import FetchOptions
from kwserver.sources.trust import Proxies, Sources

log = logging.getLogger(__name__)
# urllib3 logs each retry as a warning; the outcome is reported once, by the caller.
logging.getLogger("urllib3").setLevel(logging.ERROR)
T = TypeVar("T")
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Attempt:
    scheme: str  # "https" or "http"
    verify: bool | str  # requests' `verify`: True (system CAs), a CA bundle path, or False

    def describe(self) -> str:
        if self.scheme == "http":
            return "plain HTTP"
        return "HTTPS without TLS verification" if self.verify is False else "HTTPS"


def attempts(host: str, sources: Sources, scheme: str = "https") -> list[Attempt]:
    if scheme == "http":
        if not sources.is_insecure(host):
            raise SourceError(f"plain HTTP to {host} is refused: add `{host}` to insecure_sources in sources.yml")
        return [Attempt("http", False)]
    first = [Attempt("https", sources.verify_for(host))]
    if not sources.is_insecure(host):
        return first
    return [*first, Attempt("https", False), Attempt("http", False)]


def with_fallback(host: str, sources: Sources, operation: Callable[[Attempt], T], scheme: str = "https") -> T:
    """Run `operation` with each attempt in turn until one gets through; report all failures."""
    failures = []
    for attempt in attempts(host, sources, scheme):
        try:
            return operation(attempt)
        except TransportError as exc:
            failures.append((attempt, exc))
            log.debug("%s to %s failed: %s", attempt.describe(), host, exc)
    if len(failures) == 1:
        raise failures[0][1]
    raise TransportError("; ".join(f"{a.describe()}: {e}" for a, e in failures))


class _TransientRetry(Retry):
    """urllib3's retries, except for TLS failures: a handshake that failed once fails again."""

    def increment(self, method: str | None = None, url: str | None = None, *args: object,
                  error: Exception | None = None, **kwargs: object) -> Retry:
        if isinstance(error, urllib3.exceptions.SSLError):
            raise urllib3.exceptions.MaxRetryError(kwargs.get("_pool"), url, error)
        return super().increment(method, url, *args, error=error, **kwargs)


class _ConfiguredProxies(requests.Session):
    """A session whose every request and redirect goes through sources.yml's proxies, never the
    environment's (which would otherwise fill in a scheme the configuration leaves direct)."""

    def __init__(self, proxies: Proxies):
        super().__init__()
        self.configured = proxies

    def merge_environment_settings(self, url: str, *args: object, **kwargs: object) -> dict:
        settings = super().merge_environment_settings(url, *args, **kwargs)
        settings["proxies"] = self.configured.for_url(url)
        return settings

    def rebuild_proxies(self, prepared_request: requests.PreparedRequest, proxies: object) -> dict:
        return super().rebuild_proxies(prepared_request, self.configured.for_url(prepared_request.url))


def make_session(options: FetchOptions, proxies: Proxies | None = None) -> requests.Session:
    """`proxies`: sources.yml's; None leaves them to the environment."""
    session = requests.Session() if proxies is None else _ConfiguredProxies(proxies)
    tries = options.retries
    retry = _TransientRetry(total=tries, connect=tries, read=tries, status=tries, backoff_factor=0.2,
                            status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                            raise_on_status=False, respect_retry_after_header=False)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = f"kwserver/{__version__}"
    return session


def describe_exception(exc: requests.RequestException, url: str) -> str:
    reason = exc
    while isinstance(reason, (requests.RequestException, urllib3.exceptions.HTTPError)) and reason.args:
        inner = reason.args[0]
        if isinstance(inner, urllib3.exceptions.MaxRetryError):
            inner = inner.reason
        if not isinstance(inner, BaseException):
            break
        reason = inner
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error talking to {url}: {reason}"
    if isinstance(exc, requests.Timeout):
        return f"no answer from {url} in time: {reason}"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {url}: {reason}"
    return f"request to {url} failed: {reason}"


def request(session: requests.Session, method: str, url: str, attempt: Attempt, options: FetchOptions,
            **kwargs: object) -> requests.Response:
    try:
        with warnings.catch_warnings():
            # Unverified HTTPS is what an insecure source asked for; no warning per request.
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            return session.request(method, url, verify=attempt.verify, timeout=options.timeout_seconds,
                                   stream=True, **kwargs)
    except requests.RequestException as exc:
        raise TransportError(describe_exception(exc, url)) from exc
    except urllib3.exceptions.HTTPError as exc:  # e.g. a host name that cannot be resolved at all
        raise TransportError(f"cannot connect to {url}: {exc}") from exc


def read_limited(response: requests.Response, options: FetchOptions, what: str) -> bytes:
    """The whole body, refusing more than `max_bytes` (announced or actually sent)."""
    limit = options.max_bytes
    announced = response.headers.get("Content-Length")
    if announced and announced.isdigit() and int(announced) > limit:
        response.close()
        raise SourceError(f"{what} is {int(announced)} bytes, more than the limit of {limit} bytes")
    body = bytearray()
    try:
        for chunk in response.iter_content(CHUNK):
            body += chunk
            if len(body) > limit:
                raise SourceError(f"{what} is more than the limit of {limit} bytes")
    except requests.RequestException as exc:
        raise TransportError(describe_exception(exc, response.url)) from exc
    finally:
        response.close()
    return bytes(body)
