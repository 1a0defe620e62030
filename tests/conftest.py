"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the tests that take the `device` fixture (test_device_pool.py, test_hf_sharing.py): "
        "cpu (default), cuda, cuda:1",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the device-aware tests run on (`--device`); an unusable device stops the run."""
    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        pytest.exit(f"--device {name!r} is not a torch device: {exc}", returncode=4)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {name!r}: this torch has no usable CUDA device", returncode=4)
    return dev


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models and small copies run faster on one intra-op thread, and the 2 cores stay free
    for the tests' own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
