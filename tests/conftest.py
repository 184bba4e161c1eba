import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The embedded world's `micro` preset, built once per test session (seconds) into a
    private cache; returns the zoo directory (layout in docs/CONTRACTS.md)."""
    from distill.world import build_zoo

    cache = tmp_path_factory.mktemp("distill-cache")
    old = os.environ.get("DISTILL_CACHE")
    os.environ["DISTILL_CACHE"] = str(cache)
    try:
        return build_zoo("micro")
    finally:
        if old is None:
            del os.environ["DISTILL_CACHE"]
        else:
            os.environ["DISTILL_CACHE"] = old


@pytest.fixture
def one_thread():
    """Tiny matmuls are ~10x slower with 2 threads on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
