"""Policy groups evaluated the way a worker does (in-process): which members run, the causes of a
rejection, member failures, mutations, and expression errors."""

from __future__ import annotations

import dataclasses

import pytest

from kwserver.admission import parse_raw_review
from kwserver.evaluation import UnknownPolicy
from kwserver.runtime import InstanceLimits
from tests.support.modules import in_process_evaluator
from tests.support.paths import policy_path

ACCEPTING = {"module": policy_path("raw-validation"),
             "settings": {"validUsers": ["tonio"], "validActions": ["eats"], "validResources": ["hay"]}}
REJECTING = {"module": policy_path("raw-validation"),
             "settings": {"validUsers": ["nobody"], "validActions": ["eats"], "validResources": ["hay"]}}
MUTATING = {"module": policy_path("raw-mutation"), "settings": {"forbiddenResources": ["hay"], "defaultResource": "x"}}
BROKEN = {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "not a number"}}
MEMBERS = {"ok": ACCEPTING, "no": REJECTING, "also_no": REJECTING, "mutates": MUTATING, "broken": BROKEN,
           "unmakeable": ACCEPTING}
REJECTED = "this request is not accepted"
GROUPS = {
    "accepts": "ok() && !no()",
    "rejects": "ok() && no()",
    "stops_early": "no() && ok()",
    "both_reject": "no() || also_no()",
    "twice": "no() || no()",
    "mutation": "mutates()",
    "mutation_or_ok": "mutates() || ok()",
    "init_error": "broken() || no()",
    "cannot_run": "ok() && unmakeable()",
    "division": "ok() && 1 / 0 == 0",
}
REQUEST = parse_raw_review({"request": {"uid": "u1", "user": "tonio", "action": "eats", "resource": "hay"}})


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    policies = {name: {"expression": text, "message": f"group {name} says no", "policies": MEMBERS}
                for name, text in GROUPS.items()}
    policies["plain"] = ACCEPTING
    with in_process_evaluator(tmp_path_factory.mktemp("groups"), policies, continue_on_errors=True) as (
            evaluator, registry, _):
        # A member whose instance cannot be made at request time: its memory limit is below the module's minimum.
        member = registry.policies["cannot_run/unmakeable"]
        registry.policies["cannot_run/unmakeable"] = dataclasses.replace(
            member, limits=InstanceLimits(memory_bytes=64 * 1024, timeout_seconds=1))
        yield evaluator


def _causes(response):
    return sorted((c["field"], c["message"], c["reason"]) for c in response["status"]["details"]["causes"])


def test_accepted_group_answers_allowed_without_status(evaluator):
    assert evaluator.evaluate("accepts", REQUEST) == {"uid": "u1", "allowed": True, "auditAnnotations": None,
                                                       "warnings": None}


def test_rejection_has_the_group_message_and_one_cause_per_rejecting_member(evaluator):
    response = evaluator.evaluate("rejects", REQUEST)
    assert response["allowed"] is False and response["uid"] == "u1"
    assert response["status"]["message"] == "group rejects says no" and "code" not in response["status"]
    assert _causes(response) == [("spec.policies.no", REJECTED, None)]  # `ok` allowed: no cause
    assert _causes(evaluator.evaluate("both_reject", REQUEST)) == [
        ("spec.policies.also_no", REJECTED, None), ("spec.policies.no", REJECTED, None)]


def test_members_not_evaluated_give_no_cause_and_a_member_called_twice_one(evaluator):
    assert _causes(evaluator.evaluate("stops_early", REQUEST)) == [("spec.policies.no", REJECTED, None)]
    assert _causes(evaluator.evaluate("twice", REQUEST)) == [("spec.policies.no", REJECTED, None)]


def test_a_mutating_member_is_a_rejection_and_no_patch_leaves_the_group(evaluator):
    response = evaluator.evaluate("mutation", REQUEST)
    assert response["allowed"] is False and "patch" not in response and "patchType" not in response
    assert _causes(response) == [("spec.policies.mutates", "mutation is not allowed inside of policy group", None)]
    response = evaluator.evaluate("mutation_or_ok", REQUEST)
    assert response == {"uid": "u1", "allowed": True, "auditAnnotations": None, "warnings": None}


def test_a_member_that_failed_to_initialise_rejects_with_its_error(evaluator):
    response = evaluator.evaluate("init_error", REQUEST)
    assert response["allowed"] is False
    (field, message, _), no = _causes(response)
    assert field == "spec.policies.broken" and message.startswith("Policy settings are invalid:")
    assert no == ("spec.policies.no", REJECTED, None)


@pytest.mark.parametrize("group,detail", [
    ("cannot_run", "policy cannot_run/unmakeable: "),
    ("division", "Division by zero: 1 / 0"),
])
def test_an_expression_that_cannot_be_evaluated_is_a_500_rejection(evaluator, group, detail):
    response = evaluator.evaluate(group, REQUEST)
    assert response["uid"] == "u1" and response["allowed"] is False and response["status"]["code"] == 500
    assert response["status"]["message"].startswith(f"error evaluating policy group expression: {detail}")
    assert "details" not in response["status"]


def test_plain_policies_and_unknown_names(evaluator):
    assert evaluator.evaluate("plain", REQUEST)["allowed"] is True
    with pytest.raises(UnknownPolicy, match="unknown policy: nothing"):
        evaluator.evaluate("nothing", REQUEST)
