"""Properties of the enumeration tools every exactness proof relies on."""
import itertools

import pytest
import torch

from megatron_rpg.losses.exact import TabularPolicy, enumerate_sequences, flat_grad, relative_error


def test_enumerate_sequences_is_lexicographic_and_complete():
    seqs = enumerate_sequences(3, 3)
    expected = torch.tensor(list(itertools.product(range(3), repeat=3)))
    assert torch.equal(seqs, expected)


def test_tabular_policy_is_a_normalised_distribution_with_autoregressive_conditionals():
    policy = TabularPolicy(3, 3, seed=0)
    with torch.no_grad():
        probs = policy.sequence_logp().exp()
        assert abs(float(probs.sum()) - 1.0) < 1e-12
        # the marginal of the first token is softmax(θ_0), and the conditional of the last token
        # given a prefix is softmax(θ_2[prefix]) — checked on every prefix
        first = probs.reshape(3, 9).sum(dim=1)
        assert torch.allclose(first, torch.softmax(policy.params[0][0], -1), atol=1e-14)
        joint = probs.reshape(9, 3)
        conditional = joint / joint.sum(dim=1, keepdim=True)
        assert torch.allclose(conditional, torch.softmax(policy.params[2], -1), atol=1e-14)


def test_length_one_policy_is_a_plain_softmax():
    policy = TabularPolicy(4, 1, seed=1)
    with torch.no_grad():
        assert torch.allclose(policy.sequence_logp(), torch.log_softmax(policy.params[0][0], -1), atol=1e-15)


def test_perturbed_policy_has_new_leaves_with_the_same_shapes_and_different_values():
    policy = TabularPolicy(3, 2, seed=0)
    other = policy.perturbed(0.5, seed=1)
    for p, q in zip(policy.params, other.params):
        assert p.shape == q.shape and q.is_leaf and q.requires_grad and p is not q
        assert float((p - q).detach().abs().max()) > 1e-3
    assert torch.equal(other.sequences, policy.sequences)


def test_flat_grad_matches_a_finite_difference():
    policy = TabularPolicy(3, 2, seed=2)
    reward = torch.arange(9, dtype=torch.float64)
    objective = lambda params: (policy.sequence_logp(params).exp() * reward).sum()
    grad = flat_grad(objective(policy.params), policy.params)
    h = 1e-6
    numeric = []
    for i, p in enumerate(policy.params):
        for j in range(p.numel()):
            bumped = [q.detach().clone() for q in policy.params]
            bumped[i].view(-1)[j] += h
            lowered = [q.detach().clone() for q in policy.params]
            lowered[i].view(-1)[j] -= h
            numeric.append((objective(bumped) - objective(lowered)) / (2 * h))
    assert relative_error(grad, torch.stack(numeric).detach()) < 1e-8


def test_bad_sizes_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="vocab_size"):
        TabularPolicy(1, 2, seed=0)
    with pytest.raises(ValueError, match="length"):
        enumerate_sequences(3, 0)
