"""Generation throughput of the embedded engine: its lean KV-cache decoder (megatron/lean_decode.py,
the default) vs megatron-core's KV cache vs recomputing the prefix for every token vs HF `generate`
(its own KV cache), on the same weights and prompts, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/generation.py [--cases 16x8 16x64 4x512]

Model: a random Qwen2-shaped model (hidden 256, 4 layers, 4 heads / 2 KV heads, FFN 688, vocab 1024)
built with transformers, converted with the project's converter (hf_to_megatron) into a TP=1
megatron GPTModel on CPU (gloo, one process, one thread). Prompts: `--prompt-len` random ids per row.
Each case BxN generates N new tokens greedily (no stop ids) for B prompts; tokens/s = B·N / wall time
of one `generate` call (after one warm-up call of every method), and per CPU second of the worker
(its process time: less sensitive than wall time to other jobs on a shared machine). Methods: "lean
cache" (the engine's default), "kv cache" (`lean_decode=False`: megatron's StaticInferenceContext
through its schedule), "recompute" (`kv_cache=False`), "HF generate". "same tokens" compares each
method's tokens with megatron's cache's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repo root
from tests.distributed.harness import run_on_ranks  # noqa: E402

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=688, vocab_size=1024, max_position_embeddings=1024)


def _models():
    from megatron_rpg.checkpoint.hf_mapping import hf_to_megatron
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import initialize_parallel
    from tests.megatron.rl_step_fixtures import load_full_weights
    from tests.tiny_models import tiny_hf_config, tiny_hf_model

    initialize_parallel(1, 1, seed=0)
    hf = tiny_hf_model("qwen2", seed=0, **SHAPE)
    hf.generation_config.eos_token_id = None  # always N new tokens, as the engine without stop ids
    hf.generation_config.pad_token_id = 0
    config = tiny_hf_config("qwen2", **SHAPE)
    gpt = build_gpt_model(config)
    load_full_weights(gpt, dict(hf_to_megatron(config, hf.state_dict(), padded_vocab_size=gpt.vocab_size)))
    model, _ = setup_model_and_optimizer([gpt], lr=0.0)
    return hf, model


def bench_body(rank, world_size, cases, prompt_len):
    from megatron_rpg.megatron.parallel import destroy_parallel
    from megatron_rpg.rollout.embedded import EmbeddedEngine
    from megatron_rpg.rollout.engine import SamplingParams

    torch.set_num_threads(1)
    hf, model = _models()
    vocab = SHAPE["vocab_size"]

    def engine_tokens(kv_cache, prompts, new, lean=False):
        engine = EmbeddedEngine(model, vocab_size=vocab, kv_cache=kv_cache, lean_decode=lean)
        rollout = engine.generate(prompts, SamplingParams(max_new_tokens=new, greedy=True))
        return rollout.tokens

    def hf_tokens(prompts, new):
        ids = torch.tensor(prompts)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)

    methods = {"lean cache": lambda p, n: engine_tokens(True, p, n, lean=True),
               "kv cache": lambda p, n: engine_tokens(True, p, n),
               "recompute": lambda p, n: engine_tokens(False, p, n),
               "HF generate": hf_tokens}
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(0, vocab, (2, prompt_len), generator=generator).tolist()
    for method in methods.values():
        method(warm, 4)
    rows = []
    for batch, new in cases:
        prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
        results = {}
        for name, method in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = method(prompts, new)
            results[name] = (time.perf_counter() - start, time.process_time() - start_cpu, tokens)
        reference = results["kv cache"][2]
        for name, (seconds, cpu_seconds, tokens) in results.items():
            rows.append(dict(batch=batch, new=new, method=name, seconds=seconds, cpu_seconds=cpu_seconds,
                             tokens_per_s=batch * new / seconds, same=bool(torch.equal(tokens, reference))))
    destroy_parallel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["16x8", "16x64", "4x512"],
                        help="BATCHxNEW_TOKENS per case")
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()
    cases = [tuple(int(part) for part in case.split("x")) for case in args.cases]
    start = time.perf_counter()
    rows = run_on_ranks(bench_body, world_size=1, args=(cases, args.prompt_len), timeout_s=3600)[0]
    print(f"torch {torch.__version__}, 1 thread; Qwen2-shaped {SHAPE}; prompts of {args.prompt_len} tokens; "
          f"greedy; total wall {time.perf_counter() - start:.0f} s\n")
    print("| batch | new tokens | method | wall (s) | CPU (s) | tokens/s (wall) | tokens/CPU-s | CPU vs recompute "
          "| CPU vs kv cache | same tokens as the kv cache |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        recompute, cache = (next(r for r in rows if (r["batch"], r["new"], r["method"]) ==
                                 (row["batch"], row["new"], method)) for method in ("recompute", "kv cache"))
        print(f"| {row['batch']} | {row['new']} | {row['method']} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
              f"{row['tokens_per_s']:.0f} | {row['batch'] * row['new'] / row['cpu_seconds']:.0f} | "
              f"{recompute['cpu_seconds'] / row['cpu_seconds']:.1f}× | {cache['cpu_seconds'] / row['cpu_seconds']:.1f}× "
              f"| {'yes' if row['same'] else 'NO'} |")


if __name__ == "__main__":
    main()
