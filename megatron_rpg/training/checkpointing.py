"""The trainer's checkpoints (the model is built by training/build.py), in Megatron-LM's layout.

Save (`--save DIR`, every `--save-interval` steps and at the end): `DIR/iter_<step>/` holds one
reshardable torch_dist checkpoint — the model (the keys tools/convert_megatron_to_hf.py exports),
the optimizer (Adam moments, dp_reshardable; SVRPG's θ̃ and μ shards when on), each rank's sampling
state, `trainer_state.json` (the step, the layout, the loss's state: R²VPO's λ; the --ref-policy mode)
and the --ref-policy weights when kept, and `megatron_rpg_manifest.json` (size and
sha256 of every file, written last) — and `DIR/latest_checkpointed_iteration.txt` names the newest.
It is written into a staging folder of ours inside DIR, renamed to iter_<step>, then the latest file
is replaced atomically (checkpoint/layout.py); `--keep-last N` deletes older iterations after.

`--load DIR` resumes from the latest iteration (`DIR/iter_...` from that one; an old single-folder
checkpoint of ours still loads), after verifying its checksums; a damaged latest falls back to the
previous iteration with a warning. `--load` = `--save` on a first run (nothing there yet) starts
fresh. A resume restores model, optimizer, step, and — in the same layout (world size, TP, PP) — every
rank's generators, so the resumed run continues bit-exactly; in another layout the generators
restart from (seed, step). `--finetune` loads the weights only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rpg.checkpoint import integrity, layout
from megatron_rpg.checkpoint.convert import HF_SIDE_DIR, describe_checkpoint
from megatron_rpg.megatron.checkpoint_processes import writer_processes_die_with_trainer
from megatron_rpg.megatron.models import padded_vocab_size
from megatron_rpg.megatron.optimizer_setup import bare_model
from megatron_rpg.megatron.compat import init_optimizer_states_for_loading, restore_adam_steps
from megatron_rpg.training.tasks import GENERATION_CONFIG, find_tokenizer_dir, model_hf_dir

TRAINER_STATE_FILE = "trainer_state.json"
FIRST_RUN_FROM_PRETRAINED = object()  # _resolve_load: --load = --save is empty, --pretrained-checkpoint given
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}  # reshardable over DP


def check_save_dir(directory: str) -> None:
    """--save DIR holds iter_ folders, the latest file and our staging folders: refuse one that holds
    anything else (a parent folder of runs, an old single-folder checkpoint), before any training."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--save {directory} exists and is not a folder; choose a folder for the checkpoints")
    if not os.path.isdir(directory):
        return
    if is_resumable(directory):
        raise ValueError(f"--save {directory} is a single-folder checkpoint of an earlier megatron_rpg; resume "
                         f"from it with --load {directory} and --save a new folder (iter_ folders go there)")
    foreign = layout.foreign_entries(directory)
    if foreign:
        raise ValueError(f"--save {directory} is not empty and is not a megatron_rpg checkpoint folder (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder (e.g. "
                         f"{os.path.join(directory, 'run1')}): only iter_ folders and "
                         f"{layout.LATEST_FILE} belong there")


def check_save_writable(directory: str) -> None:
    """Creates --save and writes a probe file there: a read-only filesystem, a path below a regular
    file or a folder without write permission fails here, before the model is built."""
    try:
        os.makedirs(directory, exist_ok=True)
        layout.delete_staging(layout.new_staging_folder(directory))  # ours even if a kill comes between
    except OSError as error:
        raise ValueError(f"--save {directory} cannot be written ({error.strerror or error}: "
                         f"{error.filename or directory}); choose a writable folder") from error


def is_resumable(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, TRAINER_STATE_FILE))


def resumes(checkpoint) -> bool:
    """Whether --load (a CheckpointConfig's) continues a run of ours (model, optimizer, step, sampling
    state) rather than taking weights only (a converted checkpoint, or --finetune)."""
    return (checkpoint.load is not None and not checkpoint.finetune
            and is_resumable(layout.latest_checkpoint(checkpoint.load)))


