"""Final-answer extraction, normalisation and equivalence of math responses (rewards/math.py)."""
from fractions import Fraction

import pytest
import torch

from megatron_rpg.rewards.math import (extract_final_answer, is_equivalent, last_boxed_content,
                                       math_correctness, normalize_answer, parse_number)


@pytest.mark.parametrize("response, answer", [
    ("so \\boxed{12}", "12"),
    ("first \\boxed{1}, then finally \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left\\{ x^{2} \\right\\}}", "\\left\\{ x^{2} \\right\\}"),     # nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and a cut-off \\boxed{\\frac{1}{", "3"),                    # last *complete* box
    ("Thus the answer is 0.5.", "0.5"),
    ("The final answer is: $\\frac{1}{2}$. Let me check.", "$\\frac{1}{2}$"),
    ("Answer: 42\nsome trailing text", "42"),
    ("answer is 1 here; but wait, Answer: 3", "3"),                          # the last phrase
    ("I have no idea.", None),
    ("\\boxed{unclosed", None),
])
def test_the_final_answer_is_the_last_box_else_the_last_answer_phrase_else_none(response, answer):
    assert extract_final_answer(response) == answer


def test_a_box_wins_over_an_answer_phrase_after_it():
    assert extract_final_answer("\\boxed{5}. So the answer is 6") == "5"
    assert last_boxed_content("no box") is None


@pytest.mark.parametrize("raw, normalized", [
    ("  $12$ ", "12"),
    ("\\text{ 5 } cm.", "5cm"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\tfrac34", "3/4"),
    ("\\frac{x+1}{2}", "(x+1)/2"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("1,000,000", "1000000"),
    ("1,2", "1,2"),                         # a pair, not a number with thousands commas
    ("\\boxed{7}", "7"),
    ("2\\sqrt3", "2\\sqrt{3}"),
])
def test_normalisation_removes_notation_that_does_not_change_the_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("text, value", [("0.50", Fraction(1, 2)), ("-3", Fraction(-3)), ("1/2", Fraction(1, 2)),
                                         ("-1.5/3", Fraction(-1, 2)), ("1e-3", Fraction(1, 1000)),
                                         ("x", None), ("1/0", None), ("(1,2)", None), ("1/2/3", None)])
def test_numbers_parse_exactly_and_non_numbers_do_not(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("predicted, reference", [
    ("\\frac{1}{2}", "0.5"), ("0.50", "1/2"), ("\\dfrac12", ".5"), ("1,000", "1000"), ("12.", "12"),
    ("\\text{5}", "5"), ("$-\\frac{3}{4}$", "-0.75"), ("\\frac{-3}{4}", "-3/4"),
    ("0.3333333", "1/3"),                                   # within relative 1e-6
    ("\\frac{x+1}{2}", "(x+1)/2"), ("\\left(1,2\\right)", "(1, 2)"), ("\\sqrt2", "\\sqrt{2}"),
])
def test_equivalent_answers_are_accepted(predicted, reference):
    assert is_equivalent(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("12", "13"), ("0.333", "1/3"), ("1/2", "2"), ("-0.5", "0.5"), ("0", "1e-7"),
    ("x+1", "1+x"),                                         # no algebra: different strings
    ("(1,2)", "(2,1)"), ("", "0"), (None, "0"), ("$ $", "0"),
])
def test_different_answers_are_rejected(predicted, reference):
    assert not is_equivalent(predicted, reference)


def test_math_correctness_scores_each_response_against_its_answer():
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{12}", "Answer: 1,000", "no final answer", "\\boxed{13}"]
    answers = ["0.5", "13", "1000", "0", "3"]
    correct = math_correctness(responses, answers)
    assert correct.dtype == torch.bool
    assert correct.tolist() == [True, False, True, False, False]


def test_math_correctness_rejects_a_count_mismatch():
    with pytest.raises(ValueError, match="got 2 responses but 1 answers"):
        math_correctness(["a", "b"], ["1"])


def test_numbers_with_huge_exponents_are_compared_as_strings_not_expanded():
    from fractions import Fraction

    from megatron_rpg.rewards.math import is_equivalent, parse_number

    assert parse_number("1e-3") == Fraction(1, 1000) and parse_number("2.5e2") == 250
    assert parse_number("1e100000000") is None  # Fraction would build a 100-million-digit integer
    assert not is_equivalent("1e100000000", "1") and is_equivalent("1e100000000", "1e100000000")
