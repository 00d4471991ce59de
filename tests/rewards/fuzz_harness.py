"""The reward fuzzer's inputs and calls (tests/rewards/test_fuzz.py, tools/chaos/fuzz_rewards.py).

    strings = adversarial_strings(count=1200, seed=0, large=True)    # deterministic for (count, seed)
    records = fuzz_rewards(strings)                                   # one FuzzRecord per reward call

The list starts with fixed families (deep braces, huge numbers, unclosed \\boxed{, unicode digits,
code-like text, NaN/inf spellings, ...), then fills up to `count` with seeded random splices of
fragments. `large=False` leaves out the few strings of ≥ 10^5 characters. Code-like strings would,
if evaluated, create the file named by CANARY_FILE_ENV or set the builtin CANARY_GLOBAL: the
fuzzer checks that neither happened.
"""
from __future__ import annotations

import dataclasses
import random
import time

CANARY_FILE_ENV = "RPG_FUZZ_CANARY"  # environment variable holding the canary file's path
CANARY_GLOBAL = "RPG_FUZZ_EVALUATED"

ARABIC_INDIC = "٠١٢٣٤٥٦٧٨٩"
FULLWIDTH = "０１２３４５６７８９"
DEVANAGARI = "०१२३४५६७८९"

FRAGMENTS = ("\\boxed{", "\\fbox{", "}", "{", "\\frac", "\\dfrac{", "\\sqrt", "\\text{", "\\left(", "\\right)",
             "answer is ", "Answer: ", "$", ".", ",", "-", "+", "/", "e", "E", "0", "1", "9", "12", "3.14",
             "1e309", "-0", "nan", "inf", "\x00", "\ud800", "\\", " ", "\n", "\\,", "\\!", "\\quad",
             ARABIC_INDIC[:3], FULLWIDTH[:3], "∞", "½", "²", "x", "\\pi", "__import__", "(", ")", "'", "\"")


def code_strings() -> list[str]:
    """Text that does something observable if anything evaluates it."""
    create = (f"__import__('pathlib').Path(__import__('os').environ['{CANARY_FILE_ENV}']).write_text('x')")
    set_global = f"__import__('builtins').__setattr__('{CANARY_GLOBAL}', True)"
    strings = []
    for payload in (create, set_global, f"exec(\"{set_global}\")", f"eval(\"{create}\")",
                    "__import__('os').system('touch /tmp/rpg_fuzz_system')", "().__class__.__base__.__subclasses__()",
                    "lambda: 0", "1 if True else 0", "__builtins__", "open('/etc/passwd').read()"):
        strings += [payload, f"\\boxed{{{payload}}}", f"The answer is {payload}", f"Answer: {payload}\n",
                    f"$\\boxed{{{payload}}}$ and \\boxed{{1}}", f"\\boxed{{\\text{{{payload}}}}}"]
    return strings


def _number_strings(large: bool) -> list[str]:
    # around Python's int-string limit (4,300 digits)
    digits = ["9" * 4299, "1" + "0" * 4299 + "7", "1" + "0" * 4300 + "1", "4" * 4301, "7" * 5000]
    if large:
        digits.append("3" * 100_000)
    strings = []
    for number in digits:
        strings += [number, f"\\boxed{{{number}}}", f"\\boxed{{{number}/3}}", f"\\boxed{{1/{number}}}",
                    f"\\boxed{{\\frac{{{number}}}{{{number}}}}}", f"\\boxed{{0.{number}}}",
                    f"\\boxed{{{number}.5}}", f"\\boxed{{{number}e999}}", f"\\boxed{{-{number}}}",
                    f"The answer is {number}."]
    for exponent in ("1e309", "1e-309", "1e999", "1e-999", "1e1000", "1e100000000", "-1e309", "1E+308",
                     "9" * 20 + "e999", "1e0999", "1e-0", "2.5e2", ".5e-3", "1.e5"):
        strings += [exponent, f"\\boxed{{{exponent}}}", f"\\boxed{{{exponent}/{exponent}}}",
                    f"\\boxed{{\\frac{{{exponent}}}{{3}}}}"]
    for special in ("\\frac{1}{0}", "1/0", "0/0", "\\frac{0}{0}", "\\frac{1}{-0}", "\\frac{1}{0.0}", "1/0e5",
                    "\\sqrt{-1}", "\\sqrt{}", "\\frac{}{}", "\\frac{1}", "\\frac", "-0", "+0", "-0.0", "0e0",
                    "00000", "-", "+", ".", "/", "//", "1//2", "1/2/3", "1,000", "1,000,000.5", ",", "1,00"):
        strings += [special, f"\\boxed{{{special}}}", f"The answer is {special}."]
    for spelling in ("nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "INF", "∞", "-∞",
                     "\\infty", "-\\infty", "1e309", "float('nan')", "float('inf')", "NAN", "sNaN", "nan(0x1)"):
        strings += [spelling, f"\\boxed{{{spelling}}}"]
    return strings


