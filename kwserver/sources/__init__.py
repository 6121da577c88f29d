"""Where policy module bytes come from.

A module reference in policies.yml is parsed once (`references`), then fetched by the source its
scheme names: local files (`file`), HTTP(S) downloads (`https`), OCI registries (`oci`). Remote
modules land in the download directory (`store`); signatures are checked by `verification` (keyless ones
by `keyless`, against the Sigstore trust root of `sigstore_trust`).
"""

from __future__ import annotations

from kwserver.sources.errors import SourceError
from kwserver.sources.file import FetchedModule, fetch, resolve_local_path

__all__ = ["FetchedModule", "SourceError", "fetch", "resolve_local_path"]
