"""Entry point: parse and validate the flags, then train.

    python -m megatron_rpg.train --config examples/tiny_cpu.yaml
    torchrun --nproc-per-node 8 -m megatron_rpg.train --config examples/rpg_7b.yaml
"""
from __future__ import annotations

import os
import sys

from megatron_rpg.training.config import parse_train_config
from megatron_rpg.training.loop import train
from megatron_rpg.training.skipped_steps import SkippedStepsError


def main(argv=None) -> int:
    config = parse_train_config(argv)
    try:
        history = train(config)
    except ValueError as error:  # bad input found at start-up (layout, model files): no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SkippedStepsError as error:  # --max-skipped-steps: the run stopped on purpose
        print(f"error: {error}", file=sys.stderr)
        return 1
    if history and os.environ.get("RANK", "0") == "0":  # every rank has the same history
        first, last = history[0], history[-1]
        print(f"reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f} over {len(history)} steps "
              f"({last['elapsed_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
