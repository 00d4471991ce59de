"""CAPO's Adam-model moment table (losses/capo.CAPOAdamMoments) in the trainer's torch_dist checkpoint.

The table is our own sparse-update Adam moments of the LM-head rows (megatron/capo_masks.py says why
not megatron's): m and v [V/TP, H] float32 on each rank of the last pipeline stage, for the rows
that rank's output-layer shard holds, and the step count s. Every data-parallel rank holds the same
table (its updates come from the gradient summed over DP). At real sizes it is as large as the
output layer's fp32 main weights, twice, so it goes into the sharded checkpoint, laid out like the
output layer:

    capo.adam_moments.m, capo.adam_moments.v   ShardedTensor, global [V_padded, H], split over TP
                                               along the vocabulary (TP rank r: rows [r·V/TP, (r+1)·V/TP)),
                                               replica id = the DP rank (DP rank 0 writes, the others
                                               are replicas)
    capo.adam_moments.step                     ShardedObject (the int s), replicated over TP and DP

Only the last pipeline stage contributes these keys; every rank saves and loads only its own rows
(no gather). Like the output layer's, the global shape is the padded vocabulary, which depends on TP
(models.padded_vocab_size); as megatron does for its vocabulary-padded layers, the tensors allow a
shape mismatch, so a resume at another TP size loads the rows both paddings hold and the others
as 0: padding rows, which no top-K ever picks, so 0 is what they hold anyway (checked by hand:
TP=1 saved, TP=2 resumed, rank 0's rows equal the saved table bit for bit, rank 1's are 0). trainer_state.json's loss state
says whether a checkpoint holds the table (`capo_moment_table`), so older checkpoints are recognised
without probing the files (megatron/capo_loss.py decides what happens then).

Exactness claim: save + load restores m, v and s bit-exactly (tests/training/test_capo_resume.py).
"""
from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_rpg.losses.capo import CAPOAdamMoments

KEY = "capo.adam_moments"


def _ranks() -> tuple[int, int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, 0
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def moment_table_sharded_state(table: CAPOAdamMoments) -> dict:
    """This rank's part of the table's checkpoint state (module docstring)."""
    tp, tp_size, dp = _ranks()
    state = {name: ShardedTensor.from_rank_offsets(f"{KEY}.{name}", getattr(table, name), (0, tp, tp_size),
                                                   replica_id=dp, allow_shape_mismatch=True)  # padding (below)
             for name in ("m", "v")}
    state["step"] = ShardedObject(f"{KEY}.step", table.step, (1,), (0,), replica_id=(tp, dp))
    return state


def load_moment_table(table: CAPOAdamMoments, loaded: dict) -> None:
    """Copies a loaded moment_table_sharded_state into `table` (shapes checked by megatron's load)."""
    table.load_state_dict(loaded)
