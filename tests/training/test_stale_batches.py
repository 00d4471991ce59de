"""R²VPO's stale-batch window (training/stale_batches.py), on plain tensors (no model):
- off (0 steps) or empty it returns the step's micro-batches unchanged;
- every mini-batch holds its share of the fresh micro-batches, then of each kept batch newest first,
  rows marked with their age; every micro-batch padded to the widest with mask 0;
- the window keeps the newest K batches, as CPU copies; its state round-trips and is cut to K."""
import pytest
import torch

from megatron_rpg.training.stale_batches import StaleBatches


def _batch(tag: int, width: int, count: int = 4) -> list[dict]:
    """`count` micro-batches of 2 rows; tokens hold the batch tag and the micro-batch index."""
    out = []
    for index in range(count):
        mask = torch.ones(2, width)
        mask[:, 0] = 0
        out.append({"tokens": torch.full((2, width), 10 * tag + index, dtype=torch.long), "loss_mask": mask,
                    "old_logp": torch.full((2, width), -float(tag)), "advantages": torch.tensor([1.0, -1.0])})
    return out


def _ids(micro_batches):
    return [(int(mb["tokens"][0, 0]), int(mb["staleness"][0])) for mb in micro_batches]


def test_off_or_empty_changes_nothing():
    fresh = _batch(1, 5)
    assert StaleBatches(0).with_fresh(fresh, 2) is fresh
    off = StaleBatches(0)
    off.push(fresh)
    assert off.batches == [] and StaleBatches(3).with_fresh(fresh, 2) is fresh


def test_each_mini_batch_gets_its_share_of_every_batch_newest_first():
    stale = StaleBatches(2)
    for tag in (1, 2, 3):  # batch 1 falls out of the window
        stale.push(_batch(tag, 5 + tag))
    mixed = stale.with_fresh(_batch(4, 5), num_mini_batches=2)
    assert _ids(mixed) == [(40, 0), (41, 0), (30, 1), (31, 1), (20, 2), (21, 2),
                           (42, 0), (43, 0), (32, 1), (33, 1), (22, 2), (23, 2)]
    assert {tuple(mb["tokens"].shape) for mb in mixed} == {(2, 8)}  # the widest: batch 3's
    fresh = mixed[0]
    assert torch.equal(fresh["loss_mask"][:, 5:], torch.zeros(2, 3)) and torch.equal(fresh["old_logp"][:, 5:],
                                                                                     torch.zeros(2, 3))
    assert torch.equal(mixed[2]["old_logp"][:, 1], torch.tensor([-3.0, -3.0]))  # kept: its behaviour log-probs


def test_pushed_batches_are_copies_and_the_state_round_trips_cut_to_the_window():
    stale = StaleBatches(3)
    batches = [_batch(tag, 4) for tag in (1, 2, 3)]
    for batch in batches:
        stale.push(batch)
    batches[2][0]["tokens"].zero_()  # the caller's tensors may be reused: the window is unaffected
    assert int(stale.batches[2][0]["tokens"][0, 0]) == 30
    narrower = StaleBatches(2)
    narrower.load_state_dict(stale.state_dict())
    assert [int(batch[0]["tokens"][0, 0]) for batch in narrower.batches] == [20, 30]
    with pytest.raises(ValueError, match="does not split into --num-mini-batches 3"):
        stale.with_fresh(_batch(4, 4), num_mini_batches=3)
    with pytest.raises(ValueError, match="--r2vpo-reuse-steps=-1"):
        StaleBatches(-1)
