"""Field masks as the reference applies them: its own cases, and what a Kubernetes object keeps."""

from __future__ import annotations

import copy

import pytest

from kwserver.cluster.field_masks import mask_tree, masked, normalized, prune

USER = {"user": {"name": "Alice", "age": 30, "metadata": {"id": 1, "active": True}}, "other": "data"}


@pytest.mark.parametrize("value,masks,expected", [
    ({"a": {"b": 1, "c": 2}, "d": 3}, ["a.b", "d"], {"a": {"b": 1}, "d": 3}),
    (USER, ["user.name", "user.metadata.id"], {"user": {"name": "Alice", "metadata": {"id": 1}}}),
    ({"users": [{"name": "Alice", "age": 30}, {"name": "Bob", "age": 25}], "metadata": {"count": 2}},
     ["users.name"], {"users": [{"name": "Alice"}, {"name": "Bob"}]}),
    ({"users": [{"name": "A", "age": 1, "metadata": {"id": 1}}, {"name": "B", "age": 2, "metadata": {"id": 2}}]},
     ["users.name", "users.metadata"], {"users": [{"name": "A", "metadata": {"id": 1}}, {"name": "B", "metadata": {
         "id": 2}}]}),
    (USER, ["user"], {"user": USER["user"]}),  # a path that ends keeps everything below it
    (USER, ["user", "user.name"], {"user": {"name": "Alice"}}),  # the longer path decides
    ({"a": [[{"b": 1, "c": 2}]]}, ["a.b"], {"a": [[{"b": 1}]]}),  # arrays in arrays are transparent too
    ({"a": "text", "b": 1}, ["a.deeper"], {"a": "text"}),  # nothing to prune inside a string
])
def test_the_references_cases(value, masks, expected):
    assert prune(copy.deepcopy(value), mask_tree(masks)) == expected


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "a", "labels": {"app": "web"}},
       "spec": {"containers": [{"name": "nginx", "image": "nginx:1", "ports": [{"containerPort": 80}]}],
                "nodeName": "n1"},
       "status": {"phase": "Running"}}


def test_objects_keep_their_type_and_metadata():
    assert masked(copy.deepcopy(POD), mask_tree(["spec.containers.image"])) == {
        "apiVersion": "v1", "kind": "Pod", "metadata": POD["metadata"],
        "spec": {"containers": [{"image": "nginx:1"}]}}
    # Metadata is not part of what masks apply to: naming it keeps it whole and prunes everything else.
    assert masked(copy.deepcopy(POD), mask_tree(["metadata.name"])) == {
        "apiVersion": "v1", "kind": "Pod", "metadata": POD["metadata"]}


def test_masks_naming_fields_that_do_not_exist_prune_to_what_does():
    assert masked(copy.deepcopy(POD), mask_tree(["spec.nope", "nope.either"])) == {
        "apiVersion": "v1", "kind": "Pod", "metadata": POD["metadata"], "spec": {}}


def test_no_mask_or_an_empty_one_keeps_everything():
    assert normalized(None) is None and normalized([]) is None
    assert normalized(["b", "a", "b"]) == ("a", "b")
    assert masked(copy.deepcopy(POD), None) == POD
    assert prune(copy.deepcopy(POD), mask_tree([])) == POD