def prepare_checkpoints(config):
    """Start-up, before the model is built (collective): --save is checked writable and cleared of
    our stale staging folders; --load is resolved to one verified checkpoint folder (the latest
    iteration, or an older one with a warning when the latest is damaged) or to None for a first run
    of --load = --save. Returns the TrainConfig with that --load."""
    checkpoint = config.checkpoint
    if checkpoint.save:
        # every rank checks before any rank writes its probe (a probe seen half-made looks foreign)
        _on_every_rank("use --save", lambda: check_save_dir(checkpoint.save))
        _on_every_rank("write into --save", lambda: check_save_writable(checkpoint.save))
        if dist.get_rank() == 0:
            layout.remove_stale_staging(checkpoint.save)  # of saves killed in an earlier run
        dist.barrier()
    if checkpoint.load is None:
        return config
    load = _resolve_load(config)
    if load is FIRST_RUN_FROM_PRETRAINED:  # the pretrained weights, as --load --finetune would take them
        pretrained = dataclasses.replace(config, checkpoint=dataclasses.replace(
            checkpoint, load=checkpoint.pretrained, save=None, pretrained=None, finetune=True))
        load = _resolve_load(pretrained)
        return dataclasses.replace(config, checkpoint=dataclasses.replace(checkpoint, load=load, finetune=True))
    if load is not None and is_resumable(load) and not checkpoint.finetune:
        with open(os.path.join(load, TRAINER_STATE_FILE), encoding="utf-8") as f:
            step = int(json.load(f)["step"])
        if step == config.training.train_iters:  # a requeued job that had finished: not an error
            raise NothingToTrain(f"--load {load} is at step {step} = --train-iters: the run is complete, nothing "
                                 f"to train (raise --train-iters to continue)")
        if step > config.training.train_iters:
            raise ValueError(f"--load {load} is at step {step}, beyond --train-iters "
                             f"{config.training.train_iters}: raise --train-iters to continue, or pass --finetune "
                             f"to train its weights from step 0")
    return dataclasses.replace(config, checkpoint=dataclasses.replace(checkpoint, load=load))


class NothingToTrain(Exception):
    """--load of a finished run with the same --train-iters (a requeued job): train.py exits 0."""


def _resolve_load(config) -> str | None:
    checkpoint = config.checkpoint
    load = checkpoint.load
    found = layout.candidates(load)
    if not found:
        same_as_save = checkpoint.save and os.path.abspath(checkpoint.save) == os.path.abspath(load)
        if same_as_save and not layout.has_checkpoint_files(load):  # a first run: nothing to resume yet
            if checkpoint.pretrained is not None:
                return FIRST_RUN_FROM_PRETRAINED
            if config.model.preset is None and config.model.hf_config is None:
                raise ValueError(f"--load {load} holds no checkpoint yet (a first run of --load = --save); "
                                 f"give --pretrained-checkpoint, --model-preset or --hf-config for the model "
                                 f"to start from")
            return None
        if not os.path.isdir(load):
            raise ValueError(f"--load {load}: no such checkpoint folder")
        if os.path.isfile(os.path.join(load, "config.json")):
            raise ValueError(f"--load {load} is a Hugging Face model folder; convert it first: python "
                             f"tools/convert_hf_to_megatron.py --hf-dir {load} --output CHECKPOINT_DIR")
        raise ValueError(f"--load {load} holds no checkpoint (no {layout.LATEST_FILE}, no iter_ folders, no "
                         f"torch_dist metadata.json)")
    errors = []
    for candidate in found:
        error = _on_every_rank_result(lambda: integrity.verify_checkpoint(
            candidate, share=(dist.get_rank(), dist.get_world_size())))
        if error is None:
            if errors and dist.get_rank() == 0:
                warnings.warn(f"--load {load}: {errors[0]}; resuming from the previous checkpoint {candidate} "
                              f"instead", stacklevel=2)
            return candidate
        errors.append(error)
    more = f" (and {len(errors) - 1} older checkpoint(s) of it are damaged too)" if len(errors) > 1 else ""
    raise integrity.DamagedCheckpoint(f"--load {load}: {errors[0]}{more}; restore the file or load another "
                                      f"checkpoint")


