import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_teacher(tmp_path):
    """A small random TinyDiT saved like a real teacher (fast, independent of the shipped asset)."""
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2, num_classes=10))
    for p in m.parameters():  # non-zero everywhere so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "teacher.safetensors"
    save_tiny(m, str(path))
    return str(path)
