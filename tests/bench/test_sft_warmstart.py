"""tools/sft_warmstart.py: the supervised warm start of the comparison study's arithmetic model.
Its labels are the response tokens after the trainer's own prompt ids, and training lowers their loss."""
import json
import os
import stat
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_tiny_hf_model  # noqa: E402
import sft_warmstart  # noqa: E402

DATA = os.path.join(ROOT, "examples", "data", "arithmetic_train.jsonl")


def _response_loss(folder: str, sequences) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for tokens, prompt_length in sequences:
            labels = torch.tensor([[-100] * prompt_length + tokens[prompt_length:]])
            losses.append(float(model(input_ids=torch.tensor([tokens]), labels=labels).loss))
    return sum(losses) / len(losses)


def test_sft_trains_the_boxed_answer_after_the_trainers_prompt_ids(tmp_path):
    from transformers import AutoTokenizer

    from megatron_rpg.data.prompts import load_prompt_set

    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    make_tiny_hf_model.build(base, DATA, vocab_size=384, hidden_size=32, layers=1, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    sequences = sft_warmstart.sft_sequences(tokenizer, DATA, sft_warmstart.DEFAULT_TEMPLATE)
    prompt_set = load_prompt_set(DATA, tokenizer, template=sft_warmstart.DEFAULT_TEMPLATE)
    with open(DATA, encoding="utf-8") as f:
        first = json.loads(f.readline())
    tokens, prompt_length = sequences[0]
    assert tokens[:prompt_length] == list(prompt_set.prompts[0])  # exactly what the rollout engine is given
    assert tokenizer.decode(tokens[prompt_length:]) == f" \\boxed{{{first['answer']}}}<eos>"
    sft_warmstart.train(base, DATA, tuned, steps=60, batch_size=16, lr=3e-3, seed=0,
                        template=sft_warmstart.DEFAULT_TEMPLATE)
    held = sequences[:32]
    before, after = _response_loss(base, held), _response_loss(tuned, held)
    assert after < 0.5 * before, (before, after)
    assert all(stat.S_IMODE(os.stat(os.path.join(tuned, n)).st_mode) == 0o644 for n in os.listdir(tuned))
