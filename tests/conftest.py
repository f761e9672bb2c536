"""Shared fixtures and options.

`--device` and `--dtype` run the model equivalence tests elsewhere than fp32 on the CPU, e.g.
`python -m pytest tests/test_model.py --device cuda --dtype bfloat16` on a GPU machine
(`scripts/check_cuda.sh`). CI never needs a GPU: the defaults are `cpu` and `float32`.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests (default: cpu)")
    parser.addoption(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="dtype of the model under test (default: float32)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))
