"""Fast mode by default; full mode by one setting."""

import pytest
import torch

from dgmlab import modes


def test_fast_mode_is_the_default_without_a_gpu(monkeypatch):
    monkeypatch.delenv("DGMLAB_FULL", raising=False)
    monkeypatch.delenv("DGMLAB_DEVICE", raising=False)
    mode = modes.current()
    assert mode.full == torch.cuda.is_available()
    if not mode.full:
        assert mode.device == torch.device("cpu") and mode.name == "fast"


@pytest.mark.parametrize("value,full", [("1", True), ("true", True), ("0", False), ("off", False)])
def test_the_environment_variable_decides(monkeypatch, value, full):
    monkeypatch.setenv("DGMLAB_FULL", value)
    assert modes.current().full is full
    assert "DGMLAB_FULL" in modes.current().reason


def test_device_override_and_bad_values(monkeypatch):
    monkeypatch.setenv("DGMLAB_FULL", "1")
    monkeypatch.setenv("DGMLAB_DEVICE", "cpu")
    assert modes.device() == torch.device("cpu")
    monkeypatch.setenv("DGMLAB_DEVICE", "warp-drive")
    with pytest.raises(ValueError, match="DGMLAB_DEVICE"):
        modes.current()
    monkeypatch.setenv("DGMLAB_FULL", "maybe")
    with pytest.raises(ValueError, match="DGMLAB_FULL should be 1"):
        modes.current()


def test_full_size_gate_says_what_it_skips(monkeypatch, capsys):
    monkeypatch.setenv("DGMLAB_FULL", "0")
    assert modes.full_size("train a model on MNIST", expected="90 nats") is False
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the message is wrapped to 78 columns
    assert "train a model on MNIST" in flat and "90 nats" in flat and "DGMLAB_FULL=1" in flat
    assert max(len(line) for line in out.splitlines()) <= 78
    monkeypatch.setenv("DGMLAB_FULL", "1")
    monkeypatch.setenv("DGMLAB_DEVICE", "cpu")
    assert modes.full_size("train a model on MNIST") is True
    assert "Full mode" in capsys.readouterr().out


def test_config_picks_full_or_smoke_settings(monkeypatch, capsys):
    monkeypatch.delenv("DGMLAB_SMOKE", raising=False)
    full, smoke = dict(layers=12, epochs=20), dict(layers=1, epochs=1)
    assert modes.config(full=full, smoke=smoke) == full
    assert "layers=12, epochs=20" in capsys.readouterr().out  # the cell states what it runs
    monkeypatch.setenv("DGMLAB_SMOKE", "1")
    assert modes.is_smoke() and modes.config(full=full, smoke=smoke) == smoke
    with pytest.raises(ValueError, match="same keys"):
        modes.config(full=full, smoke=dict(layers=1))
