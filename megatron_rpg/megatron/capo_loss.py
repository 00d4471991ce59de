"""`--capo`: any policy loss with CAPO's curvature masks (megatron/capo_masks.py) on its tokens.

    loss = CAPOLoss(build_policy_loss(config.loss), config.capo, lr=lambda: current_lr(optimizer), ...)

rl_forward_backward hands a loss with `needs_hidden_states` the final hidden states [b, s, H], the
output weight shard and the tokens in its LossInputs (the fused output layer's seam). Per micro-batch,
at the parameters the gradient is taken at: the masks of the response tokens (position t's hidden
state predicts tokens[t + 1]; logits / temperature, as sampled: h / T is the model's hidden state),
then the inner loss on mask · keep, so a rejected token has no loss and no gradient, and the
normaliser counts the kept tokens only. The Adam model's table is made at the first call on this
rank's output-weight shard (or before, by `build_moment_table`, for a resume to load into) and moved
by `finish_step` once per optimizer step (training/update.py); it is checkpointed sharded like the
output layer (megatron/capo_checkpoint.py). Metrics: `capo_rejected_{level}` and
`capo_rejected_total`, fractions of the response tokens. `kept_signal` tells the trainer whether the
last mini-batch kept a token with a non-zero advantage (an all-rejected mini-batch is not stepped on).
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_rpg.losses.aggregation import aggregate_sum
from megatron_rpg.losses.capo import CAPOAdamMoments, CAPOConfig
from megatron_rpg.losses.policy_loss import LossInputs, PolicyLoss
from megatron_rpg.megatron.capo_checkpoint import load_moment_table, moment_table_sharded_state
from megatron_rpg.megatron.capo_masks import capo_token_masks, optimizer_model, rejection_rates


def _groups():
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return None, None
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_data_parallel_group()


class CAPOLoss(PolicyLoss):
    """The inner loss on CAPO's kept tokens. lr: the current learning rate (called per micro-batch);
    adam: the trainer's (β₁, β₂, ε) for the Adam model."""

    needs_hidden_states = True

    def __init__(self, inner: PolicyLoss, config: CAPOConfig, *, lr, temperature: float = 1.0,
                 vocab_size: int | None = None, adam: tuple[float, float, float] = (0.9, 0.999, 1e-8)):
        if not config.enabled:
            raise ValueError("CAPOLoss needs CAPOConfig(enabled=True) (--capo)")
        self.inner, self.config, self.lr, self.temperature = inner, config, lr, float(temperature)
        self.vocab_size, self.adam = vocab_size, adam
        self.name, self.aggregation = f"capo+{inner.name}", inner.aggregation
        self.optimizer_model = None
        self._kept_signal = False

    @property
    def metric_units(self) -> str:
        return self.inner.metric_units

    def kept(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """(keep [b, s] bool aligned with the tokens, the rejection-rate metrics) for one micro-batch."""
        if inputs.hidden is None or inputs.output_weight is None or inputs.tokens is None:
            raise ValueError("--capo needs the final hidden states in the loss: run with the fused output layer "
                             "(rl_forward_backward(output_layer='fused'), the default)")
        weight = inputs.output_weight
        if self.optimizer_model is None:
            self._build_optimizer_model(weight)
        mask = torch.ones_like(inputs.logp, dtype=torch.bool) if inputs.mask is None else inputs.mask.bool()
        advantages = inputs.advantages if inputs.advantages.dim() == 1 else inputs.advantages[:, 1:]
        tp_group, dp_group = _groups()
        keep, masks = capo_token_masks(inputs.hidden[:, :-1].detach() / self.temperature, weight,
                                       inputs.tokens[:, 1:], advantages, mask[:, 1:], self.config,
                                       self.optimizer_model, float(self.lr()), tp_group=tp_group,
                                       dp_group=dp_group, vocab_size=self.vocab_size)
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # position 0 predicts nothing
        signal = inputs.advantages if inputs.advantages.dim() == 2 else inputs.advantages[:, None].expand_as(keep)
        self._kept_signal |= bool((keep & mask & (signal != 0)).any())
        return keep, rejection_rates(masks)

    def kept_signal(self) -> bool:
        """Whether a micro-batch since the last call kept a token with a non-zero advantage on this rank
        (training/update.py asks once per optimizer step); resets."""
        signal, self._kept_signal = self._kept_signal, False
        return signal

    @property
    def masked_out_hint(self) -> str:
        """What to change when CAPO keeps no token with a non-zero advantage, step after step."""
        tau_f, tau_h = self.config.thresholds
        return (f"--capo rejects them with tau_F = {tau_f:g}, tau_H = {tau_h:g} (--capo-preset {self.config.preset}): "
                f"raise --capo-tau-f / --capo-tau-h (the per-level rates are in the capo_rejected_* metrics), "
                f"or lower --lr (m_H grows like lr, m_F like lr^2); the recipes' thresholds are for large models")

    def _build_optimizer_model(self, weight: torch.Tensor) -> None:
        beta1, beta2, eps = self.adam
        self.optimizer_model = optimizer_model(self.config, weight, beta1=beta1, beta2=beta2, eps=eps)

    def build_moment_table(self, model_chunks: list) -> None:
        """Makes the Adam model's table now (on the stage with the output layer) from its weight
        shape, so a resume can load into it; the same zeros the first micro-batch would make."""
        from megatron_rpg.megatron.optimizer_setup import bare_model
        last = bare_model(model_chunks[-1])
        if self.optimizer_model is None and last.post_process:
            tied = last.share_embeddings_and_output_weights
            self._build_optimizer_model(last.shared_embedding_or_output_weight() if tied else last.output_layer.weight)

    @property
    def has_moment_table(self) -> bool:
        """--capo-optimizer-model adam: a table to checkpoint (on the last pipeline stage)."""
        return self.config.optimizer_model == "adam"

    def moment_table_state(self) -> dict:
        """This rank's sharded checkpoint state of the table ({} off the last stage, or without one)."""
        if not isinstance(self.optimizer_model, CAPOAdamMoments):
            return {}
        return moment_table_sharded_state(self.optimizer_model)

    def load_moment_table(self, loaded: dict) -> None:
        if loaded:
            load_moment_table(self.optimizer_model, loaded)

    def _masked(self, inputs: LossInputs) -> tuple[LossInputs, dict]:
        keep, rates = self.kept(inputs)
        mask = keep if inputs.mask is None else inputs.mask * keep.to(inputs.mask.dtype)
        return dataclasses.replace(inputs, mask=mask), rates

    def per_token_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        masked, rates = self._masked(inputs)
        per_token, metrics = self.inner.per_token_loss(masked)
        return per_token, {**metrics, **rates}

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        masked, rates = self._masked(inputs)
        per_token, metrics = self.inner.per_token_loss(masked)
        loss_sum, count = aggregate_sum(per_token, masked.mask, self.aggregation)
        return loss_sum, count, {**metrics, **rates}

    def finish_step(self, applied: bool = True) -> None:
        """After an optimizer step (applied=False: it was skipped): the Adam model's moment update."""
        if isinstance(self.optimizer_model, CAPOAdamMoments):
            self.optimizer_model.finish_step(applied)

    def after_step(self, global_metrics: dict) -> dict:
        return self.inner.after_step(global_metrics)

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # the moment table is in the sharded checkpoint (moment_table_state)

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
