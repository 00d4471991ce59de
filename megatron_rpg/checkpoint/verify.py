"""Check a converted checkpoint: the megatron model loaded from it computes the HF model's logits.

    report = verify_conversion(hf_dir, megatron_dir, tensor_model_parallel_size=2)
    report["max_abs_logit_diff"], report["greedy_tokens_agree"], report["ok"]

Both models run in float32 on the same prompts (the tokenizer's encoding of a few sentences when the
HF folder has a tokenizer, else seeded random token ids). Reported: max |logit_megatron - logit_hf|
over every prompt position (unpadded vocabulary), whether the argmax next token agrees at every
position, and whether a greedy continuation of `max_new_tokens` tokens (full recompute, no cache)
is identical. ok = diff <= tolerance and both token checks agree; a NaN difference is
reported as nan (an inf one as inf) and is never ok.

The megatron side is the real model provider (`build_gpt_model`) at the requested TP/PP, loaded with
`dist_checkpointing.load(model.sharded_state_dict(), dir)` (resharding on load); the forward goes
through megatron's schedule (pipeline p2p when PP > 1): the trainer's one forward-only path,
`forward_logits` (megatron/forward_backward.py). `verify_conversion` spawns TP x PP local
processes on CPU (gloo, CPU mode); `verify_on_this_rank` is the per-rank body for other launchers.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.distributed as dist

DEFAULT_TEXT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "1 + 1 = 2, 2 + 2 =")


def load_converted_model(checkpoint_dir: str):
    """(GPTModel for this rank's TP/PP position in float32, eval mode; HF config)."""
    from megatron_rpg.checkpoint.convert import hf_config_of
    from megatron_rpg.checkpoint.dist_ckpt import load_model_weights
    from megatron_rpg.megatron.models import build_gpt_model

    config = hf_config_of(checkpoint_dir)
    model = build_gpt_model(config, params_dtype=torch.float32)
    load_model_weights(model, checkpoint_dir)
    return model.eval(), config


def _greedy(model, prompt: torch.Tensor, steps: int, vocab_size: int) -> torch.Tensor:
    """Greedy continuation by full recompute; every rank gets the same logits, so the same tokens."""
    from megatron_rpg.megatron.forward_backward import forward_logits

    tokens = prompt
    for _ in range(steps):
        logits = forward_logits(model, tokens, vocab_size=vocab_size, at=torch.tensor([tokens.shape[1] - 1]))
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True).cpu()], dim=1)
    return tokens[:, prompt.shape[1]:]


def verify_on_this_rank(hf_dir: str, megatron_dir: str, prompts: list[list[int]], max_new_tokens: int,
                        tolerance: float) -> dict | None:
    """Runs on every rank after `initialize_parallel`; the last-stage TP-rank-0 process returns the report."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from megatron_rpg.megatron.forward_backward import forward_logits

    model, config = load_converted_model(megatron_dir)
    vocab = config.vocab_size
    is_reporter = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval() if is_reporter else None
    max_diff, argmax_agree, greedy_agree = 0.0, True, True
    for prompt in prompts:
        tokens = torch.tensor([prompt], dtype=torch.long)
        ours = forward_logits(model, tokens, vocab_size=vocab).cpu()  # compared with HF's on the CPU
        our_greedy = _greedy(model, tokens, max_new_tokens, vocab)
        if is_reporter:
            with torch.no_grad():
                theirs = hf_model(tokens).logits.float()
                their_greedy = _hf_greedy(hf_model, tokens, max_new_tokens)
            max_diff = worst_logit_difference(max_diff, ours, theirs)
            argmax_agree &= bool(torch.equal(ours.argmax(-1), theirs.argmax(-1)))
            greedy_agree &= bool(torch.equal(our_greedy, their_greedy))
    if not is_reporter:
        return None
    return dict(max_abs_logit_diff=max_diff, argmax_agree=argmax_agree, greedy_tokens_agree=greedy_agree,
                tolerance=tolerance, prompts=len(prompts), max_new_tokens=max_new_tokens,
                ok=math.isfinite(max_diff) and max_diff <= tolerance and argmax_agree and greedy_agree)


def worst_logit_difference(worst: float, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max(worst, max |ours - theirs|), and NaN once any difference is NaN: Python's max() would
    keep the finite value (max(0.0, nan) == 0.0) and report broken logits as a match."""
    difference = (ours - theirs).abs().max().item()  # torch's max propagates NaN
    return math.nan if math.isnan(worst) or math.isnan(difference) else max(worst, difference)


