"""A tiny random Hugging Face model folder, built locally (no hub download): a Qwen2-style causal LM
and a byte-level BPE tokenizer trained on a prompt file's text, with a chat template. For trying the
trainer's math path on a CPU (examples/cpu_math.sh) before pointing it at a real model.

    python tools/make_tiny_hf_model.py --output ckpt/tiny-math-hf --text examples/data/arithmetic_train.jsonl
    python tools/convert_hf_to_megatron.py --hf-dir ckpt/tiny-math-hf --output ckpt/tiny-math

The folder is written to a temporary name and renamed, so an existing one is replaced only with
--overwrite and only by a complete folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]


def _texts(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                texts.extend(str(value) for value in record.values())
    return texts + ["Put the final answer in \\boxed{}. The answer is \\boxed{42}."]


def build(output: str, text_file: str, *, vocab_size: int, hidden_size: int, layers: int, seed: int,
          fill_vocab: bool = False) -> None:
    """Writes the folder. `fill_vocab`: pad the tokenizer with special tokens `<extra_i>` to exactly
    `vocab_size` (a BPE trained on little text stops short of it), so that every id a sampler can
    draw decodes to one token in every consumer (tools/bench/vs_trl.py's two trainers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_texts(text_file), trainer)
    # an explicit unk token: without one, transformers adds "<|endoftext|>" when the folder is loaded
    # back, and the tokenizer would no longer fit the model's embedding
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>",
                                      unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    if fill_vocab and len(wrapped) < vocab_size:
        wrapped.add_special_tokens({"additional_special_tokens": [f"<extra_{i}>" for i in range(vocab_size - len(wrapped))]})
    config = Qwen2Config(vocab_size=len(wrapped), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=wrapped.eos_token_id, pad_token_id=wrapped.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-hf-", dir=parent)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        wrapped.save_pretrained(staging)
        reloaded = len(AutoTokenizer.from_pretrained(staging, local_files_only=True))
        if reloaded != config.vocab_size:
            raise RuntimeError(f"the saved tokenizer loads back with {reloaded} tokens, the model has "
                               f"{config.vocab_size} embedding rows")
        os.chmod(staging, 0o755)
        for name in os.listdir(staging):  # save_pretrained writes some files 0600
            os.chmod(os.path.join(staging, name), 0o644)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="the HF folder to write")
    parser.add_argument("--text", required=True, help="a JSONL prompt file whose text trains the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill-vocab", action="store_true",
                        help="pad the tokenizer with <extra_i> special tokens to exactly --vocab-size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    if args.hidden_size % 4 or args.hidden_size < 8:
        parser.error(f"--hidden-size {args.hidden_size} must be a multiple of 4 (4 attention heads), >= 8")
    build(args.output, args.text, vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers,
          seed=args.seed, fill_vocab=args.fill_vocab)
    print(f"{args.output}: a random Qwen2 ({args.layers} layers, hidden {args.hidden_size}) and its tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
