"""Modules served as plain files over HTTPS (or HTTP, for insecure sources)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from kwserver.sources.errors import SourceError
from kwserver.sources.options import FetchOptions
from kwserver.sources.references import UrlReference
from kwserver.sources.transport import Attempt, make_session, read_limited, request, with_fallback
from kwserver.sources.trust import Sources


def download(reference: UrlReference, sources: Sources, options: FetchOptions) -> bytes:
    session = make_session(options, sources.proxies)

    def get(attempt: Attempt) -> bytes:
        url = urlunsplit(urlsplit(reference.url)._replace(scheme=attempt.scheme))
        response = request(session, "GET", url, attempt, options)
        if response.status_code != 200:
            response.close()
            raise SourceError(f"GET {url}: HTTP {response.status_code} {response.reason}")
        return read_limited(response, options, f"the module at {url}")

    with session:
        return with_fallback(reference.host, sources, get, scheme=reference.scheme)
