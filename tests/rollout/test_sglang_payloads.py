"""The SGLang engine's pure parts, without a server (tests/rollout/test_sglang_engine.py has the real one):
- a bucket's flattened_bucket payload, pickled as sent and rebuilt the way SGLang's
  FlattenedTensorBucket.reconstruct_tensors does (slice, view as dtype, reshape), is bit-exact, and
  its pickle names only globals SGLang's allow-list unpickler accepts;
- greedy becomes top_k=1 at the sampling temperature (the returned log-prob stays at that
  temperature), top_k 0 becomes SGLang's -1 (off), and only our stop ids end a response;
- responses land in the embedded engine's Rollout layout (tokens, mask, log-probs aligned);
- --sglang-*/--rollout-sync without --rollout-engine sglang, and launch flags with --sglang-url, are refused.
"""
from __future__ import annotations

import base64
import io
import pickle

import pytest
import torch

from megatron_rpg.rollout.engine import SamplingParams
from megatron_rpg.rollout.sglang_engine import rollout_from_responses, sampling_payload
from megatron_rpg.rollout.sglang_sync import flattened_bucket_payload, serialize_for_sglang
from megatron_rpg.rollout.weight_export import WeightBucket

# the globals SGLang 0.5.23's SafeUnpickler allows that such a payload needs (a subset of its list)
_ALLOWED = {("builtins", "list"), ("builtins", "dict"), ("types", "SimpleNamespace"), ("torch", "Size"),
            ("torch", "float32"), ("torch", "bfloat16"), ("torch", "uint8"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch.storage", "_load_from_bytes"), ("collections", "OrderedDict"), ("torch", "ByteStorage"),
            ("torch", "FloatStorage"), ("torch", "BFloat16Storage"), ("torch", "UntypedStorage"),
            ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor")}


class _AllowListUnpickler(pickle.Unpickler):
    seen: set

    def find_class(self, module, name):
        self.seen.add((module, name))
        if (module, name) not in _ALLOWED:
            raise AssertionError(f"{module}.{name} is not in SGLang's unpickler allow-list")
        return super().find_class(module, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flattened_bucket_payload_round_trip(dtype):
    generator = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.randn(3, 5, generator=generator).to(dtype)),
             ("b.bias", torch.randn(7, generator=generator).to(dtype)),
             ("c.weight", torch.randn(2, 2, 2, generator=generator).to(dtype)[:, 1])]  # not contiguous
    encoded = serialize_for_sglang(flattened_bucket_payload(WeightBucket(dtype, named))[0])
    unpickler = _AllowListUnpickler(io.BytesIO(base64.b64decode(encoded)))
    unpickler.seen = set()
    payload = unpickler.load()
    flat = payload["flattened_tensor"]
    rebuilt = [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in payload["metadata"]]
    assert [name for name, _ in rebuilt] == [name for name, _ in named]
    for (_, got), (_, want) in zip(rebuilt, named):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_sampling_payload():
    greedy = sampling_payload(SamplingParams(max_new_tokens=4, temperature=0.7, greedy=True, stop_token_ids=(2,)))
    assert greedy["top_k"] == 1 and greedy["temperature"] == 0.7 and greedy["stop_token_ids"] == [2]
    assert greedy["ignore_eos"] is True and greedy["max_new_tokens"] == 4
    sampled = sampling_payload(SamplingParams(max_new_tokens=4, top_p=0.9))
    assert sampled["top_k"] == -1 and sampled["top_p"] == 0.9
    assert sampling_payload(SamplingParams(max_new_tokens=4, top_k=5))["top_k"] == 5


def test_rollout_from_responses_layout():
    rollout = rollout_from_responses([[5, 6], [7]], [([1, 2, 3], [-0.5, -1.0, -1.5]), ([4], [-2.0])], 3)
    assert rollout.tokens.tolist() == [[5, 6, 1, 2, 3], [7, 4, 0, 0, 0]]
    assert rollout.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert rollout.engine_logp.tolist() == [[0, 0, -0.5, -1.0, -1.5], [0, -2.0, 0, 0, 0]]
    assert rollout.responses() == [[1, 2, 3], [4]]
    with pytest.raises(ValueError, match="log-probs"):
        rollout_from_responses([[5]], [([1, 2], [-0.5])], 3)


@pytest.mark.parametrize("argv, message", [
    (["--rollout-sync", "colocated"], "--rollout-sync has no effect without --rollout-engine sglang"),
    (["--sglang-extra-args", "--dtype float32"], "--sglang-extra-args has no effect without --rollout-engine"),
    (["--rollout-engine", "sglang", "--sglang-url", "http://127.0.0.1:1", "--rollout-num-engines", "2"],
     "--rollout-num-engines sets up servers we launch"),
    (["--rollout-engine", "sglang", "--rollout-micro-batch-size", "4"], "--rollout-micro-batch-size is the embedded"),
    (["--rollout-engine", "sglang", "--sglang-host", "0.0.0.0"], "--sglang-host 0.0.0.0 listens beyond loopback"),
])
def test_sglang_flags_refused_where_they_have_no_effect(argv, message, capsys, monkeypatch):
    from megatron_rpg.training.config import parse_train_config

    monkeypatch.delenv("SGLANG_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny"] + argv)
    assert message in " ".join(capsys.readouterr().err.split())


def test_api_key_from_environment_allows_other_hosts(monkeypatch):
    from megatron_rpg.training.config import parse_train_config

    monkeypatch.setenv("SGLANG_API_KEY", "secret")
    config = parse_train_config(["--model-preset", "tiny", "--rollout-engine", "sglang", "--sglang-host", "0.0.0.0"])
    assert config.sglang.api_key == "secret" and config.sglang.host == "0.0.0.0"
