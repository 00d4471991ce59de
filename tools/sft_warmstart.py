"""A short supervised warm start of a Hugging Face causal LM on a math prompt file, so an RL run
starting from it sees some non-zero rewards: N Adam steps of cross-entropy on the response tokens of
"<prompt as the trainer templates it>" + " \\boxed{<answer>}" + EOS, with plain torch/transformers.

    python tools/make_tiny_hf_model.py --output ckpt/tiny-math-hf --text examples/data/arithmetic_train.jsonl
    python tools/sft_warmstart.py --hf-dir ckpt/tiny-math-hf --data examples/data/arithmetic_train.jsonl \\
        --output ckpt/tiny-math-sft-hf --steps 150
    python tools/convert_hf_to_megatron.py --hf-dir ckpt/tiny-math-sft-hf --output ckpt/tiny-math-sft

The prompt ids are the trainer's own (megatron_rpg.data.prompts.load_prompt_set with the same
--prompt-template), and the response ids follow them, so the model learns exactly the token
sequence the rollout engine would have to produce. The folder is written whole to a temporary name
and renamed (the converters' staged_output_dir).
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_TEMPLATE = "{prompt} Put the final answer in \\boxed{}."


def sft_sequences(tokenizer, data: str, template: str) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per record: the templated prompt's ids, then those of the boxed
    answer and EOS."""
    from megatron_rpg.data.prompts import load_prompt_set

    prompt_set = load_prompt_set(data, tokenizer, template=template)
    sequences = []
    for prompt, answer in zip(prompt_set.prompts, prompt_set.answers):
        response = tokenizer(f" \\boxed{{{answer}}}", add_special_tokens=False)["input_ids"]
        sequences.append((list(prompt) + list(response) + [tokenizer.eos_token_id], len(prompt)))
    return sequences


def train(hf_dir: str, data: str, output: str, *, steps: int, batch_size: int, lr: float, seed: int,
          template: str) -> float:
    """Trains and writes `output`; returns the last step's mean response-token loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpg.checkpoint.convert import staged_output_dir

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    sequences = sft_sequences(tokenizer, data, template)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picks = torch.randint(len(sequences), (batch_size,), generator=generator).tolist()
        width = max(len(sequences[i][0]) for i in picks)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)  # -100: no loss (prompt, padding)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for row, index in enumerate(picks):
            tokens, prompt_length = sequences[index]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, prompt_length:len(tokens)] = torch.tensor(tokens[prompt_length:])
            attention[row, :len(tokens)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with staged_output_dir(output, overwrite=True) as staging:  # written whole, then renamed over `output`
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return float(loss.detach())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="the HF model folder to start from")
    parser.add_argument("--data", required=True, help="JSONL of {prompt, answer} records")
    parser.add_argument("--output", required=True, help="the HF folder to write")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                        help="as the trainer's --prompt-template (the RL run must use the same)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args(argv)
    for flag, path in (("--hf-dir", args.hf_dir), ("--data", args.data)):
        if not os.path.exists(path):
            parser.error(f"{flag} {path}: no such file or folder")
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    if args.steps < 1 or args.batch_size < 1 or not 0 < args.lr <= 1:
        parser.error(f"--steps {args.steps} and --batch-size {args.batch_size} must be >= 1, --lr {args.lr} "
                     f"in (0, 1]")
    loss = train(args.hf_dir, args.data, args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 seed=args.seed, template=args.prompt_template)
    print(f"{args.output}: {args.steps} SFT steps, last response-token loss {loss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
