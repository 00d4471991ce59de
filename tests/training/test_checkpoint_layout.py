"""Checkpoints in Megatron-LM's layout, checked at start-up (real megatron-core, CPU, one gloo rank).

Properties proved:
- --save DIR writes DIR/iter_<step>/ and DIR/latest_checkpointed_iteration.txt, a line per save,
  ordinary permissions, a manifest with the size and sha256 of every file;
- --load DIR = --save DIR starts fresh on a first run and resumes from the latest on the next one;
  --load DIR/iter_N loads that one; --keep-last N keeps the newest N;
- a start-up removes our stale staging folders (the marker) and nothing else; a --save folder with
  foreign files is refused and they survive;
- before the model is built: --save below a regular file or not writable, --load of a finished run
  (step >= --train-iters), --load missing, --load of an HF folder: a clear error;
- every damaged checkpoint (truncated / deleted .distcp, truncated .metadata, deleted common.pt,
  random bytes in a shard) is named by --load, by the HF converter and by the verifier before any
  work; a damaged latest falls back to the previous iteration with a warning.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--no-progress", "--seed", "0",
         "--rollout-batch-size", "4", "--micro-batch-size", "16", "--num-mini-batches", "2"]


def _args(*extra):
    from megatron_rpg.training.config import parse_train_config
    return parse_train_config(QUICK + [str(x) for x in extra])


def _start_up_error(config) -> str:
    """train(config)'s error, with building the model replaced by a failure: proves it came first."""
    from megatron_rpg.training import loop

    def must_not_build(*_, **__):
        raise AssertionError("the model was built")

    original, loop.build_run = loop.build_run, must_not_build
    try:
        loop.train(config)
    except ValueError as error:
        return str(error)
    finally:
        loop.build_run = original
    raise AssertionError("train() raised no ValueError")


def _writable(folder: str) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


def body(rank, world_size, workdir):
    from megatron_rpg.training.loop import train

    torch.set_num_threads(1)
    out = {}
    run = os.path.join(workdir, "run")  # --load = --save: fresh, then resumed (a requeued job)
    out["first"] = [m["step"] for m in train(_args("--train-iters", 2, "--save-interval", 1, "--load", run,
                                                   "--save", run))]
    out["second"] = [m["step"] for m in train(_args("--train-iters", 4, "--save-interval", 1, "--keep-last", 2,
                                                    "--load", run, "--save", run))]
    out["listing"] = sorted(os.listdir(run))
    out["from_iter"] = [m["step"] for m in train(_args("--train-iters", 4, "--load",
                                                       os.path.join(run, "iter_0000003")))]
    out["finished"] = _start_up_error(_args("--train-iters", 3, "--load", run))  # = 4: nothing to train, exit 0
    below_file = os.path.join(workdir, "a_file")
    open(below_file, "w").close()
    out["below_file"] = _start_up_error(_args("--train-iters", 1, "--save", os.path.join(below_file, "ckpt")))
    out["missing"] = _start_up_error(_args("--train-iters", 1, "--load", os.path.join(workdir, "nothing")))
    hf_like = os.path.join(workdir, "hf_like")
    os.makedirs(hf_like)
    open(os.path.join(hf_like, "config.json"), "w").close()
    out["hf_folder"] = _start_up_error(_args("--train-iters", 1, "--load", hf_like))
    if not _writable("/sys"):  # sysfs refuses new folders, even root's
        out["not_writable"] = _start_up_error(_args("--train-iters", 1, "--save", "/sys/megatron_rpg_ckpt"))
    # stale staging folders of ours go at start-up; a foreign folder with a similar name stays
    from megatron_rpg.checkpoint import layout
    stale = layout.new_staging_folder(run)
    os.makedirs(os.path.join(layout.staging_payload(stale), "half"))
    out["stale"] = os.path.basename(stale)
    out["after_cleanup"] = [m["step"] for m in train(_args("--train-iters", 5, "--load", run, "--save", run))]
    out["listing_after_cleanup"] = sorted(os.listdir(run))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("layout"))


@pytest.fixture(scope="module")
def runs(workdir):
    return run_on_ranks(body, world_size=1, args=(workdir,), timeout_s=600)[0]


def test_load_equal_to_save_starts_fresh_then_resumes_from_the_latest(runs):
    assert runs["first"] == [1, 2]
    assert runs["second"] == [3, 4]  # resumed from iter_0000002
    assert runs["listing"] == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]  # --keep-last 2
    assert runs["from_iter"] == [4]  # --load DIR/iter_0000003
    assert runs["after_cleanup"] == [5]


