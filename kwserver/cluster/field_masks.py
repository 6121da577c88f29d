"""`field_masks` of the Kubernetes list and get callbacks: the fields of an object a policy needs.

As policy-server 1.33+ applies them: a mask is a set of dot-separated paths (`spec.containers.image`); an
object keeps its `apiVersion`, `kind` and `metadata` whole and, of everything else, only what some path
names. Arrays are transparent (a path continues into every item), a path that ends keeps everything below
it, and a name the object does not have is simply not there: nothing is added, nothing fails. When two
paths meet (`spec` and `spec.replicas`) the longer one decides, as in the reference. No mask, or an empty
one, keeps the object whole. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What the reference never prunes: the type and the metadata live outside the data its masks apply to.
UNMASKED = frozenset({"apiVersion", "kind", "metadata"})

Mask = dict[str, "Mask"]  # a tree of field names; a node without children keeps all below it


def normalized(masks: Iterable[str] | None) -> tuple[str, ...] | None:
    """The masks as a key (sorted, no repeats); None when they keep everything."""
    unique = sorted(set(masks or ()))
    return tuple(unique) if unique else None


def mask_tree(masks: Iterable[str] | None) -> Mask | None:
    """The paths as a tree; None for no mask (keep everything)."""
    if not masks:
        return None
    root: Mask = {}
    for path in masks:
        node = root
        for part in path.split("."):
            node = node.setdefault(part, {})
    return root


def prune(value: Any, node: Mask) -> Any:
    """`value` with only what `node` names (in place for objects and arrays, which are also returned)."""
    if not node:
        return value
    if isinstance(value, dict):
        for key in [key for key in value if key not in node]:
            del value[key]
        for key, child in value.items():
            prune(child, node[key])
    elif isinstance(value, list):
        for item in value:
            prune(item, node)
    return value


def masked(obj: dict[str, Any], tree: Mask | None) -> dict[str, Any]:
    """A Kubernetes object pruned to `tree` (in place); its type and metadata are always kept."""
    if not tree:
        return obj
    for key in [key for key in obj if key not in UNMASKED and key not in tree]:
        del obj[key]
    for key, child in obj.items():
        if key not in UNMASKED:
            prune(child, tree[key])
    return obj
