"""A checkpoint written by the converter loads into the real megatron GPTModel at TP=2, TP=1 and PP=2
(resharding on load; vocab padded for a smaller or a larger TP than the model's) and computes the HF
model's logits (float32, within tests/float_bounds.py's bound at every position: 4× the HF float32
logits' rounding, measured against the same HF model in float64); the verification (its own
documented 1e-5 max |diff| criterion) says so, and fails for an HF model with
other weights or NaN logits; its CLI exits 0/1/2 for match/mismatch/bad input; tp_layout gathers the
real TP=2 shards back to the full tensors; a checkpoint megatron itself saves at TP=2 converts back to
HF exactly."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint.tiny_hf_folders import save_tiny_hf_folder
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import ratio_to_bound_per_row
from tests.tiny_models import FAMILIES, TINY_VOCAB_SIZE, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-5  # verify_conversion's criterion (the tool's default), not a test bound


def convert_every_family(rank, world_size, root):
    from megatron_rpg.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    for family in FAMILIES:
        save_tiny_hf_folder(family, os.path.join(root, family, "hf"), seed=2, tokenizer=False)
        hf_to_megatron_checkpoint(os.path.join(root, family, "hf"), os.path.join(root, family, "megatron"),
                                  tensor_model_parallel_size=2, progress=False)
    # vocab 100 written for TP=1 (padded to 128) and loaded at TP=2 (padded to 256): megatron
    # zero-fills the extra embedding/output rows on load (allow_shape_mismatch)
    save_tiny_hf_folder("qwen2", os.path.join(root, "qwen2-vocab100", "hf"), seed=4, tokenizer=False, vocab_size=100)
    assert hf_to_megatron_checkpoint(os.path.join(root, "qwen2-vocab100", "hf"),
                                     os.path.join(root, "qwen2-vocab100", "megatron"),
                                     progress=False)["padded_vocab_size"] == 128
    # the other way: written for TP=2 (padded to 256) and loaded at TP=1 (128 rows): megatron reads
    # only the rows the model has
    save_tiny_hf_folder("qwen2", os.path.join(root, "qwen2-vocab100-tp2", "hf"), seed=4, tokenizer=False,
                        vocab_size=100)
    assert hf_to_megatron_checkpoint(os.path.join(root, "qwen2-vocab100-tp2", "hf"),
                                     os.path.join(root, "qwen2-vocab100-tp2", "megatron"),
                                     tensor_model_parallel_size=2, progress=False)["padded_vocab_size"] == 256
    # same architecture, different weights: verification against it must fail
    save_tiny_hf_folder("qwen3", os.path.join(root, "qwen3-other-seed", "hf"), seed=9, tokenizer=False)
    # a NaN weight makes every logit NaN on both sides (argmax and greedy tokens still agree)
    broken = tiny_hf_model("qwen3", seed=3)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    broken.save_pretrained(os.path.join(root, "qwen3-nan", "hf"))
    hf_to_megatron_checkpoint(os.path.join(root, "qwen3-nan", "hf"), os.path.join(root, "qwen3-nan", "megatron"),
                              progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("converted"))
    run_on_ranks(convert_every_family, world_size=1, args=(root,))
    return root


def _tokens():
    return torch.randint(0, TINY_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(5))


def _check_tp_layout(model, config, hf_dir):
    """Names of the TP=2 model's tensors that tp_layout gets wrong, either way (must be none)."""
    import torch.distributed as dist

    from megatron_rpg.checkpoint.hf_files import LazyHFTensors
    from megatron_rpg.checkpoint.hf_mapping import hf_to_megatron
    from megatron_rpg.checkpoint.tp_layout import full_from_tp_shards, tp_shard

    full = dict(hf_to_megatron(config, LazyHFTensors(hf_dir), padded_vocab_size=256))
    local = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(local) == set(full), set(local) ^ set(full)
    wrong = []
    for name, shard in local.items():
        shards = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(shards, shard.contiguous())
        if not (torch.equal(full_from_tp_shards(name, shards), full[name])
                and torch.equal(tp_shard(name, full[name], dist.get_rank(), 2), shard)):
            wrong.append(name)
    return wrong


def _save_like_the_trainer(model, config, directory):
    """A checkpoint written by megatron itself from the TP=2 model (two SwiGLU chunks per rank, TP
    offsets), described with describe_checkpoint so the HF converter can read it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_rpg.checkpoint.convert import describe_checkpoint

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)
    if dist.get_rank() == 0:
        describe_checkpoint(directory, config, padded_vocab_size=256, tensor_model_parallel_size=2,
                            pipeline_model_parallel_size=1)
    dist.barrier()


def convert_trainer_checkpoint_to_hf(rank, world_size, root):
    """HF tensor names that differ from the original folder's after conversion (must be none)."""
    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint

    out = os.path.join(root, "qwen2", "trainer_checkpoint_hf")
    megatron_to_hf_checkpoint(os.path.join(root, "qwen2", "trainer_checkpoint"), out, progress=False)
    restored = load_file(os.path.join(out, "model-00001-of-00001.safetensors"))
    original = load_file(os.path.join(root, "qwen2", "hf", "model.safetensors"))
    assert set(restored) == set(original), set(restored) ^ set(original)
    return [n for n in original if not torch.equal(restored[n], original[n])]