def _unicode_strings() -> list[str]:
    strings = []
    for digits in (ARABIC_INDIC, FULLWIDTH, DEVANAGARI, "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗"):
        strings += [digits, f"\\boxed{{{digits}}}", f"\\boxed{{{digits[1]}/{digits[2]}}}",
                    f"\\boxed{{{digits[3]}.{digits[1]}e{digits[2]}}}", f"\\boxed{{{digits * 500}}}",
                    f"\\boxed{{{digits[1] * 4400}}}", f"The answer is {digits[4]}{digits[2]}."]
    for odd in ("\x00", "\x00" * 1000, "\\boxed{\x00}", "\\boxed{1\x00}", "\ud800", "\\boxed{\udfff}",
                "\\boxed{\ud83d\ude00}", "\ufeff\\boxed{1}", "\\boxed{1\u200b}", "\u202e\\boxed{2}", "½",
                "\\boxed{½}", "\\boxed{²}", "\\boxed{Ⅻ}", "\\boxed{\u0661\u0662}", "\r\n\\boxed{3}\r", "\t\\boxed{ 4 }\v",
                "\x1b[31m\\boxed{5}", "\\boxed{\\u0031}", "\U0010ffff" * 100, "é" * 1000):
        strings += [odd, f"The answer is {odd}"]
    return strings


def _structure_strings(large: bool) -> list[str]:
    strings = []
    sizes = (10, 100, 1000, 10_000) + ((100_000,) if large else ())
    for n in sizes:
        strings += ["\\boxed{" * n, "\\boxed{" * n + "1", "{" * n + "}" * n, "\\boxed{" + "{" * n + "1" + "}" * (n + 1),
                    "\\boxed{1}" * n, "}" * n + "\\boxed{2}", "\\boxed{" + "{" * n, "\\frac{" * n + "1" + "}{2}" * n,
                    "\\text{" * n + "1" + "}" * n, "\\boxed{" + "\\text{" * n + "1" + "}" * (n + 1),
                    "\\boxed{" + "\\frac{" * n + "1" + "}{2}" * n + "}", "answer is " * n, "\\left(" * n,
                    "\\boxed{" + "\\sqrt" * n + "2}", "\\boxed{" + "(" * n + ")" * n + "}", "1," * n + "000",
                    "\\boxed{" + "1,000" * n + "}", "\\boxed{" + "-" * n + "1}", "$" * n + "\\boxed{1}" + "$" * n]
    if large:
        strings += ["a" * 1_000_000, "\\boxed{" + "a" * 1_000_000 + "}", "{" * 1_000_000,
                    "\\boxed{" + "9" * 1_000_000 + "}", "answer is " + " " * 1_000_000 + "1"]
    for macro in ("\\displaystyle", "\\mathbf{1}", "\\operatorname{x}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
                  "\\def\\x{1}\\x", "\\newcommand{\\a}{2}", "\\input{/etc/passwd}", "\\write18{touch x}",
                  "\\catcode`\\{=12", "\\boxed", "\\boxed{", "\\boxed{}", "\\boxed{{}}", "\\boxed {1}", "\\fbox{1}",
                  "\\boxed{\\boxed{\\boxed{1}}}", "\\boxed{1}}", "\\boxed{{1}", "\\mbox{\\text{\\textbf{1}}}",
                  "\\dfrac12", "\\tfrac{1}{2}", "\\frac{\\frac{1}{2}}{\\frac{3}{4}}", "\\sqrt2", "\\sqrt{2}^{3}"):
        strings += [macro, f"\\boxed{{{macro}}}", f"The answer is {macro}."]
    return strings


def adversarial_strings(count: int = 1200, seed: int = 0, *, large: bool = True) -> list[str]:
    """`count` strings (at least the fixed families), the same for the same arguments."""
    strings = (code_strings() + _number_strings(large) + _unicode_strings() + _structure_strings(large)
               + ["", " ", "\n"])
    rng = random.Random(seed)
    while len(strings) < count:
        pieces = rng.choices(FRAGMENTS, k=rng.randint(1, 24))
        text = "".join(pieces)
        if rng.random() < 0.5:
            text = f"\\boxed{{{text}}}"
        strings.append(text)
    return strings


