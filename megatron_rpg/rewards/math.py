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
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

import torch

RELATIVE_TOLERANCE = Fraction(1, 10**6)

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


def _braced_content(text: str, open_brace: int) -> str | None:
    """The text between text[open_brace] == "{" and its matching "}", or None if it is never closed."""
    depth = 0
    for position in range(open_brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:position]
    return None


def last_boxed_content(text: str) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} whose braces close; None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        content = _braced_content(text, match.end() - 1)
        if content is not None:
            return content
    return None


def extract_final_answer(response: str) -> str | None:
    """The final answer of a response: last complete \\boxed{}, else the last "answer is X" /
    "Answer: X" (X up to the end of its line or sentence), else None."""
    boxed = last_boxed_content(response)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(response))
    if not phrases:
        return None
    tail = response[phrases[-1].end():].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(tail)
    answer = (tail[:sentence_end.start()] if sentence_end else tail).strip()
    return answer or None


def _fraction_part(part: str) -> str:
    return part if _ATOM.fullmatch(part) else f"({part})"


def normalize_answer(answer: str) -> str:
    """The canonical string form of an answer (see the module docstring for the rules)."""
    text = answer.strip()
    wrapper = _BOXED.match(text)
    if wrapper:  # a reference written as \boxed{...}: only when the braces close at the very end
        content = _braced_content(text, wrapper.end() - 1)
        if content is not None and wrapper.end() + len(content) + 1 == len(text):
            text = content
    text = _LEFT_RIGHT.sub("", text)
    text = _LATEX_SPACING.sub("", text)
    previous = None
    while previous != text:  # nested \text{..} unwrap from the inside out
        previous, text = text, _TEXT_COMMAND.sub(r"\1", text)
    text = text.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split()).rstrip(".")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    previous = None
    while previous != text:  # innermost \frac first
        previous = text
        text = _FRAC_BRACED.sub(lambda m: f"{_fraction_part(m[1])}/{_fraction_part(m[2])}", text)
    return text


def parse_number(text: str) -> Fraction | None:
    """The exact value of a normalised answer that is a number ("-3", "0.50", "1e-3", "1/2",
    "-1.5/3"), else None (also for a zero denominator)."""
    numerator, slash, denominator = text.partition("/")
    if not _DECIMAL.fullmatch(numerator) or (slash and not _DECIMAL.fullmatch(denominator)):
        return None
    value = Fraction(numerator)
    if slash:
        divisor = Fraction(denominator)
        if divisor == 0:
            return None
        value /= divisor
    return value


def is_equivalent(predicted: str | None, reference: str) -> bool:
    """Whether a predicted final answer equals the reference: numerically (relative 1e-6) when both
    normalise to numbers, else as normalised strings. None or an empty answer is never equivalent."""
    if predicted is None:
        return False
    predicted_form, reference_form = normalize_answer(predicted), normalize_answer(reference)
    if not predicted_form:
        return False
    predicted_value, reference_value = parse_number(predicted_form), parse_number(reference_form)
    if predicted_value is not None and reference_value is not None:
        scale = max(abs(predicted_value), abs(reference_value))
        return abs(predicted_value - reference_value) <= RELATIVE_TOLERANCE * scale
    return predicted_form == reference_form


def math_correctness(response_texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Bool tensor [n]: whether the final answer extracted from response i equals answers[i]."""
    if len(response_texts) != len(answers):
        raise ValueError(f"got {len(response_texts)} responses but {len(answers)} answers; pass one "
                         f"reference answer per response")
    return torch.tensor([is_equivalent(extract_final_answer(text), str(answer))
                         for text, answer in zip(response_texts, answers)], dtype=torch.bool)
