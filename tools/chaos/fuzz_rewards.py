"""Long reward-fuzz runs: N adversarial strings against every reward, and a table of what happened.

    python tools/chaos/fuzz_rewards.py --strings 20000 --seed 3 [--no-large] [--call-timeout 30]

Prints, per reward target: calls, exceptions out of the reward, values outside its stated range, calls over
the reward's own time budget, calls over 5 s, the max call time; then the slowest calls and the
first exceptions with their inputs (abridged). Exit status 1 if any exception or out-of-range value
escaped, or anything was evaluated as code (the canary file or global of tests/rewards/fuzz_harness.py).
--call-timeout (SIGALRM, in this tool only) stops a single runaway call so that a run on unhardened
code finishes; such a call is recorded as an exception "CallTimeout".
"""
from __future__ import annotations

import argparse
import builtins
import importlib.util
import os
import signal
import sys
import tempfile
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "tests" / "rewards" / "fuzz_harness.py"


def _load_harness():
    """The harness by file path: runs against whichever megatron_rpg is on PYTHONPATH (main's, too)."""
    spec = importlib.util.spec_from_file_location("fuzz_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class CallTimeout(Exception):
    pass


def _abridge(text: str, width: int = 60) -> str:
    shown = ascii(text[:width])
    return f"{shown}... ({len(text):,} chars)" if len(text) > width else shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strings", type=int, default=1200, help="how many adversarial strings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random splices")
    parser.add_argument("--no-large", action="store_true", help="leave out the strings of >= 10^5 characters")
    parser.add_argument("--call-timeout", type=float, default=0.0, help="stop a single call after this many "
                        "seconds (0: never)")
    parser.add_argument("--slowest", type=int, default=8, help="how many slowest calls to list")
    args = parser.parse_args(argv)
    if args.strings < 1 or args.call_timeout < 0:
        parser.error(f"--strings={args.strings} must be >= 1 and --call-timeout={args.call_timeout} >= 0")
    harness = _load_harness()
    canary = Path(tempfile.mkdtemp(prefix="rpg-fuzz-")) / "evaluated"
    os.environ[harness.CANARY_FILE_ENV] = str(canary)
    strings = harness.adversarial_strings(args.strings, args.seed, large=not args.no_large)

    def alarm(signum, frame):
        raise CallTimeout(f"call ran past --call-timeout {args.call_timeout} s")

    def arm(record=None):
        if args.call_timeout:
            signal.setitimer(signal.ITIMER_REAL, args.call_timeout)

    if args.call_timeout:
        signal.signal(signal.SIGALRM, alarm)
        arm()
    records = harness.fuzz_rewards(strings, on_call=arm)
    signal.setitimer(signal.ITIMER_REAL, 0)
    evaluated = canary.exists() or hasattr(builtins, harness.CANARY_GLOBAL)

    print(f"{len(strings):,} strings (seed {args.seed}, {'no ' if args.no_large else ''}large ones), "
          f"{len(records):,} calls")
    print(f"{'target':34} {'calls':>7} {'exceptions':>10} {'out of range':>12} {'over budget':>11} {'> 5 s':>6} "
          f"{'max s':>8}")
    targets = sorted({record.target for record in records})
    for target in targets + ["all"]:
        rows = [r for r in records if target in ("all", r.target)]
        out_of_range = sum(r.error is not None and r.error.startswith("OutOfRange") for r in rows)
        print(f"{target:34} {len(rows):>7,} {sum(r.error is not None for r in rows) - out_of_range:>10} "
              f"{out_of_range:>12} "
              f"{sum(r.over_budget for r in rows):>11} {sum(r.seconds > 5 for r in rows):>6} "
              f"{max(r.seconds for r in rows):>8.3f}")
    print("slowest calls:")
    for record in sorted(records, key=lambda r: -r.seconds)[:args.slowest]:
        print(f"  {record.seconds:8.3f} s  {record.target:34} {_abridge(strings[record.index])}")
    errors = [record for record in records if record.error is not None]
    if errors:
        print("exceptions (first 10):")
        for record in errors[:10]:
            print(f"  {record.target:34} {record.error[:80]}  input {_abridge(strings[record.index], 40)}")
    print(f"evaluated as code: {'YES' if evaluated else 'no'}")
    return 1 if errors or evaluated else 0


if __name__ == "__main__":
    sys.exit(main())
