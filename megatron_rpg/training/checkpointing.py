"""The trainer's checkpoints (the model is built by training/build.py).

Save (`--save`, every `--save-interval` steps and at the end): one reshardable torch_dist
checkpoint holding the model (the keys tools/convert_megatron_to_hf.py exports), the optimizer
(Adam moments, dp_reshardable; SVRPG's θ̃ and μ shards when on), each rank's sampling state, and
`trainer_state.json` (the step, the layout, the loss's state: R²VPO's λ). `--load` of such a checkpoint resumes: model,
optimizer, step, and — in the same layout (world size, TP, PP) — every rank's generators, so the
resumed run continues bit-exactly; in another layout the generators restart from (seed, step). `--finetune`
loads the weights only.

Saving writes into a temporary folder next to --save and renames it into place, so an existing
checkpoint is replaced only by a complete one (checkpoint/convert.py's staged_output_dir).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rpg.checkpoint.convert import HF_SIDE_DIR, describe_checkpoint, staged_output_dir
from megatron_rpg.megatron.models import padded_vocab_size
from megatron_rpg.megatron.optimizer_setup import bare_model
from megatron_rpg.megatron.compat import init_optimizer_states_for_loading, restore_adam_steps
from megatron_rpg.training.tasks import GENERATION_CONFIG, find_tokenizer_dir, model_hf_dir

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}  # reshardable over DP

def check_save_dir(directory: str) -> None:
    """--save replaces its folder with each checkpoint: refuse one that holds anything but a checkpoint
    of ours (a parent folder of runs, say), before any training."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--save {directory} exists and is not a folder")
    if os.path.isdir(directory) and os.listdir(directory) and not is_resumable(directory):
        raise ValueError(f"--save {directory} is not empty and is not a megatron_rpg checkpoint (no "
                         f"{TRAINER_STATE_FILE}); each save replaces the whole folder, so choose a new or "
                         f"empty one (e.g. {os.path.join(directory, 'run1')})")


def is_resumable(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, TRAINER_STATE_FILE))


def resumes(checkpoint) -> bool:
    """Whether --load (a CheckpointConfig's) continues a run of ours (model, optimizer, step, sampling
    state) rather than taking weights only (a converted checkpoint, or --finetune)."""
    return checkpoint.load is not None and not checkpoint.finetune and is_resumable(checkpoint.load)


def _sharded_state(model, optimizer, svrpg, rank_state, *, is_loading: bool, with_rank_state: bool = True,
                   reference=None):
    model_sd = bare_model(model[0]).sharded_state_dict()
    owner = svrpg if svrpg is not None else optimizer
    state = {"model": model_sd,
             "optimizer": owner.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)}
    if reference is not None:  # --ref-policy's weights, in the distributed optimizer's layout
        state["ref_policy"] = reference.sharded_state_dict()
    if with_rank_state:  # one object per rank: its generators (identical only at the same layout)
        state["rank_state"] = ShardedObject("trainer.rank_state", rank_state, (dist.get_world_size(),),
                                            (dist.get_rank(),), replica_id=0)
    return state


def save_checkpoint(model, optimizer, svrpg, hf_config, config, *, step: int, rank_state,
                    loss_state: dict | None = None, reference=None) -> None:
    """Model + optimizer (+ SVRPG, + the --ref-policy weights) + sampling state + the loss's
    state_dict() (the same on every rank; into trainer_state.json) at --save. Collective: every rank calls it;
    rank 0 owns the staging folder, which replaces --save only once complete. Each phase ends with
    the ranks exchanging their errors (_on_every_rank), so a failure on any rank in any phase raises
    on every rank (none waits forever in a collective) and the previous checkpoint stays in place."""
    rank0 = dist.get_rank() == 0
    with contextlib.ExitStack() as staged:
        staging = _on_every_rank("prepare the staging folder next to --save", lambda: staged.enter_context(
            staged_output_dir(config.checkpoint.save, overwrite=True)) if rank0 else None)
        holder = [staging]
        dist.broadcast_object_list(holder, src=0)
        staging = holder[0]
        state = _on_every_rank("collect the checkpoint state",
                               lambda: _sharded_state(model, optimizer, svrpg, rank_state, is_loading=False,
                                                      reference=reference))
        _on_every_rank("write the checkpoint", lambda: dist_checkpointing.save(state, staging))
        _on_every_rank("finish the checkpoint", lambda: _describe(staging, model, svrpg, hf_config, config, step,
                                                                  loss_state or {}) if rank0 else None)
        # renamed into place (rank 0 leaves staged_output_dir) only once every rank succeeded
        _on_every_rank("move the checkpoint into place", staged.close)


