"""verl-style prompt files: nested keys (`--answer-key reward_model.ground_truth`), a chat list
under `prompt`, Parquet through pyarrow, and `--chat-template {auto,none,FILE}`."""
import json

import pytest

from megatron_rpg.data.prompts import load_prompt_set, read_prompt_records
from tests.data.conftest import CHAT_TEMPLATE

CHAT = [{"role": "user", "content": "1+1?"}]
VERL_ROW = {"data_source": "math", "prompt": CHAT, "ability": "MATH",
            "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": 0}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_dotted_answer_key_reaches_into_nested_objects(tmp_path):
    path = write_jsonl(tmp_path / "verl.jsonl", [VERL_ROW])
    records = read_prompt_records(path, answer_key="reward_model.ground_truth")
    assert (records[0].prompt, records[0].answer) == (CHAT, "2")


def test_a_key_with_dots_that_exists_as_written_wins_over_the_path(tmp_path):
    path = write_jsonl(tmp_path / "dots.jsonl", [{"prompt": "p", "a.b": "literal", "a": {"b": "nested"}}])
    assert read_prompt_records(path, answer_key="a.b")[0].answer == "literal"


@pytest.mark.parametrize("key, message", [
    ("reward_model.answer", r"missing key 'answer' in 'reward_model' \(keys present: \['ground_truth', 'style'\]\); "
                            r"set --answer-key"),
    ("extra_info.index.value", r"missing key 'value' in 'extra_info.index' \(keys present: none: it is a int\); "
                               r"set --answer-key"),
    ("solution", r"verl\.jsonl:1: missing key 'solution' \(keys present: \[.*'reward_model'.*\]\); set --answer-key"),
])
def test_a_missing_nested_key_names_the_level_the_keys_there_and_the_flag(tmp_path, key, message):
    path = write_jsonl(tmp_path / "verl.jsonl", [VERL_ROW])
    with pytest.raises(ValueError, match=message):
        read_prompt_records(path, answer_key=key)


def test_a_nested_value_that_is_not_an_answer_names_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "verl.jsonl", [VERL_ROW])
    with pytest.raises(ValueError, match=r"'reward_model' = \{.*\} must be a string or a number \(--answer-key"):
        read_prompt_records(path, answer_key="reward_model")


def test_a_verl_parquet_file_reads_like_its_jsonl(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")  # the set-up installs it (requirements-cpu.txt)
    import pyarrow.parquet

    rows = [VERL_ROW, dict(VERL_ROW, prompt=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "2+2?"}],
                           reward_model={"ground_truth": "4", "style": "rule"})]
    parquet = tmp_path / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), parquet)
    from_parquet = read_prompt_records(parquet, answer_key="reward_model.ground_truth")
    from_jsonl = read_prompt_records(write_jsonl(tmp_path / "train.jsonl", rows),
                                     answer_key="reward_model.ground_truth")
    assert [(r.prompt, r.answer) for r in from_parquet] == [(r.prompt, r.answer) for r in from_jsonl]
    assert from_parquet[1].location == f"{parquet} row 2"


def test_chat_template_auto_none_and_a_file(tmp_path, tiny_chat_tokenizer):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": CHAT, "answer": "2"}, {"prompt": "3+3?", "answer": "6"}])
    decode = tiny_chat_tokenizer.decode

    auto = load_prompt_set(path, tiny_chat_tokenizer, chat_template="auto")
    assert [decode(p) for p in auto.prompts] == ["<|user|>1+1?\n<|assistant|>", "3+3?"]
    none = load_prompt_set(path, tiny_chat_tokenizer, chat_template="none")
    assert [decode(p) for p in none.prompts] == ["1+1?", "3+3?"]
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]"))
    from_file = load_prompt_set(path, tiny_chat_tokenizer, chat_template=str(template_file))
    # the file's template renders chat lists and text prompts alike (a text prompt is one user message)
    assert [decode(p) for p in from_file.prompts] == ["[user]1+1?\n[assistant]", "[user]3+3?\n[assistant]"]


@pytest.mark.parametrize("content, message", [
    (None, r"--chat-template '.*missing\.jinja': no such file; give auto .*none .*Jinja"),
    ("Hello, no markup", r"--chat-template .*plain\.jinja: holds no Jinja markup"),
])
def test_a_bad_chat_template_file_is_refused_before_reading_the_prompts(tmp_path, tiny_tokenizer, content, message):
    template = tmp_path / ("missing.jinja" if content is None else "plain.jinja")
    if content is not None:
        template.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompt_set(tmp_path / "never_read.jsonl", tiny_tokenizer, chat_template=str(template))


def test_the_trainer_refuses_chat_template_without_the_math_task():
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny", "--chat-template", "none"])
