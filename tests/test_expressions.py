import pytest

from kwserver.expressions import ExpressionError, compile_expression, evaluate

MEMBERS = {"happy_policy_1", "unhappy_policy_1", "pod_privileged"}


@pytest.mark.parametrize("text", [
    "true || happy_policy_1()",
    "2 > 1",
    "pod_privileged() && true",
    "!(happy_policy_1() || unhappy_policy_1()) && 1 + 2 * 3 == 7",
    "happy_policy_1() == unhappy_policy_1()",
])
def test_valid_expressions(text):
    compile_expression(text, MEMBERS)


@pytest.mark.parametrize("text", [
    "unknown_policy()",
    "happy_policy_1() + 1",
    "1 + 1",
    "happy_policy_1() &&",
    "garbage here",
    "happy_policy_1",
    "",
    "(happy_policy_1()",
    "happy_policy_1() ; true",
    "__import__('os')",
])
def test_invalid_expressions(text):
    with pytest.raises(ExpressionError):
        compile_expression(text, MEMBERS)


def test_short_circuit_skips_unneeded_members():
    calls = []

    def call(name):
        calls.append(name)
        return name == "happy_policy_1"

    tree = compile_expression("happy_policy_1() || unhappy_policy_1()", MEMBERS)
    assert evaluate(tree, call) is True
    assert calls == ["happy_policy_1"]

    calls.clear()
    tree = compile_expression("unhappy_policy_1() && happy_policy_1()", MEMBERS)
    assert evaluate(tree, call) is False
    assert calls == ["unhappy_policy_1"]


def test_precedence_and_before_or():
    tree = compile_expression("true || false && false", MEMBERS)
    assert evaluate(tree, lambda name: False) is True
    tree = compile_expression("(true || false) && false", MEMBERS)
    assert evaluate(tree, lambda name: False) is False


def test_members_called_twice_are_evaluated_twice():
    calls = []
    tree = compile_expression("pod_privileged() || pod_privileged()", MEMBERS)
    evaluate(tree, lambda name: calls.append(name) or False)
    assert calls == ["pod_privileged", "pod_privileged"]
