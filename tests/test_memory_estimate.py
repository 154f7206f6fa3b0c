"""The --dry-run peak-memory estimate: its arithmetic on known sizes, the activation trace, and the CLI line."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from dmdr.recipes import load_recipe, recipes_dir  # noqa: E402
from dmdr.train.memory_estimate import (GIB, REWARD_PARAMS, MemoryEstimate, adam_bytes, estimate_t2i_memory,  # noqa: E402
                                        lora_param_count, saved_activation_bytes)

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_adam_and_gib_arithmetic():
    assert adam_bytes(10) == 120  # 4 (grad) + 8 (two AdamW moments) bytes per float32 parameter
    e = MemoryEstimate(weights=2 * GIB, optimiser=GIB, activations=GIB // 2, detail={"config": "x", "resolution": 8})
    assert e.total == 3 * GIB + GIB // 2
    assert e.gib() == {"weights": 2.0, "optimiser": 1.0, "activations": 0.5, "total": 3.5}
    assert e.line().startswith("estimated peak GPU memory 3.5 GiB = weights 2.0 + optimiser 1.0 + activations 0.5")


def test_lora_param_count_matches_peft():
    from peft import LoraConfig, inject_adapter_in_model

    net = torch.nn.Sequential()
    net.add_module("to_q", torch.nn.Linear(8, 16))
    net.add_module("conv1", torch.nn.Conv2d(4, 6, 3))
    net.add_module("other", torch.nn.Linear(8, 8))
    n = lora_param_count(net, 2, ["to_q", "conv1"])
    assert n == 2 * (8 + 16) + 2 * (4 * 3 * 3 + 6)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "conv1"]), net)
    assert n == sum(p.numel() for name, p in net.named_parameters() if ".lora_" in name)


def test_saved_bytes_of_known_ops():
    a = torch.empty(1000, device="meta", requires_grad=True)
    assert saved_activation_bytes(lambda: a.exp().sum(), []) == 4000  # exp saves its float32 output
    q = torch.empty(1, 2, 64, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = q.clone(), q.clone()
    # fused attention keeps q, k, v, out (2048 bytes each here) and a float32 log-sum-exp (1·2·64·4 = 512 bytes),
    # never the 64×64 score matrix
    assert saved_activation_bytes(lambda: F.scaled_dot_product_attention(q, k, v), []) == 4 * 2048 + 512
    w = torch.nn.Parameter(torch.empty(8, 8, device="meta"))
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    assert saved_activation_bytes(lambda: (x @ w).sum(), [w]) == 4 * 8 * 4  # the parameter is not an activation


@pytest.fixture(scope="module")
def estimates():
    out = {}
    for name in ("sd3-medium-4step", "sdxl-1step"):
        r = load_recipe(recipes_dir() / f"{name}.yaml")
        out[name] = (r, estimate_t2i_memory(r))
    return out


def test_estimate_parts_add_up_from_known_sizes(estimates):
    r, e = estimates["sdxl-1step"]
    d = e.detail
    assert d["network_params"] == 2_567_463_684 and d["full_generator_params"] == d["network_params"]
    assert d["text_encoder_params"] == 123_060_480 + 694_659_840  # CLIP-L + OpenCLIP-bigG text towers
    bf16 = 2
    expect_w = (d["network_params"] * bf16 + d["text_encoder_params"] * bf16 + d["vae_params"] * bf16
                + d["reward_vae_params"] * bf16 + (REWARD_PARAMS["clip"] + REWARD_PARAMS["hpsv2"]) * bf16
                + 4 * (d["lora_params"] + d["full_generator_params"]))
    assert e.weights == expect_w
    assert e.optimiser == 12 * (d["lora_params"] + d["full_generator_params"])
    per_stage = [max(s.batch_size * d["activation_bytes_per_image_network"],
                     s.batch_size * d["activation_bytes_per_image_network"]
                     + (s.batch_size * d["activation_bytes_per_image_decode"] if s.rewards else 0))
                 for s in r.stages]
    assert e.activations == max(per_stage)
    # the full-weights generator's float32 AdamW state alone is 2.57e9 · 12 bytes ≈ 28.7 GiB
    assert e.optimiser / GIB == pytest.approx(12 * (d["lora_params"] + 2_567_463_684) / GIB)


@pytest.mark.slow
def test_checkpointing_and_tiny_vae_lower_the_activations(estimates):
    r, e = estimates["sd3-medium-4step"]
    ck = load_recipe(recipes_dir() / "sd3-medium-4step.yaml",
                     ["model.gradient_checkpointing=true", "model.vae_gradient_checkpointing=true"])
    e2 = estimate_t2i_memory(ck)
    assert e2.weights == e.weights and e2.optimiser == e.optimiser
    assert e2.detail["activation_bytes_per_image_network"] < 0.2 * e.detail["activation_bytes_per_image_network"]
    assert e2.detail["activation_bytes_per_image_decode"] < 0.5 * e.detail["activation_bytes_per_image_decode"]
    xr, xe = estimates["sdxl-1step"]
    full = estimate_t2i_memory(load_recipe(recipes_dir() / "sdxl-1step.yaml", ["model.reward_vae=null"]))
    # the figure: a differentiable 1024 px SDXL VAE decode keeps about 11 GiB per image in bf16
    assert 9 * GIB < full.detail["activation_bytes_per_image_decode"] < 13 * GIB
    assert xe.detail["activation_bytes_per_image_decode"] < 0.2 * full.detail["activation_bytes_per_image_decode"]


def test_dry_run_prints_the_estimate():
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    res = CliRunner().invoke(app, ["train", str(recipes_dir() / "sd35-large-4step.yaml"), "--dry-run", "--smoke"])
    assert res.exit_code == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if l.startswith("estimated peak GPU memory"))
    assert "weights" in line and "optimiser" in line and "activations" in line and "sd35-large" in line
