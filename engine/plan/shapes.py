"""Shape expressions: integer arithmetic over named symbols, evaluated without ``eval``."""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow}


class ShapeExpressionError(ValueError):
    """An expression uses something other than integers, symbols and + - * // % **."""


def evaluate(expression: int | str, symbols: Mapping[str, int]) -> int:
    """Value of one dimension: ``"(num_frames - 1) // t_scale + 1"`` with ``symbols``."""
    if isinstance(expression, int):
        return expression
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ShapeExpressionError(f"invalid shape expression {expression!r}: {exc.msg}") from None
    return _eval(tree.body, expression, symbols)


def _eval(node: ast.AST, text: str, symbols: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in symbols:
            raise ShapeExpressionError(f"shape expression {text!r}: unknown symbol {node.id!r} (known: {', '.join(sorted(symbols))})")
        return int(symbols[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, text, symbols), _eval(node.right, text, symbols))
    raise ShapeExpressionError(f"shape expression {text!r}: only integers, symbols and + - * // % ** are allowed")


def evaluate_shape(shape: tuple[int | str, ...], symbols: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(evaluate(dim, symbols) for dim in shape)
