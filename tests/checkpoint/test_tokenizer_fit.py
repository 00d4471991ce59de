"""A tokenizer with more tokens than the model's vocabulary is reported by both converters and the
verifier, before anything is written or any model is built (seen: a Qwen2 folder whose tokenizer
loads as one token more than its 250-row embedding — Qwen2Tokenizer adds "<|endoftext|>" when the
vocabulary lacks it — passed both tools, then training refused it)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_rpg.checkpoint import convert
from megatron_rpg.checkpoint.verify import check_verification_inputs
from tests.checkpoint.tiny_hf_folders import save_tiny_hf_folder
from tests.tiny_models import TINY_VOCAB_SIZE

MESSAGE = f"the tokenizer has {TINY_VOCAB_SIZE + 1} tokens but the model's vocabulary"


def _save_overfull_tokenizer(directory: str) -> None:
    """t0..t249 fill the vocabulary; loaded as Qwen2Tokenizer, "<|endoftext|>" becomes token 250."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY_VOCAB_SIZE)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t1").save_pretrained(directory)
    assert len(AutoTokenizer.from_pretrained(directory, local_files_only=True)) == TINY_VOCAB_SIZE + 1


@pytest.fixture(scope="module")
def overfull(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("overfull") / "hf")
    save_tiny_hf_folder("qwen2", directory, tokenizer=False)
    _save_overfull_tokenizer(directory)
    return directory


def test_hf_to_megatron_reports_the_tokenizer_before_writing(overfull, tmp_path):
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=f"--hf-dir {overfull}: {MESSAGE}"):
        convert.hf_to_megatron_checkpoint(overfull, output, progress=False)
    assert os.listdir(tmp_path) == []


def test_megatron_to_hf_and_the_verifier_report_the_checkpoints_tokenizer(overfull, tmp_path):
    checkpoint = tmp_path / "megatron"  # the files the converter reads before any tensor
    shutil.copytree(overfull, checkpoint / "hf", ignore=shutil.ignore_patterns("*.safetensors"))
    (checkpoint / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (checkpoint / convert.METADATA_FILE).write_text(json.dumps({"format_version": convert.FORMAT_VERSION}))
    output = str(tmp_path / "out")
    with pytest.raises(ValueError, match=f"the checkpoint's tokenizer in {checkpoint / 'hf'}: {MESSAGE}"):
        convert.megatron_to_hf_checkpoint(str(checkpoint), output, progress=False)
    assert not os.path.exists(output)
    with pytest.raises(ValueError, match=f"--hf-dir {overfull}: {MESSAGE}"):
        check_verification_inputs(overfull, str(checkpoint), 1, 1)