def load_and_compare_at_each_layout(rank, world_size, root):
    """Per layout and family: the largest ‖megatron logits − HF logits‖ / float32 bound over the
    positions seen on this rank (every rank gets them; HF float64 measures the bound);
    plus verify_on_this_rank's reports at TP=2 for a matching and a non-matching HF model."""
    from transformers import AutoModelForCausalLM

    from megatron_rpg.checkpoint.verify import load_converted_model, verify_on_this_rank
    from megatron_rpg.megatron.forward_backward import forward_logits
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    tokens = _tokens()
    diffs = {}
    for tp, pp in ((2, 1), (1, 1), (1, 2)):
        initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        padded_differently = {(2, 1): ("qwen2-vocab100",), (1, 1): ("qwen2-vocab100-tp2",)}.get((tp, pp), ())
        for family in FAMILIES + padded_differently:
            model, config = load_converted_model(os.path.join(root, family, "megatron"))
            logits = forward_logits(model, tokens % config.vocab_size, vocab_size=config.vocab_size)
            hf_model = AutoModelForCausalLM.from_pretrained(os.path.join(root, family, "hf"), dtype=torch.float32)
            with torch.no_grad():
                expected = hf_model.eval()(tokens % config.vocab_size).logits
                expected64 = hf_model.double()(tokens % config.vocab_size).logits
            diffs[(tp, pp, family)] = ratio_to_bound_per_row(logits, expected, expected64)
            if tp == 2 and family in FAMILIES:
                diffs[("tp_layout", family)] = _check_tp_layout(model, config, os.path.join(root, family, "hf"))
            if tp == 2 and family == "qwen2":
                _save_like_the_trainer(model, config, os.path.join(root, family, "trainer_checkpoint"))
        if tp == 2:
            megatron_dir, prompts = os.path.join(root, "qwen3", "megatron"), _tokens().tolist()
            for name in ("qwen3", "qwen3-other-seed"):
                diffs[("verify", name)] = verify_on_this_rank(os.path.join(root, name, "hf"), megatron_dir,
                                                              prompts, 3, TOLERANCE)
            diffs[("verify", "qwen3-nan")] = verify_on_this_rank(
                os.path.join(root, "qwen3-nan", "hf"), os.path.join(root, "qwen3-nan", "megatron"), prompts, 3,
                TOLERANCE)
        destroy_parallel()
    return diffs


@pytest.mark.distributed
def test_converted_checkpoint_loads_at_tp2_tp1_and_pp2_with_hf_logits(converted):
    per_rank = run_on_ranks(load_and_compare_at_each_layout, world_size=2, args=(converted,))
    for family in FAMILIES:
        for rank in (0, 1):  # TP=2: both ranks gather the full logits; TP=1 at DP=2: both compute them
            assert per_rank[rank][(2, 1, family)] <= 1.0, (family, rank, per_rank[rank][(2, 1, family)])
            assert per_rank[rank][(1, 1, family)] <= 1.0, (family, rank, per_rank[rank][(1, 1, family)])
        # PP=2: the last stage (rank 1) computes the logits and broadcasts them to the first
        for rank in (0, 1):
            assert per_rank[rank][(1, 2, family)] <= 1.0, (family, rank, per_rank[rank][(1, 2, family)])
        # TP=2 shards of the real model gather to the converted full tensors, fc1's gate/up split included
        assert per_rank[0][("tp_layout", family)] == [] and per_rank[1][("tp_layout", family)] == []
    for rank in (0, 1):  # checkpoint padded for TP=1 (128 rows), model at TP=2 (256 rows), and back
        assert per_rank[rank][(2, 1, "qwen2-vocab100")] <= 1.0
        assert per_rank[rank][(1, 1, "qwen2-vocab100-tp2")] <= 1.0
    print("largest logit difference / float32 bound:", max(v for k, v in per_rank[0].items() if len(k) == 3))
    # verification: TP rank 0 of the last stage reports; the other model's logits are far off
    assert per_rank[1][("verify", "qwen3")] is None
    matching, other = per_rank[0][("verify", "qwen3")], per_rank[0][("verify", "qwen3-other-seed")]
    assert matching["ok"] and matching["max_abs_logit_diff"] <= TOLERANCE and matching["greedy_tokens_agree"]
    assert not other["ok"] and other["max_abs_logit_diff"] > 1e-2 and not other["argmax_agree"]
    nan = per_rank[0][("verify", "qwen3-nan")]
    assert nan["argmax_agree"] and nan["greedy_tokens_agree"]  # so only the NaN difference can fail it
    assert math.isnan(nan["max_abs_logit_diff"]) and not nan["ok"], nan

    # megatron's own TP=2 checkpoint of that model converts back to the original HF tensors bit for bit
    assert run_on_ranks(convert_trainer_checkpoint_to_hf, world_size=1, args=(converted,)) == [[]]


