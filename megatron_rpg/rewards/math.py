"""Rule-based correctness of math responses: extract the final answer, normalise, compare.

    extract_final_answer("... so the area is \\boxed{\\frac{1}{2}}.")   -> "\\frac{1}{2}"
    is_equivalent("\\frac{1}{2}", "0.5")                                -> True (both parse as 1/2)
    math_correctness(["... \\boxed{12}"], ["13"])                        -> tensor([False])

Extraction: the content of the last complete \\boxed{...} (or \\fbox{...}, nested braces allowed);
else the text after the last "answer is" / "answer:" (case-insensitive) up to the end of its line or
sentence; else None, which is never correct.

Normalisation (normalize_answer): strip whitespace, "$", \\left/\\right and LaTeX spacing; unwrap
\\text{..}, \\textbf{..}, \\mathrm{..}, \\mbox{..} and an enclosing \\boxed{..}; \\dfrac/\\tfrac -> \\frac;
\\frac{a}{b} and \\frac ab -> a/b (parts that are not a single number or symbol are parenthesised,
so \\frac{x+1}{2} -> (x+1)/2); \\sqrt2 -> \\sqrt{2}; drop a trailing period and the thousands
commas of a number (1,000 -> 1000).

Equivalence: numeric when both normalised answers parse as numbers (integers, decimals, exponents,
a/b of such), with |p − r| ≤ 1e-6 · max(|p|, |r|) in exact rational arithmetic; otherwise equality
of the normalised strings. Pure Python: no eval, no sympy (so x+1 and 1+x differ).

Bounded work (any model output, any dataset answer): the brace scan is one linear pass; a number
with more than MAX_NUMBER_DIGITS digits in a part (or an exponent of more than 3 digits) is compared
as a string, never built as an integer (Python refuses int() of over 4,300 digits); and each
response's check has a time budget (DEFAULT_TIME_BUDGET_S = 1 s), tested cooperatively inside every
loop: past it, score_answers reports the response as over budget (the task gives it its minimum
reward) instead of raising or running on. Nothing raises for any string.
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from fractions import Fraction

import torch

RELATIVE_TOLERANCE = Fraction(1, 10**6)
DEFAULT_TIME_BUDGET_S = 1.0
MAX_NUMBER_DIGITS = 1000  # per numerator/denominator; longer numbers compare as strings
_CHECK_EVERY = 4096  # loop iterations between two clock reads

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b\s*:?|:)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\[!,;:]|\\(?:quad|qquad)\b|\\ ")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)\b")
_FRAC_BRACED = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ATOM = re.compile(r"[+-]?(?:\w+(?:\.\w+)?|\.\d+|\\[a-zA-Z]+)")
# the exponent has at most 3 digits: Fraction("1e100000000") builds the whole integer (seconds to
# minutes for a 13-character model output); a longer exponent is compared as a string
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")
_BRACE = re.compile(r"[{}]")
_DIGIT = re.compile(r"\d")


class TimeBudgetExceeded(Exception):
    """A response's check ran past its time budget (caught by score_answers, never seen by callers)."""


class Deadline:
    """A cooperative time budget: check() raises TimeBudgetExceeded once `seconds` have passed."""

    def __init__(self, seconds: float = DEFAULT_TIME_BUDGET_S):
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeBudgetExceeded


_NO_DEADLINE = Deadline(float("inf"))


def _closing_braces(text: str, deadline: Deadline = _NO_DEADLINE) -> dict[int, int]:
    """{position of "{": position of its matching "}"} for every brace that closes; one linear pass."""
    open_braces, closing = [], {}
    for count, brace in enumerate(_BRACE.finditer(text)):
        if count % _CHECK_EVERY == 0:
            deadline.check()
        if brace[0] == "{":
            open_braces.append(brace.start())
        elif open_braces:  # a "}" with nothing open closes nothing
            closing[open_braces.pop()] = brace.start()
    return closing


