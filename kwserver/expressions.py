"""Policy-group expressions: a small, safe boolean language (no `eval`).

The reference server evaluates group expressions with an expression-only Rhai engine. This is the
subset that makes sense there: `true`/`false`, integers, `!`, `&&`, `||` (short-circuit), comparisons,
integer arithmetic, parentheses, and zero-argument calls naming group members (`pod_privileged()`).

Integers are Rhai's: 64-bit signed, with checked arithmetic. `/` truncates toward zero and `%` takes
the sign of the dividend (as in Rust: `-7 / 2 == -3`, `-7 % 2 == -1`); division by zero and overflow
are evaluation errors, as in the reference.

Expressions are parsed and type-checked once, at startup, so a typo is a configuration error rather
than a rejection at request time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

BOOL, INT = "bool", "int"
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class ExpressionError(ValueError):
    """The expression cannot be parsed, does not type-check, or failed to evaluate."""


@dataclass(frozen=True)
class Literal:
    value: bool | int


@dataclass(frozen=True)
class Call:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


Node = Literal | Call | Unary | Binary

_TOKEN = re.compile(
    r"\s*(?:(?P<int>\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>&&|\|\||==|!=|<=|>=|[!<>()+\-*/%]))"
)

# Binding power of binary operators, lowest first, as in Rhai.
_PRECEDENCE = {
    "||": 1, "&&": 2,
    "==": 3, "!=": 3, "<": 4, "<=": 4, ">": 4, ">=": 4,
    "+": 5, "-": 5, "*": 6, "/": 6, "%": 6,
}
_COMPARISON = {"==", "!=", "<", "<=", ">", ">="}


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            at = len(text) - len(text[pos:].lstrip())  # the character itself, not the blanks before it
            raise ExpressionError(f"unexpected character {text[at]!r} at position {at + 1}")
        tokens.append(match.group(match.lastgroup))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression" + (f", expected `{expected}`" if expected else ""))
        if expected is not None and token != expected:
            raise ExpressionError(f"expected `{expected}`, found `{token}`")
        self.pos += 1
        return token

    def expression(self, min_power: int = 1) -> Node:
        left = self.unary()
        while (op := self.peek()) in _PRECEDENCE and _PRECEDENCE[op] >= min_power:
            self.take()
            right = self.expression(_PRECEDENCE[op] + 1)
            left = Binary(op, left, right)
        return left

    def unary(self) -> Node:
        token = self.take()
        if token in ("!", "-"):
            return Unary(token, self.unary())
        if token == "(":
            inner = self.expression()
            self.take(")")
            return inner
        if token.isdigit():
            value = int(token)
            if value > INT_MAX:
                raise ExpressionError(f"integer literal {token} is too large (at most {INT_MAX})")
            return Literal(value)
        if token in ("true", "false"):
            return Literal(token == "true")
        if token[0].isalpha() or token[0] == "_":
            self.take("(")
            self.take(")")
            return Call(token)
        raise ExpressionError(f"unexpected `{token}`")


def parse(text: str) -> Node:
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens)
    tree = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected `{parser.peek()}` after the end of the expression")
    return tree


def _type_of(node: Node, functions: Collection[str]) -> str:
    if isinstance(node, Literal):
        return BOOL if isinstance(node.value, bool) else INT
    if isinstance(node, Call):
        if node.name not in functions:
            raise ExpressionError(f"Function not found: {node.name} ()")
        return BOOL
    if isinstance(node, Unary):
        operand = _type_of(node.operand, functions)
        wanted = BOOL if node.op == "!" else INT
        if operand != wanted:
            raise ExpressionError(f"operator `{node.op}` cannot be applied to {operand}")
        return operand
    left, right = _type_of(node.left, functions), _type_of(node.right, functions)
    if node.op in ("&&", "||"):
        if left != BOOL or right != BOOL:
            raise ExpressionError(f"operator `{node.op}` needs two booleans, found {left} and {right}")
        return BOOL
    if left != right:
        raise ExpressionError(f"operator `{node.op}` cannot combine {left} and {right}")
    if node.op in ("==", "!="):
        return BOOL
    if left != INT:
        raise ExpressionError(f"operator `{node.op}` needs integers, found {left}")
    return BOOL if node.op in _COMPARISON else INT


def compile_expression(text: str, functions: Collection[str]) -> Node:
    """Parse and type-check: every call names a known function and the result is a boolean."""
    tree = parse(text)
    if _type_of(tree, functions) != BOOL:
        raise ExpressionError("the expression does not evaluate to a boolean")
    return tree


def evaluate(node: Node, call: Callable[[str], bool]) -> bool | int:
    """Evaluate a compiled tree; `call(name)` runs one member. `&&` and `||` short-circuit."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Call):
        return call(node.name)
    if isinstance(node, Unary):
        value = evaluate(node.operand, call)
        if node.op == "!":
            return not value
        return _checked(-value, f"Negation overflow: -({value})")
    if node.op == "&&":
        return bool(evaluate(node.left, call)) and bool(evaluate(node.right, call))
    if node.op == "||":
        return bool(evaluate(node.left, call)) or bool(evaluate(node.right, call))
    left, right = evaluate(node.left, call), evaluate(node.right, call)
    match node.op:
        case "==":
            return left == right
        case "!=":
            return left != right
        case "<":
            return left < right
        case "<=":
            return left <= right
        case ">":
            return left > right
        case ">=":
            return left >= right
    return _arithmetic(node.op, left, right)


def _checked(value: int, overflow: str) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise ExpressionError(overflow)
    return value


def truncating_divmod(left: int, right: int) -> tuple[int, int]:
    """Integer division rounded toward zero and its remainder (sign of the dividend), as Rust and Rhai."""
    quotient = left // right
    if quotient < 0 and quotient * right != left:
        quotient += 1  # Python floors; toward zero is one up for inexact negative quotients
    return quotient, left - quotient * right


def _arithmetic(op: str, left: int, right: int) -> int:
    text = f"{left} {op} {right}"
    match op:
        case "+":
            return _checked(left + right, f"Addition overflow: {text}")
        case "-":
            return _checked(left - right, f"Subtraction overflow: {text}")
        case "*":
            return _checked(left * right, f"Multiplication overflow: {text}")
    if right == 0:
        raise ExpressionError(f"Division by zero: {text}")
    quotient, remainder = truncating_divmod(left, right)
    _checked(quotient, f"{'Division' if op == '/' else 'Modulo'} overflow: {text}")  # MIN / -1, as Rust's checked ops
    return quotient if op == "/" else remainder
