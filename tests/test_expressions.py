import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- property: any well-typed expression evaluates as a small reference evaluator says ------------------

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
# Binding power, lowest first (Rhai's order); unary operators bind tighter than any of these.
POWER = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}
UNARY_POWER = 7
NAMES = ("a", "b", "c")


class Failed(Exception):
    pass


def _i64(value):
    if not I64_MIN <= value <= I64_MAX:
        raise Failed("overflow")
    return value


def reference(node, answers, calls):
    """Rust's i64 semantics written independently: quotient = sign * (|a| // |b|), remainder = a - b * q."""
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "call":
        calls.append(node[1])
        return answers[node[1]]
    if kind == "not":
        return not reference(node[1], answers, calls)
    if kind == "neg":
        return _i64(-reference(node[1], answers, calls))
    op, left = node[1], reference(node[2], answers, calls)
    if op == "&&":
        return left and reference(node[3], answers, calls)
    if op == "||":
        return left or reference(node[3], answers, calls)
    right = reference(node[3], answers, calls)
    if op in ("/", "%"):
        if right == 0:
            raise Failed("Division by zero")
        sign = -1 if (left < 0) != (right < 0) else 1
        quotient = _i64(sign * (abs(left) // abs(right)))
        return quotient if op == "/" else left - right * quotient
    return {
        "+": lambda: _i64(left + right), "-": lambda: _i64(left - right), "*": lambda: _i64(left * right),
        "==": lambda: left == right, "!=": lambda: left != right, "<": lambda: left < right,
        "<=": lambda: left <= right, ">": lambda: left > right, ">=": lambda: left >= right,
    }[op]()


def render(node, parent=0, right_side=False):
    """Source text with only the parentheses precedence and left associativity need."""
    kind = node[0]
    if kind == "lit":
        value = node[1]
        return str(value).lower() if isinstance(value, bool) else (f"-{-value}" if value < 0 else str(value))
    if kind == "call":
        return f"{node[1]}()"
    if kind in ("not", "neg"):
        return ("!" if kind == "not" else "-") + render(node[1], UNARY_POWER)
    power = POWER[node[1]]
    text = f"{render(node[2], power)} {node[1]} {render(node[3], power, right_side=True)}"
    return f"({text})" if power < parent or (power == parent and right_side) else text


# Mostly small numbers (signs and inexact divisions matter there), some at the edges of i64 (overflow).
literals = st.one_of(st.integers(-9, 9), st.integers(-9, 9), st.integers(-9, 9),
                     st.sampled_from([I64_MAX, 2**62, -(2**62), I64_MAX // 3]))
int_exprs = st.recursive(
    literals.map(lambda v: ("lit", v)),
    lambda inner: st.one_of(
        inner.map(lambda x: ("neg", x)),
        st.tuples(st.just("bin"), st.sampled_from("+-*/%"), inner, inner),
    ),
    max_leaves=8,
)
bool_exprs = st.recursive(
    st.one_of(st.booleans().map(lambda v: ("lit", v)), st.sampled_from(NAMES).map(lambda n: ("call", n)),
              st.tuples(st.just("bin"), st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), int_exprs, int_exprs)),
    lambda inner: st.one_of(
        inner.map(lambda x: ("not", x)),
        st.tuples(st.just("bin"), st.sampled_from(["&&", "||", "==", "!="]), inner, inner),
    ),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(tree=bool_exprs, answers=st.fixed_dictionaries({name: st.booleans() for name in NAMES}))
def test_expressions_evaluate_as_the_reference_evaluator(tree, answers):
    text = render(tree)
    compiled = compile_expression(text, set(NAMES))
    expected_calls, calls = [], []
    try:
        expected = reference(tree, answers, expected_calls)
    except Failed as failure:
        with pytest.raises(ExpressionError, match=str(failure).split()[0]):
            evaluate(compiled, lambda name: calls.append(name) or answers[name])
    else:
        assert evaluate(compiled, lambda name: calls.append(name) or answers[name]) is expected, text
    assert calls == expected_calls, text  # the same members, in the same order (short-circuits included)


@pytest.mark.parametrize("text,message", [
    ("a() # b()", "unexpected character '#' at position 5"),
    ("   ?", "unexpected character '?' at position 4"),
    ("a() &&", "unexpected end of expression"),
    ("(a()", "unexpected end of expression, expected `)`"),
    ("a(", "unexpected end of expression, expected `)`"),
    ("a(1)", "expected `)`, found `1`"),
    ("(a() b())", "expected `)`, found `b`"),
    ("a() )", "unexpected `)` after the end of the expression"),
    ("&& a()", "unexpected `&&`"),
    ("   ", "empty expression"),
])
def test_syntax_errors_say_what_and_where(text, message):
    with pytest.raises(ExpressionError) as error:
        compile_expression(text, {"a", "b"})
    assert str(error.value) == message