def _on_every_rank(what: str, work):
    """work() on this rank, then an all-gather of every rank's error: raises on every rank if any
    failed (the failing rank its own error, the others a RuntimeError naming the rank and error)."""
    try:
        result, error = work(), None
    except Exception as caught:  # noqa: BLE001 - reported to the other ranks, then re-raised
        result, error = None, caught
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} could not {what}: {message}")
    return result


def _describe(staging, model, svrpg, hf_config, config, step, loss_state) -> None:
    gpt = bare_model(model[0])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    describe_checkpoint(staging, hf_config, padded_vocab_size=padded_vocab_size(int(hf_config.vocab_size), tp),
                        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
                        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size,
                        dtypes={"params": str(next(gpt.parameters()).dtype)},
                        tokenizer_dir=find_tokenizer_dir(config))  # so --load and the HF export have it
    _keep_generation_config(config, os.path.join(staging, HF_SIDE_DIR))
    with open(os.path.join(staging, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({"step": step, "world_size": dist.get_world_size(), "svrpg": svrpg is not None,
                   "ref_policy": config.reference.mode,
                   "tensor_model_parallel_size": config.parallel.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": config.parallel.pipeline_model_parallel_size,
                   "loss_state": loss_state}, f, indent=2)  # JSON floats round-trip exactly


def _keep_generation_config(config, side_dir: str) -> None:
    """The model's generation_config.json (its end ids: what the rollout stops on) goes with the
    checkpoint, so a run resumed from it stops on the same ids."""
    source = model_hf_dir(config)
    if source and os.path.isfile(os.path.join(source, GENERATION_CONFIG)):
        shutil.copy2(os.path.join(source, GENERATION_CONFIG), os.path.join(side_dir, GENERATION_CONFIG))


def saved_loss_state(directory: str) -> dict:
    """The loss's state_dict() saved with the checkpoint ({} for a stateless loss or an older checkpoint)."""
    with open(os.path.join(directory, TRAINER_STATE_FILE), encoding="utf-8") as f:
        return json.load(f).get("loss_state", {})


def resume_checkpoint(model, optimizer, svrpg, directory: str, rank_state_template, reference=None):
    """Loads model, optimizer (+ SVRPG) state from a checkpoint of ours; returns (step, this rank's
    sampling state, or None when the layout (world size, TP, PP) differs from the saving run's)."""
    with open(os.path.join(directory, TRAINER_STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    if saved["svrpg"] != (svrpg is not None):
        raise ValueError(f"--load {directory} was saved {'with' if saved['svrpg'] else 'without'} --svrpg; "
                         f"resume with the same setting, or pass --finetune to load the weights only")
    saved_reference, wanted = saved.get("ref_policy", "old"), reference.config.mode if reference else "old"
    if saved_reference != wanted:
        raise ValueError(f"--load {directory} was saved with --ref-policy {saved_reference}; resume with the same "
                         f"(this run: {wanted}), or pass --finetune to load the weights only")
    # each rank's sampling state belongs to its place in the layout: restore it only in the same one
    same_world = (saved["world_size"] == dist.get_world_size()
                  and saved["tensor_model_parallel_size"] == parallel_state.get_tensor_model_parallel_world_size()
                  and saved["pipeline_model_parallel_size"] == parallel_state.get_pipeline_model_parallel_world_size())
    init_optimizer_states_for_loading(optimizer)  # a fresh Adam has no state to load into
    request = _sharded_state(model, optimizer, svrpg, rank_state_template, is_loading=True,
                             with_rank_state=same_world, reference=reference)
    loaded = dist_checkpointing.load(request, directory)
    bare_model(model[0]).load_state_dict(loaded["model"])
    if reference is not None:
        reference.load_state_dict(loaded["ref_policy"])
    if svrpg is not None:
        svrpg.load_state_dict(loaded["optimizer"])
    else:
        with torch.no_grad():  # megatron copies into fp32 main shards that view leaf params
            optimizer.load_state_dict(loaded["optimizer"])
            restore_adam_steps(optimizer, loaded["optimizer"])
    return int(saved["step"]), (loaded["rank_state"] if same_world else None)
