"""TRL's side of tools/bench/vs_trl.py: GRPOTrainer on the benchmark's model, prompts and reward.
Runs in the benchmark's own TRL environment (never the project's); imports only the project's pure
reward module (megatron_rpg/rewards/math.py, which needs nothing but torch).

    TRL_PYTHON tools/bench/vs_trl_peer.py --work DIR --steps 10 --threads 1 --out trl.json

Appends a line to --out with suffix .steps at each step's end (vs_trl.py reads CPU time then), and
writes {"step_end_s": [seconds after train() began at each optimizer step's end], ...} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: megatron_rpg.rewards.math


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="the folder vs_trl.py built (hf/, prompts.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompts", type=int, required=True, help="prompts per step")
    parser.add_argument("--samples", type=int, required=True, help="responses per prompt")
    parser.add_argument("--tokens", type=int, required=True, help="response tokens")
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_rpg.rewards.math import score_answers

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    with open(work / "prompts.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(work / "hf", local_files_only=True, dtype=torch.float32)

    def math_reward(completions, answer, **_):
        """The project's --task math reward with --overlong-buffer 0: +1 correct, −1 otherwise."""
        correct, _over_budget = score_answers(completions, answer)
        return [1.0 if c else -1.0 for c in correct.tolist()]

    completions = args.prompts * args.samples
    if completions % args.micro_batch_size:
        raise SystemExit(f"--micro-batch-size {args.micro_batch_size} must divide {completions} completions")
    config = GRPOConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, seed=0, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
        # one optimizer step per rollout batch: micro-batches of micro_batch_size accumulated over the batch
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=completions // args.micro_batch_size,
        num_generations=args.samples, max_completion_length=args.tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1)
    step_end = []
    progress = Path(args.out).with_suffix(".steps")
    progress.unlink(missing_ok=True)

    class Clock(TrainerCallback):
        def on_step_end(self, _args, _state, _control, **_):
            step_end.append(time.perf_counter())
            with open(progress, "a", encoding="utf-8") as f:  # one line per step: vs_trl.py reads CPU time at each
                f.write(f"{len(step_end)}\n")

    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    started = time.perf_counter()
    trainer.train()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"step_end_s": [t - started for t in step_end], "torch_threads": torch.get_num_threads(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}, f)


if __name__ == "__main__":
    main()