def _sharded_state(model, optimizer, svrpg, rank_state, *, is_loading: bool, with_rank_state: bool = True,
                   reference=None, loss_tensors: dict | None = None):
    model_sd = bare_model(model[0]).sharded_state_dict()
    owner = svrpg if svrpg is not None else optimizer
    state = {"model": model_sd,
             "optimizer": owner.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)}
    if reference is not None:  # --ref-policy's weights, in the distributed optimizer's layout
        state["ref_policy"] = reference.sharded_state_dict()
    if loss_tensors:  # CAPO's moment table (this rank's rows; none off the last pipeline stage)
        state["loss"] = loss_tensors
    if with_rank_state:  # one object per rank: its generators (identical only at the same layout)
        state["rank_state"] = ShardedObject("trainer.rank_state", rank_state, (dist.get_world_size(),),
                                            (dist.get_rank(),), replica_id=0)
    return state


def save_checkpoint(model, optimizer, svrpg, hf_config, config, *, step: int, rank_state,
                    loss_state: dict | None = None, reference=None, loss=None) -> str:
    """Model + optimizer (+ SVRPG, + the --ref-policy weights, + CAPO's moment table of `loss`) +
    sampling state + the loss's state_dict() (the same on every rank; into trainer_state.json) as
    --save/iter_<step>; returns its path.
    Collective: every rank calls it; rank 0 owns the staging folder, which becomes iter_<step> only
    once complete and checksummed. Each phase ends with the ranks exchanging their errors
    (_on_every_rank), so a failure on any rank in any phase raises on every rank (none waits forever
    in a collective), the staging folder is deleted and the previous checkpoint stays the latest."""
    writer_processes_die_with_trainer()
    started = time.perf_counter()
    rank0 = dist.get_rank() == 0
    save = config.checkpoint.save
    staging = None
    try:
        staging = _on_every_rank("prepare the staging folder in --save", lambda: _new_staging(save) if rank0 else None)
        holder = [staging]
        dist.broadcast_object_list(holder, src=0)
        staging = holder[0]
        state = _on_every_rank("collect the checkpoint state",
                               lambda: _sharded_state(model, optimizer, svrpg, rank_state, is_loading=False,
                                                      reference=reference, loss_tensors=_loss_tensors(loss)))
        _on_every_rank("write the checkpoint", lambda: dist_checkpointing.save(state, staging))
        names = _on_every_rank("finish the checkpoint", lambda: _describe(staging, model, svrpg, hf_config, config,
                                                                          step, loss_state or {}) if rank0 else None)
        holder = [names]
        dist.broadcast_object_list(holder, src=0)
        share = integrity.my_share(holder[0], (dist.get_rank(), dist.get_world_size()))
        entries = _on_every_rank("checksum the checkpoint files", lambda: integrity.file_entries(staging, share))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        path = _on_every_rank("move the checkpoint into place", lambda: _publish(save, staging, step, gathered, config)
                              if rank0 else None)
    except BaseException:
        if rank0 and staging is not None:
            layout.remove_stale_staging(save)
        raise
    if rank0:
        size = sum(entry["size"] for part in gathered for entry in part.values())
        print(f"saved checkpoint {path} (step {step}, {size / 2**20:.1f} MiB, "
              f"{time.perf_counter() - started:.2f} s)", file=sys.stderr, flush=True)
    return os.path.join(save, layout.iteration_name(step))


def _new_staging(save: str) -> str:
    layout.remove_stale_staging(save)  # of saves killed before
    return layout.staging_payload(layout.new_staging_folder(save))


def _publish(save: str, staging: str, step: int, gathered: list[dict], config) -> str:
    integrity.write_manifest(staging, {name: entry for part in gathered for name, entry in part.items()})
    path = layout.publish(save, os.path.dirname(staging), step)
    if config.checkpoint.keep_last:
        layout.prune(save, config.checkpoint.keep_last)
    return path


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


