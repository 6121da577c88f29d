"""Which host capabilities a policy may call: `hostCapabilities` patterns, as policy-server 1.35+ reads them.

A capability is a path `<namespace>/<operation>` of the host-call tree below (`oci/v1/verify`,
`kubernetes/can_i`). A pattern is `*` (everything), a prefix wildcard over a known branch (`oci/*`,
`oci/v1/*`) or an exact leaf path. Patterns are checked against the tree when a policy is loaded, with the
reference's messages; `tracing` (policy logs) is never gated. Pure: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

UNGATED_NAMESPACE = "tracing"

# Branches map segment names to their children; a leaf (a callable operation) maps to None.
TREE: dict[str, dict | None] = {
    "oci": {
        "v1": {"verify": None, "manifest_digest": None, "oci_manifest": None, "oci_manifest_config": None},
        "v2": {"verify": None},
    },
    "net": {"v1": {"dns_lookup_host": None}},
    "crypto": {"v1": {"is_certificate_trusted": None}},
    "kubernetes": {"list_resources_by_namespace": None, "list_resources_all": None, "get_resource": None,
                   "can_i": None},
}


class PatternError(ValueError):
    """A `hostCapabilities` pattern that names nothing the host offers; the text is the reference's."""


def _leaves(branch: dict, prefix: str) -> list[str]:
    paths = []
    for name, child in branch.items():
        paths.extend([prefix + name] if child is None else _leaves(child, f"{prefix}{name}/"))
    return paths


CAPABILITIES: frozenset[str] = frozenset(_leaves(TREE, ""))


def capability_path(namespace: str, operation: str) -> str:
    return f"{namespace}/{operation}"


@dataclass(frozen=True)
class AllowList:
    """A policy's grant: everything, or the prefixes (`oci/` from `oci/*`) and exact paths it names."""

    everything: bool = False
    prefixes: frozenset[str] = frozenset()
    exact: frozenset[str] = frozenset()

    def allows(self, path: str) -> bool:
        return self.everything or path in self.exact or any(path.startswith(p) for p in self.prefixes)

    @property
    def patterns(self) -> list[str]:
        """As written back (the reference's order): `*`, or sorted wildcards then sorted exact paths."""
        if self.everything:
            return ["*"]
        return [*sorted(p + "*" for p in self.prefixes), *sorted(self.exact)]

    def __str__(self) -> str:
        return f"[{', '.join(self.patterns)}]"


DENY_ALL = AllowList()
ALLOW_ALL = AllowList(everything=True)


def _quoted(text: str) -> str:
    """Rust's `{:?}` of a string, as the reference's messages show patterns."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    body = "".join(escapes.get(c, c if c.isprintable() else f"\\u{{{ord(c):x}}}") for c in text)
    return f'"{body}"'


def _check_against_tree(pattern: str) -> None:
    parts = pattern.split("/")
    branch: dict = TREE
    for index, part in enumerate(parts):
        if part == "*":
            return  # a wildcard below a known branch grants all of it
        if part not in branch:
            raise PatternError(f"invalid pattern {_quoted(pattern)}: unknown segment {_quoted(part)}, "
                               f"valid options at this level are: {', '.join(sorted(branch))}")
        child = branch[part]
        last = index == len(parts) - 1
        if child is None:
            if not last:
                raise PatternError(f"invalid pattern {_quoted(pattern)}: unknown segment {_quoted(parts[index + 1])}, "
                                   "valid options at this level are: ")
            return
        if last:
            raise PatternError(f"invalid pattern {_quoted(pattern)}: not a complete capability path; "
                               f"use {_quoted(pattern + '/*')} to allow all capabilities under it")
        branch = child


def parse(patterns: Iterable[str]) -> AllowList:
    """The grant `patterns` describe; PatternError for the first invalid one. As the reference reads them:
    each is trimmed, a `*` grants everything (patterns after it are not looked at), no pattern denies all."""
    prefixes, exact = set(), set()
    for pattern in patterns:
        trimmed = pattern.strip()
        if not trimmed:
            raise PatternError("invalid pattern: pattern must not be empty")
        if trimmed == "*":
            return ALLOW_ALL
        if "*" in trimmed and not trimmed.endswith("/*"):
            raise PatternError(f"invalid pattern {_quoted(pattern)}: wildcard '*' must be the entire last path "
                               "segment (e.g. 'oci/*'), not a partial match")
        _check_against_tree(trimmed)
        if trimmed.endswith("*"):
            prefixes.add(trimmed[:-1])
        else:
            exact.add(trimmed)
    if not prefixes and not exact:
        return DENY_ALL
    return AllowList(prefixes=frozenset(prefixes), exact=frozenset(exact))