def last_boxed_content(text: str, deadline: Deadline = _NO_DEADLINE) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} whose braces close; None if there is none."""
    starts = [match.end() - 1 for match in _BOXED.finditer(text)]
    if not starts:
        return None
    closing = _closing_braces(text, deadline)
    for open_brace in reversed(starts):
        if open_brace in closing:
            return text[open_brace + 1:closing[open_brace]]
    return None


def extract_final_answer(response: str, deadline: Deadline = _NO_DEADLINE) -> str | None:
    """The final answer of a response: last complete \\boxed{}, else the last "answer is X" /
    "Answer: X" (X up to the end of its line or sentence), else None."""
    boxed = last_boxed_content(response, deadline)
    if boxed is not None:
        return boxed
    last_phrase = None
    for count, last_phrase in enumerate(_ANSWER_PHRASE.finditer(response)):
        if count % _CHECK_EVERY == 0:
            deadline.check()
    if last_phrase is None:
        return None
    tail = response[last_phrase.end():].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(tail)
    answer = (tail[:sentence_end.start()] if sentence_end else tail).strip()
    return answer or None


def _fraction_part(part: str) -> str:
    return part if _ATOM.fullmatch(part) else f"({part})"


def normalize_answer(answer: str, deadline: Deadline = _NO_DEADLINE) -> str:
    """The canonical string form of an answer (see the module docstring for the rules)."""
    text = answer.strip()
    wrapper = _BOXED.match(text)
    if wrapper:  # a reference written as \boxed{...}: only when the braces close at the very end
        if _closing_braces(text, deadline).get(wrapper.end() - 1) == len(text) - 1:
            text = text[wrapper.end():-1]
    text = _LEFT_RIGHT.sub("", text)
    text = _LATEX_SPACING.sub("", text)
    previous = None
    while previous != text:  # nested \text{..} unwrap from the inside out
        deadline.check()
        previous, text = text, _TEXT_COMMAND.sub(r"\1", text)
    text = text.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split()).rstrip(".")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    previous = None
    while previous != text:  # innermost \frac first
        deadline.check()
        previous = text
        text = _FRAC_BRACED.sub(lambda m: f"{_fraction_part(m[1])}/{_fraction_part(m[2])}", text)
    return text


def parse_number(text: str) -> Fraction | None:
    """The exact value of a normalised answer that is a number ("-3", "0.50", "1e-3", "1/2",
    "-1.5/3"), else None (also for a zero denominator, and for a part of more than
    MAX_NUMBER_DIGITS digits: such numbers compare as strings)."""
    numerator, slash, denominator = text.partition("/")
    parts = (numerator, denominator) if slash else (numerator,)
    if not all(_DECIMAL.fullmatch(part) for part in parts):
        return None
    if any(len(_DIGIT.findall(part)) > MAX_NUMBER_DIGITS for part in parts):
        return None
    try:
        value = Fraction(numerator)
        divisor = Fraction(denominator) if slash else Fraction(1)
    except ValueError:  # a lowered sys.set_int_max_str_digits: too long to build, compare as strings
        return None
    if divisor == 0:
        return None
    return value / divisor


def is_equivalent(predicted: str | None, reference: str, deadline: Deadline = _NO_DEADLINE) -> bool:
    """Whether a predicted final answer equals the reference: numerically (relative 1e-6) when both
    normalise to numbers, else as normalised strings. None or an empty answer is never equivalent."""
    if predicted is None:
        return False
    predicted_form = normalize_answer(predicted, deadline)
    reference_form = normalize_answer(reference, deadline)
    if not predicted_form:
        return False
    predicted_value, reference_value = parse_number(predicted_form), parse_number(reference_form)
    if predicted_value is not None and reference_value is not None:
        scale = max(abs(predicted_value), abs(reference_value))
        return abs(predicted_value - reference_value) <= RELATIVE_TOLERANCE * scale
    return predicted_form == reference_form


def score_answers(response_texts: Sequence[str], answers: Sequence[str], *,
                  time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct [n] bool, over_budget [n] bool): each response checked against answers[i] within its
    own time budget; a response whose check ran past it is over budget (and not correct)."""
    if len(response_texts) != len(answers):
        raise ValueError(f"got {len(response_texts)} responses but {len(answers)} answers; pass one "
                         f"reference answer per response")
    if not time_budget_s > 0:
        raise ValueError(f"time_budget_s={time_budget_s} must be > 0 seconds")
    correct, over_budget = [], []
    for text, answer in zip(response_texts, answers):
        deadline = Deadline(time_budget_s)
        try:
            correct.append(is_equivalent(extract_final_answer(text, deadline), str(answer), deadline))
            over_budget.append(False)
        except TimeBudgetExceeded:
            correct.append(False)
            over_budget.append(True)
    return torch.tensor(correct, dtype=torch.bool), torch.tensor(over_budget, dtype=torch.bool)


def math_correctness(response_texts: Sequence[str], answers: Sequence[str], *,
                     time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> torch.Tensor:
    """Bool tensor [n]: whether the final answer extracted from response i equals answers[i] (False
    for a response whose check ran past its time budget; score_answers says which)."""
    return score_answers(response_texts, answers, time_budget_s=time_budget_s)[0]