def test_layout_files_manifest_and_permissions(runs, workdir):
    run = os.path.join(workdir, "run")
    with open(os.path.join(run, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "5\n"
    iteration = os.path.join(run, "iter_0000005")
    with open(os.path.join(iteration, "megatron_rpg_manifest.json")) as f:
        manifest = json.load(f)["files"]
    from megatron_rpg.checkpoint.integrity import checkpoint_files, file_digest
    assert sorted(manifest) == checkpoint_files(iteration) and "common.pt" in manifest and ".metadata" in manifest
    assert all(manifest[name] == file_digest(os.path.join(iteration, name)) for name in manifest)
    assert stat.S_IMODE(os.stat(iteration).st_mode) == 0o755


def test_start_up_removes_our_stale_staging_folders_only(runs):
    assert runs["stale"] not in runs["listing_after_cleanup"]
    assert runs["listing_after_cleanup"] == ["iter_0000003", "iter_0000004", "iter_0000005",
                                             "latest_checkpointed_iteration.txt"]


def test_bad_checkpoint_flags_fail_before_the_model_is_built(runs, workdir):
    assert "is at step 4, beyond --train-iters 3" in runs["finished"]
    assert "a_file/ckpt cannot be written" in runs["below_file"] and "choose a writable folder" in runs["below_file"]
    assert "nothing: no such checkpoint folder" in runs["missing"]
    assert "is a Hugging Face model folder; convert it first" in runs["hf_folder"]
    if "not_writable" in runs:
        assert "/sys/megatron_rpg_ckpt cannot be written" in runs["not_writable"]


def test_a_save_folder_with_foreign_files_is_refused_and_they_survive(tmp_path):
    from megatron_rpg.checkpoint import layout
    from megatron_rpg.training.checkpointing import check_save_dir

    save = tmp_path / "runs"
    (save / "other_run").mkdir(parents=True)
    (save / "other_run" / "weights.bin").write_text("precious")
    (save / ".staging-lookalike").mkdir()  # our prefix, but no marker: not ours
    with pytest.raises(ValueError, match=r"not a megatron_rpg checkpoint folder .*other_run.*choose a new or empty"):
        check_save_dir(str(save))
    assert layout.remove_stale_staging(str(save)) == []
    assert (save / "other_run" / "weights.bin").read_text() == "precious" and (save / ".staging-lookalike").is_dir()


def _damage(directory: str, how: str) -> str:
    """Damages one file of a checkpoint folder as `how` says; returns that file's name."""
    names = sorted(os.listdir(directory))
    shard = next(n for n in names if n.endswith(".distcp"))
    if how == "truncated_distcp":
        os.truncate(os.path.join(directory, shard), os.path.getsize(os.path.join(directory, shard)) // 2)
        return shard
    if how == "deleted_distcp":
        os.remove(os.path.join(directory, shard))
        return shard
    if how == "truncated_metadata":
        os.truncate(os.path.join(directory, ".metadata"), 100)
        return ".metadata"
    if how == "deleted_common":
        os.remove(os.path.join(directory, "common.pt"))
        return "common.pt"
    if how == "random_bytes_in_shard":  # 16 bytes XOR-ed in the middle of a stored tensor
        path = os.path.join(directory, shard)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(16)
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(b ^ 0xA5 for b in chunk))
        return shard
    raise ValueError(how)


DAMAGES = ["truncated_distcp", "deleted_distcp", "truncated_metadata", "deleted_common", "random_bytes_in_shard"]


@pytest.fixture(scope="module")
def exported(runs, workdir):
    """The HF export of the good latest checkpoint: the verifier's --hf-dir."""
    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint

    out = os.path.join(workdir, "exported_hf")
    megatron_to_hf_checkpoint(os.path.join(workdir, "run", "iter_0000005"), out, progress=False)
    return out


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no_manifest"])
def test_a_damaged_checkpoint_is_named_by_load_the_converter_and_the_verifier(runs, workdir, exported, tmp_path, how,
                                                                            manifest):
    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint
    from megatron_rpg.checkpoint.integrity import MANIFEST_FILE, DamagedCheckpoint, verify_checkpoint
    from megatron_rpg.checkpoint.verify import check_verification_inputs

    damaged = shutil.copytree(os.path.join(workdir, "run", "iter_0000005"), str(tmp_path / "iter_0000005"))
    if not manifest:  # an old checkpoint: only the structural checks (random bytes pass them)
        if how == "random_bytes_in_shard":
            pytest.skip("without checksums random bytes inside a shard cannot be seen before reading")
        os.remove(os.path.join(damaged, MANIFEST_FILE))
    name = _damage(damaged, how)
    with pytest.raises(DamagedCheckpoint, match=f"file {name} is"):
        verify_checkpoint(damaged)
    with pytest.raises(DamagedCheckpoint, match=f"--load {damaged}: checkpoint {damaged}: file {name} is"):
        _resolve(damaged)  # the trainer's start-up, before any model
    out = str(tmp_path / "hf_out")
    with pytest.raises(ValueError, match=f"file {name} is"):
        megatron_to_hf_checkpoint(damaged, out, progress=False)
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["iter_0000005"]
    with pytest.raises(ValueError, match=f"file {name} is"):
        check_verification_inputs(exported, damaged, 1, 1)


def _resolve(load: str):
    from megatron_rpg.checkpoint.dist_ckpt import single_process_group
    from megatron_rpg.training.checkpointing import prepare_checkpoints

    with single_process_group(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = prepare_checkpoints(_args("--train-iters", 9, "--load", load))
    return config.checkpoint.load, [str(w.message) for w in caught]


def test_a_damaged_latest_falls_back_to_the_previous_iteration_with_a_warning(runs, workdir, tmp_path):
    run = shutil.copytree(os.path.join(workdir, "run"), str(tmp_path / "run"))
    loaded, warned = _resolve(run)
    assert loaded == os.path.join(run, "iter_0000005") and not [w for w in warned if "damaged" in w]
    name = _damage(os.path.join(run, "iter_0000005"), "random_bytes_in_shard")
    loaded, warned = _resolve(run)
    assert loaded == os.path.join(run, "iter_0000004")
    assert any(f"iter_0000005: file {name} is damaged" in w and "iter_0000004 instead" in w for w in warned), warned
    for step in (4, 3):
        _damage(os.path.join(run, f"iter_000000{step}"), "deleted_common")
    with pytest.raises(ValueError, match=f"iter_0000005: file {name} is damaged .*2 older checkpoint"):
        _resolve(run)


def test_the_hf_export_takes_the_save_folder_and_writes_generation_config_with_ordinary_permissions(runs, workdir,
                                                                                                    tmp_path):
    out = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_megatron_to_hf.py"), "--input",
                           os.path.join(workdir, "run"), "--output", out, "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from {os.path.join(workdir, 'run', 'iter_0000005')}" in done.stdout  # the latest
    from transformers import AutoConfig, GenerationConfig
    written = GenerationConfig.from_pretrained(out)
    expected = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out))
    assert (written.bos_token_id, written.eos_token_id) == (expected.bos_token_id, expected.eos_token_id)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(os.path.join(out, n)).st_mode) for n in os.listdir(out)} == {0o644}