def _on_every_rank_result(work):
    """work() on every rank; None when it succeeded everywhere, else the first failing rank's error
    (a DamagedCheckpoint's message), the same on every rank."""
    try:
        work()
        error = None
    except Exception as caught:  # noqa: BLE001 - every rank must learn of it (none may hang)
        error = str(caught) if isinstance(caught, integrity.DamagedCheckpoint) else f"{type(caught).__name__}: {caught}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((message for message in errors if message is not None), None)


def _describe(staging, model, svrpg, hf_config, config, step, loss_state) -> list[str]:
    """The side files (HF config, tokenizer, trainer state); returns every file of the checkpoint
    to checksum."""
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
                   "capo_moment_table": config.capo.enabled and config.capo.optimizer_model == "adam",
                   "loss_state": loss_state}, f, indent=2)  # JSON floats round-trip exactly
    return integrity.checkpoint_files(staging)


def _keep_generation_config(config, side_dir: str) -> None:
    """The model's generation_config.json (its end ids: what the rollout stops on) goes with the
    checkpoint, so a run resumed from it stops on the same ids."""
    source = model_hf_dir(config)
    if source and os.path.isfile(os.path.join(source, GENERATION_CONFIG)):
        shutil.copy2(os.path.join(source, GENERATION_CONFIG), os.path.join(side_dir, GENERATION_CONFIG))


def saved_loss_state(directory: str) -> dict:
    """The loss's state_dict() saved with the checkpoint ({} for a stateless loss or an older checkpoint)."""
    with open(os.path.join(layout.latest_checkpoint(directory), TRAINER_STATE_FILE), encoding="utf-8") as f:
        return json.load(f).get("loss_state", {})


def _loss_tensors(loss) -> dict:
    """The loss's sharded checkpoint state (CAPO's moment table), {} for other losses."""
    return loss.moment_table_state() if getattr(loss, "has_moment_table", False) else {}


def _moment_table_to_load(loss, saved: dict, directory: str) -> dict:
    """The request for CAPO's moment table when this run keeps one: {} (with a warning) if the checkpoint
    has none. A warning, not an error: the table only shapes which tokens CAPO masks; restarting it at
    zero is exactly a fresh --capo run's first Adam step (well-defined), and it is how every checkpoint
    written before the table was saved resumes, or one of a run without --capo that turns it on now.
    Refusing would leave such runs --finetune only, losing the optimizer and sampling state."""
    if not getattr(loss, "has_moment_table", False):
        return {}  # a table in the checkpoint is not read (another --capo-optimizer-model, or no --capo)
    if not saved.get("capo_moment_table", False):
        if dist.get_rank() == 0:
            warnings.warn(f"--load {directory} holds no CAPO moment table (written before megatron_rpg saved it, "
                          f"or without --capo / with --capo-optimizer-model sgd): the Adam model's moments "
                          f"restart at zero (step 0), so CAPO's masks differ from the uninterrupted run's until "
                          f"they build up again", stacklevel=3)
        return {}
    return loss.moment_table_state()


def resume_checkpoint(model, optimizer, svrpg, directory: str, rank_state_template, reference=None, loss=None):
    """Loads model, optimizer (+ SVRPG, + CAPO's moment table into `loss`) state from a checkpoint of
    ours; returns (step, this rank's sampling state, or None when the layout (world size, TP, PP)
    differs from the saving run's)."""
    directory = layout.latest_checkpoint(directory)
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
    if loss is not None and hasattr(loss, "build_moment_table"):
        loss.build_moment_table(model)  # the table to load into
    table = _moment_table_to_load(loss, saved, directory)
    request = _sharded_state(model, optimizer, svrpg, rank_state_template, is_loading=True,
                             with_rank_state=same_world, reference=reference, loss_tensors=table)
    loaded = dist_checkpointing.load(request, directory)
    if table:
        loss.load_moment_table(loaded["loss"])
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
