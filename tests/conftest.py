import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


def _save_random_teacher(path) -> str:
    """A small random TinyDiT saved like a real teacher (fast, independent of the shipped asset)."""
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2, num_classes=10))
    for p in m.parameters():  # non-zero everywhere so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.05)
    save_tiny(m, str(path))
    return str(path)


@pytest.fixture
def tiny_teacher(tmp_path):
    """A small random TinyDiT teacher file, new for each test."""
    return _save_random_teacher(tmp_path / "teacher.safetensors")


@pytest.fixture(scope="session")
def shared_tiny_teacher(tmp_path_factory):
    """The same random teacher, written once per session (for modules that only read it)."""
    return _save_random_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
