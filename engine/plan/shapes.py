"""Shape expressions: integer arithmetic over named symbols, evaluated without ``eval``."""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
#: No dimension, intermediate value included, reaches this: it bounds the work (``9 ** 9 ** 9``) and the bytes.
LIMIT = 2**63
#: Longest expression accepted (the parser recurses once per operator).
MAX_LENGTH = 500


class ShapeExpressionError(ValueError):
    """An expression uses something other than integers, symbols and + - * // % **."""


def evaluate(expression: int | str, symbols: Mapping[str, int]) -> int:
    """Value of one dimension: ``"(num_frames - 1) // t_scale + 1"`` with ``symbols``."""
    if isinstance(expression, int) and not isinstance(expression, bool):
        return expression
    if not isinstance(expression, str):
        raise ShapeExpressionError(f"a shape dimension is an integer or an expression, got {expression!r}")
    if len(expression) > MAX_LENGTH:
        raise ShapeExpressionError(f"shape expression {expression[:40]!r}...: longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError) as exc:  # ValueError: a null byte
        raise ShapeExpressionError(f"invalid shape expression {expression!r}: {getattr(exc, 'msg', exc)}") from None
    except (RecursionError, MemoryError):
        raise ShapeExpressionError(f"shape expression {expression[:40]!r}: nested too deeply") from None
    try:
        return _eval(tree.body, expression, symbols)
    except RecursionError:
        raise ShapeExpressionError(f"shape expression {expression[:40]!r}: nested too deeply") from None


def _eval(node: ast.AST, text: str, symbols: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return _bounded(node.value, text)
    if isinstance(node, ast.Name):
        if node.id not in symbols:
            raise ShapeExpressionError(f"shape expression {text!r}: unknown symbol {node.id!r} (known: {', '.join(sorted(symbols))})")
        return _bounded(int(symbols[node.id]), text)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, text, symbols))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, text, symbols), _eval(node.right, text, symbols)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise ShapeExpressionError(f"shape expression {text!r}: division by zero")
        if isinstance(node.op, ast.Pow):
            if right < 0:
                raise ShapeExpressionError(f"shape expression {text!r}: a negative exponent does not give an integer")
            if abs(left) > 1 and right >= LIMIT.bit_length():  # the power alone would pass LIMIT
                raise ShapeExpressionError(f"shape expression {text!r}: a value past 2**63")
        return _bounded(_BINARY[type(node.op)](left, right), text)
    raise ShapeExpressionError(f"shape expression {text!r}: only integers, symbols, unary minus and + - * // % ** are allowed")


def _bounded(value: int, text: str) -> int:
    if abs(value) >= LIMIT:
        raise ShapeExpressionError(f"shape expression {text!r}: a value past 2**63")
    return value


def evaluate_shape(shape: tuple[int | str, ...], symbols: Mapping[str, int]) -> tuple[int, ...]:
    """Every dimension of ``shape``; a negative dimension is an error."""
    dims = tuple(evaluate(dim, symbols) for dim in shape)
    if any(dim < 0 for dim in dims):
        raise ShapeExpressionError(f"shape {shape!r} gives a negative dimension {dims} with {dict(symbols)}")
    return dims
