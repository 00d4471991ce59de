"""Prompt files: records, errors that name the file/line/key, templating, tokenisation, length filter,
and the sampler's epochs."""
import json
import sys

import pytest

from megatron_rpg.data.prompts import PromptSampler, load_prompt_set, read_prompt_records


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_records_keep_prompts_and_string_answers_and_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "1+1?", "answer": 2}, "",
                                                {"prompt": "half?", "answer": "1/2", "extra": 0}])
    records = read_prompt_records(path)
    assert [(r.prompt, r.answer) for r in records] == [("1+1?", "2"), ("half?", "1/2")]
    assert records[1].location == f"{path}:3"


def test_custom_keys_select_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"question": "q", "solution": "7"}])
    records = read_prompt_records(path, prompt_key="question", answer_key="solution")
    assert (records[0].prompt, records[0].answer) == ("q", "7")


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompt_records(tmp_path / "nope.jsonl")


def test_invalid_json_error_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, '{"prompt": "b", "answer"'])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: invalid JSON"):
        read_prompt_records(path)


def test_missing_key_error_names_the_line_the_key_and_the_keys_present(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    with pytest.raises(ValueError, match=r"set\.jsonl:2: missing key 'prompt' \(keys present: \['answer', "
                                         r"'question'\]\); set --prompt-key"):
        read_prompt_records(path)
    with pytest.raises(ValueError, match=r"set\.jsonl:1: missing key 'solution'.*set --answer-key"):
        read_prompt_records(path, answer_key="solution")


def test_a_line_that_is_not_an_object_or_a_malformed_chat_message_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"set\.jsonl:1: expected a JSON object"):
        read_prompt_records(path)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: 'prompt'\[0\].*not a chat message"):
        read_prompt_records(path)


def test_an_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl.*holds no records"):
        read_prompt_records(path)


def test_parquet_without_pyarrow_says_to_install_it_or_use_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "set.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"set\.parquet: reading Parquet needs pyarrow.*pip install pyarrow.*JSONL"):
        read_prompt_records(path)


def test_prompts_are_templated_tokenized_and_long_ones_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "1+1?", "answer": "2"},
                                                {"prompt": "x" * 40, "answer": "3"},
                                                {"prompt": "12?", "answer": "12"}])
    template = "Q: {prompt} Put the answer in \\boxed{}."
    full = load_prompt_set(path, tiny_tokenizer, template=template)
    assert full.num_dropped == 0 and len(full) == 3
    assert tiny_tokenizer.decode(full.prompts[0]) == "Q: 1+1? Put the answer in \\boxed{}."
    assert full.prompts[2] == tiny_tokenizer("Q: 12? Put the answer in \\boxed{}.")["input_ids"]
    limit = max(len(full.prompts[0]), len(full.prompts[2]))
    assert len(full.prompts[1]) > limit
    filtered = load_prompt_set(path, tiny_tokenizer, template=template, max_prompt_tokens=limit)
    assert filtered.num_dropped == 1
    assert filtered.prompts == [full.prompts[0], full.prompts[2]] and filtered.answers == ["2", "12"]


def test_filtering_every_prompt_away_is_an_error_with_the_shortest_length(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "long prompt", "answer": "2"}])
    shortest = len(tiny_tokenizer("long prompt")["input_ids"])
    with pytest.raises(ValueError, match=rf"all 1 prompts are longer than max_prompt_tokens=1 "
                                         rf"\(the shortest has {shortest} tokens\)"):
        load_prompt_set(path, tiny_tokenizer, max_prompt_tokens=1)


def test_a_template_without_the_placeholder_is_rejected_before_reading(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"template='Solve it' has no '\{prompt\}'"):
        load_prompt_set(tmp_path / "not_read.jsonl", tiny_tokenizer, template="Solve it")