# ground truths: ordinary dataset answers, and odd ones (a dataset is data too)
NORMAL_ANSWERS = ("12", "\\frac{1}{2}", "0.5", "x+1", "-3", "1,000", "\\sqrt{2}", "\\pi")
ODD_ANSWERS = ("", "nan", "1e309", "\\boxed{", "{" * 10_000, "9" * 5000, "\\frac{1}{0}", "__import__('os')",
               ARABIC_INDIC, "\x00")


@dataclasses.dataclass
class FuzzRecord:
    target: str        # which reward (and which role the string played)
    index: int         # the string's position in the list
    seconds: float     # the call's wall time
    value: float | None = None
    error: str | None = None    # "Type: message" of an exception that escaped the reward
    over_budget: bool = False   # the reward reported running past its own time budget


class TableTokenizer:
    """A tokenizer stand-in for MathTask: response [i, ...] decodes to texts[i] (MathTask decodes first)."""

    eos_token_id = 0

    def __init__(self):
        self.texts: list[str] = []

    def batch_decode(self, responses, skip_special_tokens=True):
        return [self.texts[response[0]] for response in responses]


def fuzz_math_task(tokenizer):
    from megatron_rpg.data.math_task import MathTask
    from megatron_rpg.data.prompts import PromptSet

    return MathTask(PromptSet(prompts=[[1]], answers=["1"], source="fuzz"), tokenizer, max_response_tokens=16,
                    overlong_buffer=4)


def _calls(text: str, index: int, task, tokenizer):
    """(target name, stated (low, high) range, zero-argument call returning (value, over budget))."""
    from megatron_rpg.rewards import math
    from megatron_rpg.rewards.toy import match_fraction_reward

    normal, odd = NORMAL_ANSWERS[index % len(NORMAL_ANSWERS)], ODD_ANSWERS[index % len(ODD_ANSWERS)]

    def correctness(response, answer):
        if not hasattr(math, "score_answers"):  # a tree before the time budget (to measure it)
            return lambda: (float(math.math_correctness([response], [answer])[0]), False)

        def call():
            correct, over_budget = math.score_answers([response], [answer])
            return float(correct[0]), bool(over_budget[0])
        return call

    def dapo():
        tokenizer.texts = [text]
        length = 1 + index % 16  # up to max_response_tokens, as the engine generates
        value = float(task.reward([[0] * length], [normal])[0])
        return value, bool(getattr(task, "last_over_budget", [False])[0])

    codepoints = [ord(c) for c in text[:10_000]]
    return [("math response vs normal answer", (0.0, 1.0), correctness(text, normal)),
            ("math response vs odd answer", (0.0, 1.0), correctness(text, odd)),
            ("math answer as ground truth", (0.0, 1.0), correctness(f"\\boxed{{{normal}}} {text[:64]}", text)),
            ("dapo math task reward", task_range(task), dapo),
            ("toy match fraction", (0.0, 1.0),
             lambda: (float(match_fraction_reward([codepoints], [codepoints[0] if codepoints else 0])[0]), False))]


def task_range(task) -> tuple[float, float]:
    return tuple(getattr(task, "reward_range", (-2.0, 1.0)))


def fuzz_rewards(strings: list[str], on_call=None) -> list[FuzzRecord]:
    """Every reward called on every string; exceptions recorded, never raised. `on_call(record)` sees
    each record as it is made (progress of long runs)."""
    tokenizer = TableTokenizer()
    task = fuzz_math_task(tokenizer)
    records = []
    for index, text in enumerate(strings):
        for target, (low, high), call in _calls(text, index, task, tokenizer):
            record = FuzzRecord(target=target, index=index, seconds=0.0)
            started = time.perf_counter()
            try:
                value, record.over_budget = call()
                record.value = value
                if not low <= value <= high:  # NaN fails this too
                    record.error = f"OutOfRange: {value!r} not in [{low}, {high}]"
            except Exception as error:  # the fuzzer's finding: recorded, not raised
                record.error = f"{type(error).__name__}: {str(error)[:200]}"
            record.seconds = time.perf_counter() - started
            records.append(record)
            if on_call is not None:
                on_call(record)
    return records
