"""tools/prepare_dapo_math.py on a Parquet file of DAPO-Math-17k's layout built here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpg.data.prompts import read_prompt_records

pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_dapo_math.py"
PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
          "Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


def dapo_row(problem, answer, index):
    return {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": str(index)},
            "prompt": [{"content": f"{PREFIX}\n\n{problem}\n\n{SUFFIX}", "role": "user"}],
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}}


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def test_problems_are_cut_out_of_dapos_instruction_once_each(tmp_path):
    rows = [dapo_row("What is $1+1$?", "2", 0), dapo_row("Find $x$ if $2x=6$.", "3", 1),
            dapo_row("What is $1+1$?", "2", 2)]
    parquet, output = tmp_path / "dapo.parquet", tmp_path / "out" / "dapo.jsonl"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), parquet)
    done = run(parquet, output)
    assert done.returncode == 0, done.stderr
    assert "2 problems from 3 rows (1 repeats dropped)" in done.stdout
    records = read_prompt_records(output)  # what the trainer reads
    assert [(r.prompt, r.answer) for r in records] == [("What is $1+1$?", "2"), ("Find $x$ if $2x=6$.", "3")]
    assert output.stat().st_mode & 0o777 == 0o644

    kept = run(parquet, tmp_path / "kept.jsonl", "--keep-instructions")
    assert kept.returncode == 0, kept.stderr
    first = json.loads((tmp_path / "kept.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith(PREFIX) and first["prompt"].endswith(SUFFIX)


def test_a_file_of_another_layout_is_named_and_nothing_is_written(tmp_path):
    parquet, output = tmp_path / "other.parquet", tmp_path / "out.jsonl"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"prompt": [{"content": "x", "role": "user"}],
                                                            "reward_model": {"style": "rule"}}]), parquet)
    output.write_text("kept\n")
    failed = run(parquet, output)
    assert failed.returncode == 2
    assert "row 1: not DAPO-Math's layout" in failed.stderr and "ground_truth" in failed.stderr
    assert output.read_text() == "kept\n"
    missing = run(tmp_path / "nope.parquet", output)
    assert missing.returncode == 2 and "no such file (download the dataset first" in missing.stderr
