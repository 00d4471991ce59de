"""The run's account of skipped and gradient-less optimizer steps (megatron/step_guard.py skips a step
whose loss, gradient norm or optimizer state is not finite).

    skips = SkippedSteps(max_consecutive=10)
    skips.record(outcome, signal=True)   # once per optimizer step; raises after too many in a row
    skips.summary()                      # "2 of 40 optimizer steps skipped (...)" or ""

- each skip is a warning naming the reason; `skipped_steps` in a step's metrics counts its skips;
  fp16 overflows while megatron's loss scaler can still lower the scale are its normal search
  (2**32 down to the gradients' range takes ~20 steps): counted, not warned, not "in a row";
- --max-skipped-steps K optimizer steps skipped in a row end the run (SkippedStepsError) before the
  step's checkpoint: the last checkpoint written holds the last good state;
- a gradient of exactly 0.0 is no fault by itself (a batch whose groups all have equal rewards
  carries no signal; KL's gradient vanishes at θ = θ_old). K in a row although the advantages are
  not all zero end the run (the loss passes no signal back). K in a row from a deterministic policy
  (every sampled token at probability 1, so every group's responses are alike: what a far too large
  --lr leaves, or a converged one) are a warning: the run cannot learn any more, but only the
  reward says whether it collapsed or converged. Such steps are not skipped (Adam's momentum still
  moves the weights, as it should).
- --capo: a mini-batch of which CAPO rejected every token is not stepped on (cause "nothing_kept",
  training/update.py): counted, not a fault, not "in a row". An exactly-zero gradient because CAPO
  rejected every token with a non-zero advantage (masked_out; it may keep zero-advantage tokens,
  which carry no gradient) is not "vanished" either: the loss kept no signal to pass back. K such
  steps in a row are a warning (once per stretch) naming the threshold flags (`masked_out_hint`).
"""
from __future__ import annotations

import warnings


class SkippedStepsError(RuntimeError):
    """Too many optimizer steps in a row were skipped (or had no gradient)."""


class SkippedStepsWarning(UserWarning):
    pass


class SkippedSteps:
    def __init__(self, max_consecutive: int, masked_out_hint: str = ""):
        self.max_consecutive = max_consecutive
        self.masked_out_hint = masked_out_hint  # what to change when the loss's masks keep no signal
        self.steps = self.skipped = self.vanished = self.nothing_kept = self.masked_out_in_a_row = 0
        self.skipped_in_a_row = self.vanished_in_a_row = self.deterministic_in_a_row = 0
        self.state_is_bad = False  # the last skip was for a non-finite state: nothing to checkpoint

    def record(self, outcome, *, signal: bool = True, deterministic: bool = False, masked_out: bool = False) -> None:
        """One optimizer step's StepOutcome; signal: the advantages of the tokens the loss kept are not all
        zero; deterministic: every sampled response token had log-probability exactly 0; masked_out: the
        batch had a non-zero advantage but the loss's masks (CAPO) kept none of them."""
        self.steps += 1
        self.state_is_bad = outcome.cause == "state"
        if outcome.cause == "overflow":  # fp16's loss-scale search (megatron lowers the scale): counted only
            self.skipped += 1
            return
        self._count_masked_out(masked_out)
        if outcome.cause == "nothing_kept":  # CAPO's decision, not a fault: counted only
            self.nothing_kept += 1
            return
        if outcome.skipped is not None:
            self.skipped += 1
            self.skipped_in_a_row += 1
            unsaved = "; no checkpoint is written while it is not finite" if self.state_is_bad else ""
            warnings.warn(f"optimizer step {self.steps} skipped: {outcome.skipped} (parameters and optimizer "
                          f"state unchanged; {self.skipped_in_a_row} in a row, --max-skipped-steps "
                          f"{self.max_consecutive}{unsaved})", SkippedStepsWarning, stacklevel=2)
            if self.skipped_in_a_row >= self.max_consecutive:
                raise SkippedStepsError(
                    f"{self.skipped_in_a_row} optimizer steps in a row skipped (--max-skipped-steps "
                    f"{self.max_consecutive}), the last for: {outcome.skipped}. The run stops; the last "
                    f"checkpoint written holds the last good state. Look for what makes the loss or "
                    f"gradients non-finite (rewards, --rpg-beta, --lr, --clip-grad 0)")
            return
        self.skipped_in_a_row = 0
        vanished = outcome.grad_norm == 0.0 and signal
        self.vanished += vanished
        self.vanished_in_a_row = self.vanished_in_a_row + 1 if vanished else 0
        if self.vanished_in_a_row >= self.max_consecutive:
            raise SkippedStepsError(
                f"the gradient has been exactly 0 for {self.vanished_in_a_row} optimizer steps in a row although "
                f"the advantages are not all zero (--max-skipped-steps {self.max_consecutive}): the loss passes "
                f"no signal back (every ratio clipped, or a saturated softmax); restart from a checkpoint with "
                f"a smaller --lr or wider --rpg-clip")
        stuck = outcome.grad_norm == 0.0 and deterministic
        self.deterministic_in_a_row = self.deterministic_in_a_row + 1 if stuck else 0
        if self.deterministic_in_a_row == self.max_consecutive:  # once per stretch
            warnings.warn(f"the policy has been deterministic (every sampled token had probability 1) with an "
                          f"exactly-zero gradient for {self.max_consecutive} optimizer steps in a row: it cannot "
                          f"learn any more. If its reward is not the task's best, it collapsed (a saturated "
                          f"softmax, e.g. --lr too large): restart from a checkpoint with a smaller --lr",
                          SkippedStepsWarning, stacklevel=2)

    def _count_masked_out(self, masked_out: bool) -> None:
        self.masked_out_in_a_row = self.masked_out_in_a_row + 1 if masked_out else 0
        if self.masked_out_in_a_row == self.max_consecutive:  # once per stretch
            warnings.warn(f"{self.max_consecutive} optimizer steps in a row had no gradient because the loss's masks "
                          f"rejected every token with a non-zero advantage: the policy does not learn. "
                          f"{self.masked_out_hint}", SkippedStepsWarning, stacklevel=3)

    def summary(self) -> str:
        """One line for the end of the run; "" when every step updated with a gradient."""
        parts = []
        if self.skipped:
            parts.append(f"{self.skipped} of {self.steps} optimizer steps skipped (non-finite loss, "
                         f"gradient or optimizer state)")
        if self.vanished:
            parts.append(f"{self.vanished} with an exactly-zero gradient")
        if self.nothing_kept:
            parts.append(f"{self.nothing_kept} of {self.steps} optimizer steps not taken: --capo rejected every token")
        return "; ".join(parts)
