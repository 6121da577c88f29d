"""Bounded messages: text that comes from a guest or from a host error is cut to a limit before it
reaches a response, a stored initialisation error or a log line.

A guest decides the length of what it says (a rejection message, a call failure that echoes a 2 MB
payload, a console line) and host errors may quote what they failed on; unbounded, one request can
produce a response or a log line of megabytes. The head is kept, because that is where the reason
is, followed by how many bytes were cut: `... (truncated, 4,003,112 bytes)`.
"""

from __future__ import annotations

import re

# The limit of one message, in UTF-8 bytes (the marker comes on top).
MESSAGE_LIMIT_BYTES = 16 * 1024
_MAX_UTF8_BYTES_PER_CHAR = 4
_MARKER = re.compile(r"\.\.\. \(truncated, [\d,]+ bytes\)$")


def bounded(text: str, limit: int = MESSAGE_LIMIT_BYTES) -> str:
    """`text` if it fits in `limit` UTF-8 bytes; else its head, cut on a character boundary, and the
    number of bytes cut."""
    if len(text) * _MAX_UTF8_BYTES_PER_CHAR <= limit:
        return text  # short enough whatever its characters: no encoding needed (the common case)
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker = _MARKER.search(text)
    if marker and len(text[:marker.start()].encode("utf-8", "replace")) <= limit:
        return text  # bounded already (a stored error answered again): cutting again would lose the count
    head = data[:limit].decode("utf-8", "ignore")  # drops a character split by the cut
    cut = len(data) - len(head.encode("utf-8", "replace"))
    return f"{head}... (truncated, {cut:,} bytes)"