def _hf_greedy(hf_model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, hf_model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    return tokens[:, prompt.shape[1]:]


def default_prompts(hf_dir: str, vocab_size: int, count: int = 3, length: int = 8) -> list[list[int]]:
    """The tokenizer's encoding of DEFAULT_TEXT_PROMPTS when the folder has a tokenizer, else seeded
    random token ids (tiny test models carry no tokenizer)."""
    if any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        encoded = [tokenizer(text)["input_ids"] for text in DEFAULT_TEXT_PROMPTS[:count]]
        if all(encoded) and all(max(ids) < vocab_size for ids in encoded):
            return encoded
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def _rank_main(rank, world_size, store_path, tp, pp, args, queue):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        queue.put((rank, "ok", verify_on_this_rank(*args)))
        destroy_parallel()
    except BaseException as error:  # noqa: BLE001 - the parent reports which rank failed and why
        import traceback

        queue.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_verification_inputs(hf_dir: str, megatron_dir: str, tensor_model_parallel_size: int,
                              pipeline_model_parallel_size: int):
    """ValueError naming the bad input, before any process is spawned: `megatron_dir` is a converted
    checkpoint with its storage files intact, `hf_dir` a model folder (config + every weight) of the
    same architecture, TP/PP valid for it. Returns the checkpoint's HF config."""
    from megatron_rpg.checkpoint import hf_files, hf_mapping, integrity
    from megatron_rpg.checkpoint.convert import check_parallel_sizes, hf_config_of, read_conversion_metadata

    if not os.path.isdir(megatron_dir):
        raise ValueError(f"--megatron-dir {megatron_dir!r} is not a directory")
    read_conversion_metadata(megatron_dir)
    try:
        config = hf_config_of(megatron_dir)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"--megatron-dir {megatron_dir!r}: its stored HF config cannot be read ({error})") from error
    shape = hf_mapping.model_shape(config)
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf-dir {hf_dir!r} is not a directory")
    hf_config = hf_files.read_hf_config(hf_dir)
    hf_shape = hf_mapping.model_shape(hf_config)
    if hf_shape != shape:
        differing = {f: (getattr(hf_shape, f), getattr(shape, f)) for f in shape.__dataclass_fields__
                     if getattr(hf_shape, f) != getattr(shape, f)}
        raise ValueError(f"--hf-dir {hf_dir!r} describes another architecture than --megatron-dir "
                         f"{megatron_dir!r} (field: (HF, checkpoint)): {differing}; compare a checkpoint "
                         f"with the model it was converted from")
    hf_files.check_tensors_present(hf_files.LazyHFTensors(hf_dir), hf_mapping.hf_shapes(hf_config),
                                   redundant_copies=hf_mapping.redundant_hf_copies(hf_config))
    check_parallel_sizes(shape, tensor_model_parallel_size, pipeline_model_parallel_size)
    hf_files.check_tokenizer_fits(hf_dir, shape.vocab_size, "--hf-dir")
    side_dir = os.path.join(megatron_dir, "hf")
    if os.path.isdir(side_dir):
        hf_files.check_tokenizer_fits(side_dir, shape.vocab_size, "the tokenizer of --megatron-dir, in")
    integrity.verify_checkpoint(megatron_dir)  # the costly check last: a damaged file is named before any model
    return config


def verify_conversion(hf_dir: str, megatron_dir: str, *, tensor_model_parallel_size: int = 1,
                      pipeline_model_parallel_size: int = 1, prompts: list[list[int]] | None = None,
                      max_new_tokens: int = 4, tolerance: float = 1e-5, timeout_s: float = 1800.0) -> dict:
    """Spawns TP x PP local CPU (gloo) processes and returns the last stage's report.

    ValueError for bad input (`check_verification_inputs`, before spawning); RuntimeError when a
    rank fails while verifying."""
    import torch.multiprocessing as mp

    from megatron_rpg.checkpoint.layout import latest_checkpoint

    megatron_dir = latest_checkpoint(megatron_dir)  # a trainer's --save folder: its latest iter_
    config = check_verification_inputs(hf_dir, megatron_dir, tensor_model_parallel_size,
                                       pipeline_model_parallel_size)
    prompts = prompts or default_prompts(hf_dir, config.vocab_size)
    world = tensor_model_parallel_size * pipeline_model_parallel_size
    args = (hf_dir, megatron_dir, prompts, max_new_tokens, tolerance)
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as rendezvous:
        store_path = os.path.join(rendezvous, "store")
        procs = [context.Process(target=_rank_main, args=(r, world, store_path, tensor_model_parallel_size,
                                                          pipeline_model_parallel_size, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        reports, errors = [], []
        try:
            for _ in range(world):
                rank, status, payload = queue.get(timeout=timeout_s)
                if status == "error":
                    errors.append(f"rank {rank}: {payload}")
                    break
                if payload is not None:
                    reports.append(payload)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
    if errors:
        raise RuntimeError("verification failed on " + "\n".join(errors))
    (report,) = reports
    return dict(report, tensor_model_parallel_size=tensor_model_parallel_size,
                pipeline_model_parallel_size=pipeline_model_parallel_size)
