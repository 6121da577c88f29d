"""Properties over large input spaces: JSON Patches apply, and no configuration text or value breaks the
parsers with anything but a ConfigError (a message for the operator)."""

from __future__ import annotations

import base64
import json
import string

import jsonpatch
import orjson
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kwserver import admission
from kwserver.config import SETTINGS, ConfigError, PolicyGroupSpec, ServerSettings, load_policies, parse_policies
from kwserver.evaluation.modes import wapc as wapc_mode

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
keys = st.text(alphabet=string.ascii_letters + "~/._-", min_size=0, max_size=6)  # `~` and `/` need escaping
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=20)
objects = st.dictionaries(keys, json_values, max_size=5)



@st.composite
def base_and_mutated(draw):
    base = draw(objects)
    if draw(st.booleans()):
        return base, draw(objects)
    mutated = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        target = mutated
        while isinstance(target, (dict, list)) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
            if not isinstance(target[key], (dict, list)):
                break
            target = target[key]
        if isinstance(target, dict):
            if target and draw(st.booleans()):
                del target[draw(st.sampled_from(sorted(target)))]
            else:
                target[draw(keys)] = draw(json_values)
        elif isinstance(target, list):
            index = draw(st.integers(0, len(target)))
            target.insert(index, draw(json_values)) if draw(st.booleans()) or not target else target.pop(
                min(index, len(target) - 1))
    return base, mutated


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=base_and_mutated())
def test_a_mutation_becomes_a_patch_that_gives_the_mutated_object(pair):
    base, mutated = pair
    request = admission.parse_raw_review({"request": base})
    answer = json.dumps({"accepted": True, "mutated_object": mutated}).encode()
    response = wapc_mode.response_from_validation(request, answer)
    if json.dumps(mutated, sort_keys=True) == json.dumps(base, sort_keys=True):
        assert "patch" not in response
        return
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    # Compared as JSON text: Python's `1 == True` and `1 == 1.0` must not hide a change of type.
    patched = jsonpatch.apply_patch(base, patch)
    assert json.dumps(patched, sort_keys=True) == json.dumps(mutated, sort_keys=True)


yaml_documents = st.recursive(
    st.one_of(scalars, st.binary(max_size=3), st.sampled_from([
        "module", "settings", "policies", "expression", "message", "policyMode", "protect", "monitor", "a()",
        "a() && b()", "x.wasm", "/"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.one_of(st.sampled_from(["module", "settings", "policies", "expression", "message", "policyMode",
                                   "allowedToMutate", "contextAwareResources", "timeoutEvalSeconds", "entrypoint",
                                   "a", "b", "g/x", "1x"]), st.integers(-2, 2), st.booleans()),
        inner, max_size=5)),
    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(doc=yaml_documents)
@example(doc={"g": {"expression": "a()", "message": "m", "policies": {"a": {"module": "x", 1: 2, "zz": 1}}}})
@example(doc={"p": {"module": "x", "settings": {1: "integer keys have no JSON form"}}})
@example(doc={"p": {"module": "x", "settings": {"k": b"binary"}}})
def test_any_policies_document_parses_or_is_a_config_error(doc):
    try:
        entries = parse_policies(doc)
    except ConfigError as exc:
        assert str(exc)
        return
    # Whatever parsed can be served: names are strings and settings are JSON for the policy.
    for name, entry in entries.items():
        assert isinstance(name, str)
        for spec in entry.members.values() if isinstance(entry, PolicyGroupSpec) else [entry]:
            orjson.dumps(spec.settings)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      yaml_documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True))),
       raw=st.binary(max_size=64))
def test_any_policies_file_loads_or_is_a_config_error(tmp_path_factory, text, raw):
    path = tmp_path_factory.mktemp("p") / "policies.yml"
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        path.write_bytes(content)
        try:
            load_policies(path)
        except ConfigError as exc:
            assert str(path) in str(exc)


setting_values = st.one_of(st.text(max_size=12), st.sampled_from(["0", "1", "-1", "65536", "true", "no", "1e9",
                                                                   "nan", "inf", "0.5", " 3 ", "warn", "json"]))


@settings(max_examples=300, deadline=None)
@given(environ=st.dictionaries(st.sampled_from([s.env for s in SETTINGS]), setting_values, max_size=6))
def test_any_environment_gives_settings_or_a_config_error(environ):
    try:
        settings_ = ServerSettings.from_env(environ)
    except ConfigError as exc:
        assert str(exc)
        return
    # What parsed survives the trip through the environment of a child process.
    assert ServerSettings.from_env(settings_.to_env()) == settings_
