"""
The chat tool: upstream's calculator (`use_calculator` in `nanochat/engine.py @92d63d4`), without eval.

What the model writes between <|python_start|> and <|python_end|> is evaluated here, and the engine's
tool loop forces `<|output_start|> str(result) <|output_end|>` after it (../shared/docs/UPSTREAM_OUTPUTS.md
§7). Upstream's acceptance rules are kept: commas removed; an expression of digits, `*+-/.() ` only
(no `**`) is arithmetic; otherwise only letters, digits, quotes, parentheses, `.`, `_` and spaces, no
dangerous word, and it must contain `.count(`. Results print as Python prints them (12/60 -> 0.2,
10/2 -> 5.0, 7*3 -> 21); any error gives None, and then nothing is injected.

Where we are stricter than upstream: nothing is passed to eval. The expression is parsed with `ast` and
only number literals, + - * / // (binary), + - (unary), parentheses and `"literal".count("literal")`
are evaluated; upstream also ran other str methods when `.count(` appeared somewhere (e.g.
`"ab".upper().count("A")`) and guarded with a 3 s SIGALRM, which cannot interrupt a long C call and
only works in the main thread. Here the time is bounded instead: at most MAX_CHARS characters and no
exponentiation, so every result has O(MAX_CHARS) digits.

Torch-free, no I/O.
"""

from __future__ import annotations

import ast
import operator

MAX_CHARS = 400  # longer tool calls are refused (the model's, so this is never a real limit)
ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
STRING_EXTRA_CHARS = frozenset("'\"()._ ")
DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals", "locals",
             "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    pass


def use_calculator(expr: str) -> int | float | None:
    """The value of a tool call, or None when upstream's rules refuse it or it fails (e.g. 1/0)."""
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if not expr.strip() or len(expr) > MAX_CHARS:
        return None
    if all(c in ARITHMETIC_CHARS for c in expr):
        if "**" in expr:
            return None
        string_mode = False
    else:
        if not all(c.isalnum() or c in STRING_EXTRA_CHARS for c in expr):
            return None
        low = expr.lower()
        if any(word in low for word in DANGEROUS) or ".count(" not in expr:
            return None
        string_mode = True
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _eval(tree.body, string_mode)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, _Refused, RecursionError):
        return None


def _eval(node: ast.AST, string_mode: bool):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY and not string_mode:
        return _BINARY[type(node.op)](_eval(node.left, string_mode), _eval(node.right, string_mode))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY and not string_mode:
        return _UNARY[type(node.op)](_eval(node.operand, string_mode))
    if (string_mode and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and not node.keywords and len(node.args) == 1):  # commas are gone, so one argument at most
        needle = node.args[0]
        if not (isinstance(needle, ast.Constant) and isinstance(needle.value, str)):
            raise _Refused
        return node.func.value.value.count(needle.value)
    raise _Refused
