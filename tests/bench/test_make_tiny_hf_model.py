"""tools/make_tiny_hf_model.py's `fill_vocab` (what tools/bench/vs_trl.py builds its model with): the
tokenizer is padded with special tokens to exactly the asked vocabulary, the model's embedding has as
many rows, and every id decodes to one token of its own; without it the BPE stops short."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_tiny_hf_model  # noqa: E402

DATA = os.path.join(ROOT, "examples", "data", "arithmetic_eval.jsonl")
VOCAB = 384


def test_fill_vocab_gives_exactly_the_asked_vocabulary(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    sizes = {}
    for fill in (False, True):
        folder = str(tmp_path / f"fill_{fill}")
        make_tiny_hf_model.build(folder, DATA, vocab_size=VOCAB, hidden_size=8, layers=1, seed=0, fill_vocab=fill)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        sizes[fill] = (len(tokenizer), AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size)
        if fill:
            pieces = {tokenizer.convert_ids_to_tokens(i) for i in range(VOCAB)}
            assert len(pieces) == VOCAB  # no two ids share a token
    assert sizes[True] == (VOCAB, VOCAB)
    assert sizes[False][0] == sizes[False][1] < VOCAB  # the trained BPE alone is smaller: the option matters
