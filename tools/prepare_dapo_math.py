"""DAPO-Math-17k (a Parquet file of verl's layout) → the JSONL our math task reads, one line per
distinct problem: {"prompt": PROBLEM, "answer": GROUND_TRUTH}.

    huggingface-cli download BytedTsinghua-SIA/DAPO-Math-17k --repo-type dataset --local-dir dapo
    python tools/prepare_dapo_math.py dapo/data/dapo-math-17k.parquet data/dapo-math-17k.jsonl

Each row's prompt is a chat list whose user message wraps the problem in DAPO's instruction ("Solve
the following math problem step by step. The last line ... Answer: $Answer ..." and "Remember to put
your answer on its own line after \"Answer:\""). The problem is cut out of it, so the trainer's
--prompt-template (examples/rpg_7b.yaml: "... put your final answer within \\boxed{}") decides the
instruction; --keep-instructions writes DAPO's user message unchanged instead. The released file
repeats each problem many times; a problem is written once (first occurrence), and the counts are
printed. The output is written to a temporary file and renamed, so an existing file is replaced only
by a complete one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


def problem_of(user_message: str) -> str:
    """The problem inside DAPO's instruction (the message itself when it has no such wrapping)."""
    text = user_message.strip()
    if text.startswith(DAPO_PREFIX):
        text = text[len(DAPO_PREFIX):]
    if text.endswith(DAPO_SUFFIX):
        text = text[:-len(DAPO_SUFFIX)]
    return text.strip()


def dapo_records(rows, *, keep_instructions: bool = False):
    """(records, number of rows read, number of duplicates dropped); ValueError naming a malformed row."""
    records, seen, total = [], set(), 0
    for number, row in enumerate(rows, start=1):
        total += 1
        try:
            user = [m["content"] for m in row["prompt"] if m["role"] == "user"][-1]
            answer = row["reward_model"]["ground_truth"]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"row {number}: not DAPO-Math's layout (prompt: a chat list with a user message, "
                             f"reward_model.ground_truth: the answer); missing {error}") from None
        prompt = user.strip() if keep_instructions else problem_of(user)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "answer": str(answer)})
    return records, total, total - len(records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parquet", help="DAPO-Math-17k's Parquet file")
    parser.add_argument("output", help="the JSONL file to write")
    parser.add_argument("--keep-instructions", action="store_true",
                        help="write DAPO's whole user message (its 'Answer:' instruction included)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.parquet):
        parser.error(f"{args.parquet}: no such file (download the dataset first, see this tool's --help)")
    try:
        import pyarrow.parquet
    except ImportError:
        parser.error("reading Parquet needs pyarrow: pip install pyarrow")
    try:
        table = pyarrow.parquet.read_table(args.parquet, columns=["prompt", "reward_model"])
    except (OSError, KeyError, pyarrow.lib.ArrowException) as error:
        parser.error(f"{args.parquet}: cannot read its prompt and reward_model columns ({error})")
    try:
        records, total, duplicates = dapo_records(table.to_pylist(), keep_instructions=args.keep_instructions)
    except ValueError as error:
        parser.error(f"{args.parquet}: {error}")
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".partial", delete=False, encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.chmod(out.name, 0o644)
    os.replace(out.name, args.output)
    print(f"{args.output}: {len(records)} problems from {total} rows ({duplicates} repeats dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
