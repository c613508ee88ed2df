"""comet_ext.atomic: a failed save leaves the old version whole and no debris; what is saved
gets the permissions a plain open / makedirs would give it (not mkstemp's private 0600)."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from modeling_utils import tiny_comet

from comet_ext.atomic import atomic_folder, atomic_write
from comet_ext.data import Sample
from comet_ext.planner import ChunkPlanner
from comet_ext.training import TrainConfig, Trainer


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_text(text):
    def write(p):
        with open(p, "w") as f:
            f.write(text)
    return write


def test_atomic_write_replaces_with_normal_permissions_and_keeps_the_old_file_on_failure(tmp_path, umask_022):
    path = tmp_path / "a.json"
    atomic_write(path, write_text("old"))
    assert path.read_text() == "old" and mode(path) == 0o644

    def fails(p):
        write_text("half")(p)
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_folder_swaps_the_whole_folder_and_keeps_the_old_one_on_failure(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    atomic_folder(target, lambda d: write_text("1")(os.path.join(d, "x")))
    assert (target / "x").read_text() == "1" and mode(target) == 0o755
    with pytest.raises(ValueError, match="holds x, which saving there would delete"):
        atomic_folder(target, lambda d: write_text("2")(os.path.join(d, "y")))
    atomic_folder(target, lambda d: write_text("2")(os.path.join(d, "y")), replaces=("x", "y"))
    assert os.listdir(target) == ["y"] and os.listdir(tmp_path) == ["ckpt"]

    def fails(d):
        write_text("3")(os.path.join(d, "z"))
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        atomic_folder(target, fails, replaces=("y",))
    assert os.listdir(target) == ["y"] and os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_atomic_folder_never_leaves_the_name_empty(tmp_path, monkeypatch, exchange):
    """Replacing a folder took two renames (old aside, new in): a crash between them left no
    folder under the name. Where Linux's renameat2 exchange exists, the two trade places in one
    step; elsewhere the old one is left beside the name. Either way the result is the same."""
    from comet_ext import atomic

    target = tmp_path / "ckpt"
    atomic_folder(target, lambda d: write_text("1")(os.path.join(d, "x")))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b))[1])
    if exchange == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    else:
        probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
        for p in probe:
            p.mkdir()
        if not atomic._exchange(*map(str, probe)):
            pytest.skip("this system or file system has no renameat2 exchange")
        for p in probe:
            p.rmdir()
    atomic_folder(target, lambda d: write_text("2")(os.path.join(d, "x")), replaces=("x",))
    assert (target / "x").read_text() == "2" and os.listdir(tmp_path) == ["ckpt"]
    if exchange == "renameat2":
        assert renames == [], "one exchange, no rename"
    else:
        assert len(renames) == 2


def test_saved_models_memories_and_checkpoints_are_readable_by_others(tmp_path, umask_022):
    model = tiny_comet("qwen3")
    model.save_pretrained(tmp_path / "model")
    model.read(torch.randint(0, 50, (1, 20))).save(tmp_path / "mem.safetensors")
    trainer = Trainer(model, [Sample([1] * 20, [1] * 20)], TrainConfig(total_steps=1), ChunkPlanner(chunk_size=16))
    trainer.save_checkpoint(tmp_path / "ckpt")
    files = [tmp_path / "mem.safetensors"] + [os.path.join(root, f) for folder in ("model", "ckpt")
                                              for root, _, names in os.walk(tmp_path / folder) for f in names]
    assert len(files) >= 6
    assert {str(f): mode(f) for f in files} == {str(f): 0o644 for f in files}
    assert mode(tmp_path / "ckpt") == 0o755 and mode(tmp_path / "model") == 0o755


def test_data_is_on_disk_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    """After a power loss a rename can reach the disk before the data it publishes (an empty
    file in place of the old one) unless the data is fsynced first; the folder is fsynced after."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))), replace(a, b)))
    atomic_write(tmp_path / "a.json", write_text("new"))
    kinds = [(kind, os.path.basename(p) if kind == "replace" or p == str(tmp_path) else "tmp") for kind, p in events]
    assert kinds == [("fsync", "tmp"), ("replace", "a.json"), ("fsync", os.path.basename(tmp_path))], events


def test_a_save_over_a_model_that_fails_part_way_leaves_the_old_model_whole(tmp_path, monkeypatch):
    """save_pretrained writes three files; a full disk while writing the last one used to leave
    new weights beside the old config (refused on load: neither model loadable)."""
    from comet_ext import CometForCausalLM, checkpoint

    old, new = tiny_comet("llama", seed=1), tiny_comet("llama", seed=2)
    old.save_pretrained(tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))
    write_json = checkpoint.write_json

    def disk_full_on_config(path, obj):
        if "comet" in obj:  # config.json, written last
            raise OSError(28, "No space left on device")
        write_json(path, obj)
    monkeypatch.setattr(checkpoint, "write_json", disk_full_on_config)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == before  # no temporary files left
    loaded = CometForCausalLM.from_pretrained(tmp_path / "m")
    for name, p in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
