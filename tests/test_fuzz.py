"""The fuzz targets (fuzz/targets.py) in every run: hypothesis over each, a short coverage-guided atheris run
of each, and every finding kept as a regression test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz import targets
from kwserver.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
# Seconds of atheris per target in CI (about a minute for all of them); `python -m fuzz` runs longer ones.
ATHERIS_SECONDS = 8


@pytest.fixture(scope="module", autouse=True)
def quiet() -> None:
    targets.environment()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_every_target_holds_for_any_input(name):
    target = targets.TARGETS[name]

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.binary(max_size=4096))
    def holds(data: bytes) -> None:
        target(data)

    for seed in targets.seeds(name):
        holds = example(seed)(holds)
    holds()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_a_short_coverage_guided_run_finds_nothing(name, tmp_path):
    pytest.importorskip("atheris")
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", name, f"-max_total_time={ATHERIS_SECONDS}", f"-artifact_prefix={tmp_path}/",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=ATHERIS_SECONDS * 4 + 60)
    crashes = list(tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not crashes, run.stderr[-3000:]
    assert "Done " in run.stderr


# --- findings ------------------------------------------------------------------------------------------
# Each was found by the targets above (atheris), and raised something else than a ConfigError: the
# operator got a traceback instead of the file's problem.

@pytest.mark.parametrize("text,message", [
    # A DER certificate written as a list that is not of bytes: TypeError from bytes().
    ("source_authorities: {r.example.com: [{type: Data, data: [[1]]}]}", "integers from 0 to 255"),
    ("source_authorities: {r.example.com: [{type: Data, data: [256]}]}", "integers from 0 to 255"),
    # Keys of different types: TypeError from sorting them for the message.
    ("{1: a, b: c}", "unknown field(s) ['1', 'b']"),
    ("source_authorities: {r.example.com: [{type: Data, 1: a, data: x}]}", "has exactly the key `data`"),
])
def test_sources_yml_findings(tmp_path, text, message):
    from kwserver.sources.trust import load_sources

    path = tmp_path / "sources.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_sources(str(path))
    assert message in str(raised.value)


@pytest.mark.parametrize("doc,message", [
    # A list as a signature's kind: TypeError (unhashable) when looking it up.
    ({"apiVersion": "v1", "allOf": [{"kind": ["pubKey"]}]}, "unknown variant"),
    ({"apiVersion": "v1", "allOf": [], 1: "a", "b": 2}, "unknown field(s) ['1', 'b']"),
    ({"apiVersion": "v1", "anyOf": {"signatures": [], 1: "a", "b": 2}}, "unknown field(s) ['1', 'b']"),
    ({"apiVersion": "v1", "allOf": [{"kind": "pubKey", "key": "k", 1: "a", "b": 2}]},
     "unknown field(s) ['1', 'b']"),
])
def test_verification_yml_findings(tmp_path, doc, message):
    from kwserver.sources.verification import load_verification

    path = tmp_path / "verification.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as raised:
        load_verification(str(path))
    assert message in str(raised.value)


def test_metric_labels_are_strings_whatever_a_record_holds():
    # Found by fuzzing AdmissionReview bodies (issue 24): a list as requestKind.kind reached the metrics after
    # the evaluation and the client got a 500 (`unhashable type`). Requests are now typed (422), and labels
    # are made strings whatever reaches them.
    from kwserver.admission import EvaluationRequest
    from kwserver.observability.metrics import WorkerMetrics
    from kwserver.server.service import EvaluationRecord

    request = EvaluationRequest(uid="u", value={}, json=b"{}", base_object=None, has_base_object=False, raw=False,
                                namespace=7, operation=["CREATE"], kind=["Pod"])  # type: ignore[arg-type]
    metrics = WorkerMetrics()
    metrics.observe(EvaluationRecord("p", "protect", "validate", request, True, False, 403, 0.001))
    (labels,) = metrics._pending.evaluations
    assert all(isinstance(value, str) for value in labels) and "['Pod']" in labels and "403" in labels