def _run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_cli_conversion_shows_the_write_and_verification_exits_0_on_match_1_on_mismatch_2_on_bad_input(tmp_path):
    hf_dir, megatron_dir, other_dir = str(tmp_path / "hf"), str(tmp_path / "megatron"), str(tmp_path / "other")
    save_tiny_hf_folder("llama3", hf_dir, seed=7)
    save_tiny_hf_folder("llama3", other_dir, seed=8, tokenizer=False)
    done = _run_tool("tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--output", megatron_dir,
                     "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reshardable" in done.stdout
    # progress: the tensors are read, then megatron's writer runs under its own (completed) bar
    assert done.stderr.rindex("HF -> megatron (reading)") < done.stderr.rindex("writing torch_dist checkpoint")
    assert f"writing torch_dist checkpoint {megatron_dir}: 1/1" in done.stderr, done.stderr[-2000:]

    verified = _run_tool("tools/verify_conversion.py", "--hf-dir", hf_dir, "--megatron-dir", megatron_dir,
                         "--tensor-model-parallel-size", "2", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr[-3000:]
    report = json.loads(verified.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= TOLERANCE and report["greedy_tokens_agree"] and report["argmax_agree"]

    mismatch = _run_tool("tools/verify_conversion.py", "--hf-dir", other_dir, "--megatron-dir", megatron_dir)
    assert mismatch.returncode == 1, mismatch.stdout + mismatch.stderr[-3000:]
    assert mismatch.stdout.strip().endswith("MISMATCH") and "Traceback" not in mismatch.stderr

    for bad_input, message in (
            (("--hf-dir", str(tmp_path / "nowhere"), "--megatron-dir", megatron_dir), "--hf-dir .* is not a directory"),
            (("--hf-dir", hf_dir, "--megatron-dir", hf_dir), ".* is not a megatron distributed checkpoint .*: it is "
                                                             "a Hugging Face model folder; convert it first, "
                                                             "`python tools/convert_hf_to_megatron.py --hf-dir")):
        refused = _run_tool("tools/verify_conversion.py", *bad_input)
        assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
        assert re.search("error: " + message, refused.stderr) and "Traceback" not in refused.stderr, refused.stderr


def test_verification_inputs_are_checked_before_any_worker_starts(converted, tmp_path):
    import shutil

    from megatron_rpg.checkpoint.verify import check_verification_inputs

    megatron_dir, hf_dir = os.path.join(converted, "qwen3", "megatron"), os.path.join(converted, "qwen3", "hf")
    assert check_verification_inputs(hf_dir, megatron_dir, 2, 2).model_type == "qwen3"
    no_weights = shutil.copytree(hf_dir, str(tmp_path / "no_weights"))
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds no weights"):
        check_verification_inputs(no_weights, megatron_dir, 1, 1)
    with pytest.raises(ValueError, match=r"describes another architecture than --megatron-dir .*'model_type': "
                                         r"\('llama', 'qwen3'\)"):
        check_verification_inputs(os.path.join(converted, "llama3", "hf"), megatron_dir, 1, 1)
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size=3 must divide"):
        check_verification_inputs(hf_dir, megatron_dir, 3, 1)
    with pytest.raises(ValueError, match=r"--megatron-dir .* is not a directory"):
        check_verification_inputs(hf_dir, str(tmp_path / "nowhere"), 1, 1)


def test_a_nan_logit_difference_is_kept_as_nan_and_never_within_tolerance():
    from megatron_rpg.checkpoint.verify import worst_logit_difference

    close, nan = torch.zeros(2, 3), torch.tensor([[0.0, float("nan"), 0.0]])
    assert worst_logit_difference(0.0, close, close + 1e-3) == pytest.approx(1e-3)
    assert math.isnan(worst_logit_difference(0.5, close[:1], nan))  # max(0.5, nan) would be 0.5
    assert math.isnan(worst_logit_difference(math.nan, close, close))  # and stays nan for later prompts
    assert worst_logit_difference(0.0, close, close + float("inf")) == math.inf
