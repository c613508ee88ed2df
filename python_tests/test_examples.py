"""examples/finetune.py and examples/streaming_demo.py: bad arguments are argparse errors (exit 2,
naming the option) found before anything is trained (examples/train_passkey.py: test_passkey.py)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def _example(name: str):
    """examples/<name>.py as a module (run in this process through its main())."""
    if f"example_{name}" not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"example_{name}", path)
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[f"example_{name}"]


def _refused(monkeypatch, capsys, name: str, argv: list[str]) -> str:
    """Runs examples/<name>.py's main() with argv; -> its argparse error (asserting it stopped with one)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        _example(name).main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{name}.py: error: " in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """finetune's Trainer replaced: a test that reaches training fails at once."""
    def trainer(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(_example("finetune"), "Trainer", trainer)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
    (["--data", "/nonexistent/chats.jsonl"], "--data /nonexistent/chats.jsonl: no such file"),
    (["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: not a checkpoint of this script"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--grad-accum", "-1"], "--grad-accum must be >= 1, got -1"),
    (["--chunk-size", "0"], "chunk_size must be >= 1, got 0"),
])
def test_finetune_refuses_a_bad_argument_before_building_the_model(monkeypatch, capsys, tmp_path, no_training,
                                                                     argv, message):
    """(--model /nonexistent said "Repo id must use alphanumeric chars"; the others were tracebacks)."""
    err = _refused(monkeypatch, capsys, "finetune", ["--out", str(tmp_path / "out"), *argv])
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["file/out", "file"])
def test_finetune_checks_out_before_training(monkeypatch, capsys, tmp_path, no_training, out):
    """An --out that cannot be written is an argparse error before training (it failed after it,
    the trained model lost)."""
    (tmp_path / "file").write_text("not a folder")
    err = _refused(monkeypatch, capsys, "finetune", ["--out", str(tmp_path / out), "--steps", "1"])
    assert f"--out {tmp_path / out}: cannot write the model there" in err, err


def test_finetune_refuses_a_jsonl_without_a_usable_sample(monkeypatch, capsys, tmp_path, no_training):
    data = tmp_path / "chats.jsonl"
    data.write_text('{bad json\n{"uniq_id": "a"}\n\n')
    err = _refused(monkeypatch, capsys, "finetune", ["--data", str(data), "--out", str(tmp_path / "out"),
                                                     "--max-tokens", "256"])
    assert f"--data {data}: no usable sample in it (2 lines skipped; the first: {data}:1: " in err, err


@pytest.mark.parametrize("argv, message", [
    (["--length", "0"], "--length must be >= 1, got 0"),
    (["--length", "-5"], "--length must be >= 1, got -5"),
    (["--new-tokens", "-1"], "--new-tokens must be >= 0, got -1"),
])
def test_streaming_demo_refuses_a_bad_length(monkeypatch, capsys, argv, message):
    """(a traceback after building the model)."""
    assert message in _refused(monkeypatch, capsys, "streaming_demo", argv)
