"""Tests of the stages' shared plumbing (cadalign.stages.common)."""

from __future__ import annotations

import logging

import pytest
import torch

from cadalign.stages.common import add_threads_option, make_parser, resolve_device, set_threads, setup_logging


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_cuda_falls_back_to_the_cpu_with_a_warning_naming_the_key(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_device(name, "realign.device") == torch.device("cpu")
    assert f"realign.device = {name} but CUDA is not available; running on the CPU" in caplog.text


def test_cuda_is_used_when_present_and_the_cpu_when_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING):
        assert resolve_device("auto", "x.device") == torch.device("cuda")
        assert resolve_device("cpu", "x.device") == torch.device("cpu")
    assert caplog.text == ""


def test_every_stage_takes_params_and_libraries_log_warnings_only() -> None:
    parser = make_parser("a stage")
    assert parser.parse_args([]).params == "params.yaml"
    assert parser.parse_args(["--params", "other.yaml"]).params == "other.yaml"
    setup_logging()
    assert logging.getLogger("mlflow").level == logging.WARNING
    assert logging.getLogger("rasterio").level == logging.WARNING


def test_threads_option_sets_torch_and_refuses_zero() -> None:
    before = torch.get_num_threads()
    parser = make_parser("t")
    add_threads_option(parser)
    try:
        set_threads(parser, parser.parse_args(["--threads", "1"]))
        assert torch.get_num_threads() == 1
        set_threads(parser, parser.parse_args([]))  # not given: left as it is
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            set_threads(parser, parser.parse_args(["--threads", "0"]))
    finally:
        torch.set_num_threads(before)
