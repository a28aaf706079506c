"""The chat tool's calculator: upstream's accepted expressions and results, and nothing else evaluated."""

import pytest

from nanochat.calculator import MAX_CHARS, use_calculator


@pytest.mark.parametrize("expr, value", [
    ("12/60", 0.2), ("10/2", 5.0), ("7*3", 21), ("1,000+1", 1001), ('"strawberry".count("r")', 3),
    ("(2+3)*4", 20), ("-3 + +2", -1), ("7//2", 3), (" 1.5*2 ", 3.0),
    ("'a'.count('a', 'b')", 0),  # commas go first: 'a' 'b' is one literal 'ab', as upstream's eval reads it
])
def test_upstream_examples_and_arithmetic(expr, value):
    got = use_calculator(expr)
    assert got == value and type(got) is type(value) and str(got) == str(value)


@pytest.mark.parametrize("expr", [
    "2**10", "abs(-3)", "1/0", "", "   ", "1+", "(1)(2)", "2 % 3", "__import__('os')", "open('x').count('a')",
    '"a".upper().count("A")', '"ab".count(x)', "x.count('a')", "'banana'.count('an', 2)", "'abc'.count('a') + 1",
    "eval('1').count('1')", "'a'.zfill(10).count('0')", "1" * (MAX_CHARS + 1), None, 12,
])
def test_refused_or_failing_expressions_give_none(expr):
    assert use_calculator(expr) is None