def test_chat_prompts_use_the_chat_template_when_there_is_one_else_join_the_contents(
        tmp_path, tiny_tokenizer, tiny_chat_tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": chat, "answer": "2"}])
    rendered = load_prompt_set(path, tiny_chat_tokenizer, template="{prompt} Box it.")
    assert tiny_chat_tokenizer.decode(rendered.prompts[0]) == \
        "<|system|>Be brief.\n<|user|>1+1? Box it.\n<|assistant|>"
    joined = load_prompt_set(path, tiny_tokenizer)
    assert tiny_tokenizer.decode(joined.prompts[0]) == "Be brief.\n\n1+1?"


def draw_epochs(seed, num_prompts=7, count=3, draws=7):
    sampler = PromptSampler(num_prompts, seed=seed)
    return [sampler.draw(count) for _ in range(draws)]


def test_sampler_draws_every_prompt_once_per_epoch_and_reshuffles_the_next_epoch():
    flat = [index for draw in draw_epochs(0, num_prompts=6, count=2, draws=6) for index in draw]
    first, second = flat[:6], flat[6:]
    assert sorted(first) == sorted(second) == list(range(6))
    assert first != second  # a fresh permutation (seed 0 gives different ones)


def test_a_draw_crossing_the_epoch_boundary_finishes_the_old_epoch_first():
    flat = [index for draw in draw_epochs(3, num_prompts=7, count=3, draws=7) for index in draw]
    for epoch in range(3):
        assert sorted(flat[7 * epoch:7 * epoch + 7]) == list(range(7))


def test_sampler_is_deterministic_per_seed_and_differs_across_seeds():
    assert draw_epochs(11) == draw_epochs(11)
    assert draw_epochs(11) != draw_epochs(12)
    assert draw_epochs(11)[0] != draw_epochs(12)[0]


def test_dp_ranks_partition_each_epoch_and_together_see_every_prompt_at_most_once():
    for num_prompts, ranks in ((8, 2), (7, 3)):  # 7 over 3: slices of 2, one prompt left over per epoch
        share = num_prompts // ranks
        samplers = [PromptSampler(num_prompts, seed=5, rank=r, num_ranks=ranks) for r in range(ranks)]
        left_over = set()
        for epoch in (1, 2, 3):
            slices = [sampler.draw(share) for sampler in samplers]
            seen = [i for part in slices for i in part]
            assert len(set(seen)) == len(seen) == share * ranks, (num_prompts, epoch)  # no prompt twice
            assert all(sampler.epoch == epoch for sampler in samplers)  # the ranks keep the same pace
            left_over |= set(range(num_prompts)) - set(seen)
        if num_prompts % ranks:
            assert len(left_over) > 1  # the prompts left out differ from epoch to epoch


def test_a_resume_in_another_layout_starts_a_fresh_epoch_on_every_rank():
    samplers = [PromptSampler(8, seed=5, rank=r, num_ranks=2) for r in range(2)]
    for sampler in samplers:
        sampler.restart_at(7)
    first = [sampler.draw(4) for sampler in samplers]
    assert sorted(first[0] + first[1]) == list(range(8))
    epoch_one = [PromptSampler(8, seed=5, rank=r, num_ranks=2).draw(4) for r in range(2)]
    assert first != epoch_one  # not the first run's first epoch again


def test_an_old_sampler_state_starts_a_new_epoch_with_a_warning():
    sampler = PromptSampler(8, seed=5)
    with pytest.warns(UserWarning, match="predates the data-parallel partition"):
        sampler.load_state_dict({"epoch": 1, "order": list(range(8)), "position": 3})
    assert sorted(sampler.draw(8)) == list(range(8))


def test_a_restored_sampler_continues_with_the_same_draws():
    sampler = PromptSampler(9, seed=2, rank=1, num_ranks=2)
    sampler.draw(3)
    restored = PromptSampler(9, seed=2, rank=1, num_ranks=2)
    restored.load_state_dict(sampler.state_dict())
    assert [restored.draw(2) for _ in range(5)] == [sampler.draw(2) for _ in range(5)]


def test_fewer_prompts_than_dp_ranks_is_refused_naming_both():
    with pytest.raises(ValueError, match="3 prompts cannot be split over 4 data-parallel ranks"):
        PromptSampler(3, rank=0, num_ranks=4)