def _fake_iteration(directory, step: int, content: str = "x") -> None:
    from megatron_rpg.checkpoint import layout

    staging = layout.new_staging_folder(str(directory))
    with open(os.path.join(layout.staging_payload(staging), "metadata.json"), "w") as f:
        f.write(content)
    layout.publish(str(directory), staging, step)


def test_keep_last_never_deletes_the_latest_and_a_republished_step_replaces_the_old_one(tmp_path):
    from megatron_rpg.checkpoint import layout

    for step in (2, 4, 6):
        _fake_iteration(tmp_path, step)
    _fake_iteration(tmp_path, 4, content="again")  # e.g. --finetune into the same folder: latest is 4 now
    assert layout.read_latest(str(tmp_path)) == 4
    with open(tmp_path / "iter_0000004" / "metadata.json") as f:
        assert f.read() == "again"
    assert layout.prune(str(tmp_path), keep_last=1) == [str(tmp_path / "iter_0000002")]  # 6 is newer, 4 latest
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert layout.candidates(str(tmp_path)) == [str(tmp_path / "iter_0000004"), str(tmp_path / "iter_0000006")]


@pytest.mark.parametrize("extra, message", [
    (["--keep-last", "2"], "--keep-last=2 needs --save DIR"),
    (["--keep-last", "0", "--save", "somewhere"], "--keep-last=0 must be >= 1"),
])
def test_keep_last_without_effect_or_below_one_is_refused(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _args(*extra)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
