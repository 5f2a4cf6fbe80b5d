"""How budgets are written in messages (part_fast.eps_text) and which device `auto` means (part_fast.devices)."""
import pytest
import torch

from part_fast.devices import describe_device, resolve_device
from part_fast.errors import ConfigError
from part_fast.eps_text import above_one_hint, eps_text, named_eps


@pytest.mark.parametrize("value,text", [(8 / 255, "8/255 (0.0314)"), (7 / 255, "7/255 (0.0275)"),
                                        (1.5 / 255, "1.5/255 (0.0059)"), (0.01, "2.55/255 (0.0100)"),
                                        (0.0, "0/255 (0.0000)"), (1.0, "255/255 (1.0000)"),
                                        (0.1234567, "31.5/255 (0.1235)"), (float("nan"), "nan")])
def test_eps_text(value, text):
    assert eps_text(value) == text


def test_named_eps_and_hint():
    assert named_eps("eps_low", 8 / 255) == "eps_low=8/255 (0.0314)"
    assert above_one_hint(8 / 255) == "" and above_one_hint(1.0) == ""
    assert above_one_hint(8) == "; inputs are in [0, 1], so a budget above 1 is never meant: did you mean 8/255 (0.0314)?"


def test_auto_is_cuda_only_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device 'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("bad", ["gpu", "", 3, None])
def test_bad_device_names_the_forms(bad):
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got"):
        resolve_device(bad)


def test_describe_cpu():
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("other", ["mps", "xpu", "meta"])
def test_only_cpu_and_cuda_are_accepted(other):
    with pytest.raises(ConfigError, match=rf"got '{other}' \(part_fast runs on CPUs and CUDA GPUs\)"):
        resolve_device(other)


def test_budget_checks_are_one_rule():
    from part_fast.eps_text import validate_budget, validate_budgets

    validate_budgets(8 / 255, 7 / 255)
    validate_budget("eps", 1)
    with pytest.raises(ConfigError, match=r"^need 0 <= eps_low <= eps <= 1, got eps_low=8/255 \(0.0314\) > eps=4/255"):
        validate_budgets(4 / 255, 8 / 255)
    with pytest.raises(ConfigError, match=r"^--eps must be in \[0, 1\], got --eps=2040/255 \(8.0000\); .*8/255"):
        validate_budget("--eps", 8)
