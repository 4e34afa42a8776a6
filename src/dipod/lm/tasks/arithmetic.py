"""A safe evaluator for the arithmetic expressions that Countdown answers are made of.

Grammar (no unary minus, no exponent, integers only):

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := INTEGER | "(" expr ")"

Model output is untrusted, so the text is tokenised and parsed here into a small tree; nothing is
ever handed to ``eval``. Every resource is bounded before it is spent: the text length
(`MAX_CHARS`), the digits per literal (`MAX_DIGITS`), the parenthesis depth (`MAX_DEPTH`) and the
size of every intermediate result (`MAX_MAGNITUDE` on numerator and denominator). Arithmetic is
exact (`fractions.Fraction`), so ``(100-93)*30/30`` equals ``7`` with no rounding tolerance.
Any violation raises `ExpressionError` (a ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DIGITS = 6
MAX_DEPTH = 32
MAX_MAGNITUDE = 10**12
OPERATORS = "+-*/"


class ExpressionError(ValueError):
    """The text is not a well-formed, bounded expression, or cannot be evaluated."""


@dataclass(frozen=True)
class Node:
    """A literal (`op` is None, `value` set) or a binary operation on `left` and `right`."""

    op: str | None
    value: int = 0
    left: "Node | None" = None
    right: "Node | None" = None


def _tokens(text: str) -> list[str]:
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "0123456789":  # ASCII only: str.isdigit would accept other scripts' digits
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            if j - i > MAX_DIGITS:
                raise ExpressionError(f"number with more than {MAX_DIGITS} digits")
            tokens.append(text[i:j])
            i = j
        elif char in OPERATORS or char in "()":
            tokens.append(char)
            i += 1
        elif char in " \t\n":
            i += 1
        else:
            raise ExpressionError(f"unexpected character {char!r}")
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Node:
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            node = Node(op, left=node, right=self.term(depth))
        return node

    def term(self, depth: int) -> Node:
        node = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            node = Node(op, left=node, right=self.factor(depth))
        return node

    def factor(self, depth: int) -> Node:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            node = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return node
        if token.isdigit():
            return Node(None, value=int(token))
        raise ExpressionError(f"expected a number or '(', got {token!r}")


def parse_expression(text: str) -> Node:
    """Parse `text` into a tree; raises ExpressionError on anything outside the grammar."""
    parser = _Parser(_tokens(text))
    root = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return root


def literals(node: Node) -> list[int]:
    """The integer literals of the tree, left to right."""
    if node.op is None:
        return [node.value]
    return literals(node.left) + literals(node.right)


def evaluate(node: Node) -> Fraction:
    """Exact value of the tree; raises ExpressionError on division by zero or overflow."""
    if node.op is None:
        return Fraction(node.value)
    left, right = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        value = left + right
    elif node.op == "-":
        value = left - right
    elif node.op == "*":
        value = left * right
    else:
        if right == 0:
            raise ExpressionError("division by zero")
        value = left / right
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise ExpressionError(f"intermediate result beyond {MAX_MAGNITUDE}")
    return value
