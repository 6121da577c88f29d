import pytest

from kwserver.expressions import ExpressionError, compile_expression, evaluate, parse

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


def _value(text):
    return evaluate(parse(text), lambda name: True)


@pytest.mark.parametrize("text,value", [
    ("7 / 2", 3), ("-7 / 2", -3), ("7 / -2", -3), ("-7 / -2", 3), ("-8 / 2", -4), ("0 / -5", 0),
    ("7 % 2", 1), ("-7 % 2", -1), ("7 % -2", 1), ("-7 % -2", -1), ("-8 % 2", 0),
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("10 - 4 - 3", 3), ("2 * 3 % 4", 2), ("100 / 10 / 5", 2),
    ("-2 * 3", -6), ("--5", 5), ("9223372036854775807", 2**63 - 1), ("-9223372036854775807 - 1", -(2**63)),
])
def test_integer_arithmetic_is_rusts(text, value):
    # Rhai (the reference's engine) does what Rust does: `/` truncates toward zero, `%` keeps the dividend's sign.
    assert _value(text) == value


@pytest.mark.parametrize("text", [
    "-7 / 2 == -3", "-7 % 2 == -1", "7 / 2 * 2 + 7 % 2 == 7", "-7 / 2 * 2 + -7 % 2 == -7"])
def test_truncating_division_as_a_group_expression(text):
    assert evaluate(compile_expression(text, MEMBERS), lambda name: True) is True


@pytest.mark.parametrize("text,message", [
    ("1 / 0 == 0", "Division by zero: 1 / 0"),
    ("1 % 0 == 0", "Division by zero: 1 % 0"),
    ("happy_policy_1() && 5 / (3 - 3) > 1", "Division by zero: 5 / 0"),
    ("9223372036854775807 + 1 > 0", "Addition overflow"),
    ("-9223372036854775807 - 2 < 0", "Subtraction overflow"),
    ("4611686018427387904 * 2 > 0", "Multiplication overflow"),
    ("(-9223372036854775807 - 1) / -1 > 0", "Division overflow"),
    ("(-9223372036854775807 - 1) % -1 == 0", "Modulo overflow"),
    ("-(-9223372036854775807 - 1) > 0", "Negation overflow"),
])
def test_division_by_zero_and_overflow_fail_the_evaluation(text, message):
    tree = compile_expression(text, MEMBERS)  # well-typed: the failure comes at evaluation, as in the reference
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(").replace("*", r"\*").replace("+", r"\+")):
        evaluate(tree, lambda name: True)


def test_division_by_zero_not_reached_is_no_error():
    tree = compile_expression("happy_policy_1() || 1 / 0 == 0", MEMBERS)
    assert evaluate(tree, lambda name: True) is True


def test_integer_literals_are_64_bit():
    with pytest.raises(ExpressionError, match="too large"):
        compile_expression("9223372036854775808 > 0", MEMBERS)


@pytest.mark.parametrize("text,value", [
    ("1 < 2", True), ("2 < 1", False), ("2 <= 2", True), ("3 <= 2", False), ("3 > 2", True), ("2 > 2", False),
    ("2 >= 2", True), ("1 >= 2", False), ("1 == 1", True), ("1 != 1", False), ("true != false", True),
    ("!true", False), ("!!true", True), ("true && false", False), ("false || true", True),
    ("1 + 1 == 2 && 2 * 2 == 4", True), ("1 - 1 == 0 == true", True),
])
def test_comparisons_and_logic(text, value):
    assert evaluate(compile_expression(text, MEMBERS), lambda name: True) is value


def test_member_results_take_part_in_the_value():
    answers = {"happy_policy_1": True, "unhappy_policy_1": False, "pod_privileged": False}
    tree = compile_expression("happy_policy_1() && !unhappy_policy_1() && !pod_privileged()", MEMBERS)
    assert evaluate(tree, answers.__getitem__) is True
    tree = compile_expression("happy_policy_1() && unhappy_policy_1()", MEMBERS)
    assert evaluate(tree, answers.__getitem__) is False
